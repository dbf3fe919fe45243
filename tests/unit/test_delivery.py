"""The delivery pieces in-process: the guard's journal (ids, kills, compaction, memory bound), the completion ledger
kept on disk (exact lags after a resume), de-duplication in the spool, and the account of a run by id."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from recipe.atropos.config.atropos_config import AtroposConfig, GuardConfig
from recipe.atropos.config.checks import check_atropos_config
from recipe.atropos.endpoint.ledger import CompletionLedger
from recipe.atropos.guard.journal import GroupJournal, journal_ids
from recipe.atropos.launcher.accounting import account_groups
from recipe.atropos.launcher.config import load_config
from recipe.atropos.rundir import SpoolDir
from recipe.atropos.schema import group_id, validate_group
from recipe.atropos.spool import GroupSpool
from recipe.atropos.staleness import LagMeter
from tests.factories import TINY_CONFIG, group


def groups(*firsts: int, n: int = 2) -> list[dict]:
    return [group(n=n, first=f) for f in firsts]


def test_journal_ids_survive_a_reopen_and_acknowledged_groups_are_not_served_again(tmp_path: Path) -> None:
    journal = GroupJournal(tmp_path)
    ids = journal.append(groups(10, 20, 30))
    assert [g["group_overrides"]["atropos_verl_group_id"] for g in journal.take(100, at_least_one=True)] == ids
    assert journal.ack([ids[1], "elsewhere-1"]) == (1, 1)
    journal.close()
    again = GroupJournal(tmp_path)  # as after a SIGKILL: nothing was written at a stop
    assert [again.group_id(seq) for seq in again.backlog] == [ids[0], ids[2]]
    assert again.append(groups(40)) == [f"{again.name}-3"]
    posted, unacked = journal_ids(tmp_path)
    assert posted == {f"{again.name}-{i}" for i in range(4)} and unacked == {ids[0], ids[2], f"{again.name}-3"}


def test_a_line_cut_short_by_a_kill_is_dropped_and_the_next_append_starts_clean(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    journal = GroupJournal(tmp_path)
    journal.append(groups(10))
    journal.close()
    with open(tmp_path / "groups.jsonl", "ab") as fh:
        fh.write(b'{"id": "x-1", "seq": 1, "gro')  # the write a kill cut short: never answered 200
    with caplog.at_level(logging.WARNING, logger="atropos_api_guard"):
        again = GroupJournal(tmp_path)
    assert len(again.entries) == 1 and again.next_seq == 1
    assert "dropping 28 bytes" in caplog.text  # len(b'{"id": "x-1", "seq": 1, "gro')
    again.append(groups(20))
    assert [json.loads(line)["seq"] for line in (tmp_path / "groups.jsonl").read_text().splitlines()] == [0, 1]


def test_compaction_keeps_the_unacknowledged_groups_readable(tmp_path: Path) -> None:
    journal = GroupJournal(tmp_path, compact_min_acked=2)
    ids = journal.append(groups(10, 20, 30, 40))
    journal.ack(ids[:3])  # 3 acknowledged >= 2 and > 1 left: compacted
    assert len((tmp_path / "groups.jsonl").read_text().splitlines()) == 1
    assert (tmp_path / "acks.jsonl").read_text() == ""
    (left,) = journal.take(100, at_least_one=True)
    assert left["tokens"][0][0] == 40
    journal.close()
    again = GroupJournal(tmp_path)
    assert again.next_seq == 4 and list(again.entries) == [3]
    assert journal_ids(tmp_path) == ({f"{again.name}-{i}" for i in range(4)}, {ids[3]})


def test_take_fills_memory_up_to_the_bound_and_out_groups_requeue_at_the_front(tmp_path: Path) -> None:
    journal = GroupJournal(tmp_path)
    ids = journal.append(groups(10, 20, n=4) + groups(30, n=2) + groups(40, n=4))
    first = journal.take(6, at_least_one=False)  # 4 fits, the next 4 does not
    assert [group_id(g) for g in first] == ids[:1] and journal.memory_sequences == 4
    assert journal.take(0, at_least_one=False) == []
    assert [group_id(g) for g in journal.take(3, at_least_one=True)] == ids[1:2]  # too big, but memory is empty
    journal.handed_out(ids[:2])
    assert journal.memory_sequences == 0 and journal.depth()["out_groups"] == 2
    assert journal.requeue_out() == 2
    assert [journal.group_id(seq) for seq in journal.backlog] == ids  # back at the front, in order
    assert journal.depth()["backlog_sequences_by_env"] == {None: 14}


def test_the_ledger_on_disk_gives_a_resumed_run_exact_lags(tmp_path: Path) -> None:
    path = SpoolDir(tmp_path).ledger
    ledger = CompletionLedger(max_entries=2, path=path)
    ledger.record([1, 2], [3], 0)
    ledger.record([1, 2], [4], 1)
    resumed = CompletionLedger(max_entries=2, path=path)  # a new trainer process
    assert (resumed.version_of([1, 2, 3]), resumed.version_of([1, 2, 4])) == (0, 1)
    resumed.record([1, 2], [5], 2)
    resumed.record([1, 2], [6], 3)  # 4 lines = 2 x max_entries: rewritten with the 2 kept
    assert len(path.read_text().splitlines()) == 2
    last = CompletionLedger(max_entries=2, path=path)
    assert (last.version_of([1, 2, 4]), last.version_of([1, 2, 5]), last.version_of([1, 2, 6])) == (None, 2, 3)
    with open(path, "a") as fh:
        fh.write('{"k": "00')  # a record a kill cut short
    cut = CompletionLedger(max_entries=2, path=path)
    cut.record([1, 2], [7], 4)
    assert CompletionLedger(max_entries=2, path=path).version_of([1, 2, 7]) == 4


def test_spool_resume_uses_the_exact_lag_and_drops_redelivered_groups(tmp_path: Path) -> None:
    journal = GroupJournal(tmp_path / "journal")
    raws = groups(10, 20)
    ids = journal.append(raws)
    ledger = CompletionLedger(path=SpoolDir(tmp_path / "spool").ledger)
    for raw, version in zip(raws, (0, 3), strict=True):
        for tokens in raw["tokens"]:
            ledger.record(tokens[:2], tokens[2:], version)
    spool = GroupSpool(tmp_path / "spool")
    for raw in raws:  # fetched during step 4 (lower bound of the lag at step 6: 2)
        spool.put(validate_group(raw), fetched_step=4)
    assert spool.put(validate_group(raws[0]), fetched_step=4) is None  # delivered again: dropped
    lag = LagMeter(CompletionLedger(path=SpoolDir(tmp_path / "spool").ledger).sequence_version, max_policy_lag=2)
    again = GroupSpool(tmp_path / "spool")
    assert again.put(validate_group(raws[1]), fetched_step=5) is None  # the seen ids survive a restart
    kept = again.resume(5, 2, lag.lags)  # step 6 trains version 5: lags 5 (version 0) and 2 (version 3)
    assert [group_id(g) for g in kept] == [ids[1]]
    (aside,) = [json.loads(line) for line in (SpoolDir(tmp_path / "spool").stale).read_text().splitlines()]
    assert aside["reason"] == "on resume at step 5: policy lag 5 > 2"
    assert again.counters["duplicates"] == 2  # cumulative over the runs sharing the spool


def test_the_account_finds_a_group_that_is_nowhere(tmp_path: Path) -> None:
    journal = GroupJournal(tmp_path / "journal")
    raws = groups(10, 20, 30, 40)
    ids = journal.append(raws)
    spool = GroupSpool(tmp_path / "spool", delete_on_checkpoint=False)
    trained = validate_group(raws[0])
    assert spool.put(trained, fetched_step=1) is not None
    spool.put(validate_group(raws[1]), fetched_step=1)
    spool.trained([trained], step=1)  # raws[1] was dropped as stale at step 1: set aside
    journal.ack(ids[:3])  # raws[2] acknowledged, yet never spooled: lost; raws[3] still in the journal: pending
    (tmp_path / "stats.json").write_text(json.dumps({"rejected": {"scores": 2}}))
    account = account_groups(tmp_path / "journal", tmp_path / "stats.json", tmp_path / "spool", tmp_path / "x.jsonl")
    assert account.line() == "groups: posted 6, trained 1, set aside 3, pending 1, lost 1"
    assert account.lost_ids == [ids[2]]
    assert dict(account.set_aside) == {"over the policy-lag cap": 1, "rejected by the API (scores)": 2}


def test_the_memory_bound_is_derived_from_the_batch_and_the_lag_cap_and_checked() -> None:
    assert AtroposConfig().max_queued_sequences(8) == 32  # 8 x lag cap 2 x 2
    assert AtroposConfig(max_policy_lag=0).max_queued_sequences(8) == 16
    assert AtroposConfig(max_policy_lag=None).max_queued_sequences(8) == 32
    assert AtroposConfig(guard=GuardConfig(max_queued_sequences=12)).max_queued_sequences(8) == 12
    with pytest.raises(ValueError, match="atropos.guard.max_queued_sequences=0"):
        GuardConfig(max_queued_sequences=0)
    config = load_config(TINY_CONFIG, ["actor_rollout_ref.model.path=/m", "atropos.guard.max_queued_sequences=4"])
    with pytest.raises(ValueError, match="max_queued_sequences=4 is below data.train_batch_size=8"):
        check_atropos_config(config)
