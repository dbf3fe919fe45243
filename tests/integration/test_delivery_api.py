"""Delivery through the guarded API's journal, against real guard processes: a group is on disk before the API answers
200, is served again after a SIGKILL of the API (or to a trainer that registers again) until the trainer acknowledges
it, and is spooled and trained once; atroposlib's memory stays under ``--max-queued-sequences`` while the backlog
waits on disk and counts in ``/status-env``."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import requests

from recipe.atropos.guard.journal import journal_ids
from recipe.atropos.launcher.accounting import account_groups
from recipe.atropos.schema import group_id, validate_group
from recipe.atropos.sources.api import ApiGroupSource
from recipe.atropos.sources.fifo import FifoBatcher
from recipe.atropos.spool import GroupSpool
from recipe.atropos.staleness import LagMeter, no_ledger
from recipe.atropos.transport.client import AtroposClient
from tests.factories import group

pytestmark = pytest.mark.timeout(180)

VOCAB, BATCH = 1000, 8  # groups of 4: two groups per batch
REGISTRATION = {"batch_size": BATCH, "max_token_len": 64, "num_steps": 10}


def guard(make_run_api, tmp_path: Path, **extra: object):
    options = {"vocab_size": VOCAB, "batch_size": BATCH, "journal_dir": tmp_path / "journal"}
    return make_run_api(guard={**options, "stats_file": tmp_path / "stats.json", **extra}).start()


def post(url: str, first: int, **extra: object) -> str:
    answer = requests.post(f"{url}/scored_data", json=group(n=4, first=first, **extra), timeout=5)
    assert answer.status_code == 200, answer.text
    return answer.json()["id"]


def raw_batch(url: str) -> list[dict]:
    """``GET /batch`` as a trainer that dies before spooling would do it: nothing spooled, nothing acknowledged."""
    return requests.get(f"{url}/batch", timeout=5).json()["batch"] or []


def stats(url: str) -> dict:
    return requests.get(f"{url}/guard/stats", timeout=5).json()


def sigkill(api) -> None:
    os.kill(api.proc.pid, signal.SIGKILL)
    api.proc.popen.wait(10)
    api.proc = None


def source_on(url: str, spool_dir: Path, step: dict) -> ApiGroupSource:
    return ApiGroupSource(
        AtroposClient(url, current_step=lambda: step["now"], vocab_size=VOCAB),
        FifoBatcher(batch_size=BATCH),
        LagMeter(no_ledger, max_policy_lag=None),
        registration=REGISTRATION,
        poll_timeout_s=20,
        spool=GroupSpool(spool_dir, delete_on_checkpoint=False),
    )


def firsts(groups) -> list[int]:
    return sorted((g["tokens"] if isinstance(g, dict) else g.tokens)[0][0] for g in groups)


def test_unacknowledged_groups_survive_sigkills_of_the_api_and_are_trained_once(make_run_api, tmp_path: Path) -> None:
    api, step = guard(make_run_api, tmp_path), {"now": 0}
    spool_dir = tmp_path / "spool"
    source = source_on(api.url, spool_dir, step)
    source.start(0)
    ids = [post(api.url, first) for first in (10, 20, 30, 40)]
    name = journal_ids(tmp_path / "journal")[0].pop().rpartition("-")[0]
    assert ids == [f"{name}-{i}" for i in range(4)]

    # a trainer fetched a batch and died before its spool write: the groups are out, not acknowledged
    lost_batch = raw_batch(api.url)
    assert len(lost_batch) == 2 and all(group_id(g) in ids for g in lost_batch)
    step["now"] = 1
    trained = source.next_groups(1, {})  # the next batch: spooled, then acknowledged
    source.trained(trained, 1)
    assert len(trained) == 2 and {group_id(g) for g in trained} | {group_id(g) for g in lost_batch} == set(ids)
    after = stats(api.url)
    assert (after["acked_groups"], after["journal_groups"], after["out_groups"]) == (2, 2, 2)

    # SIGKILL: the restarted API serves the two unacknowledged groups again; the source re-registers by itself
    sigkill(api)
    api.start()
    assert stats(api.url)["resumed_groups"] == 2 and stats(api.url)["backlog_groups"] == 2
    step["now"] = 2
    again = source.next_groups(2, {})
    source.trained(again, 2)
    assert firsts(again) == firsts(lost_batch)
    assert source.client.reregistrations == 1

    # a trainer spooled a batch but died before its ack: after another SIGKILL the API serves it again, and the new
    # trainer's spool drops the copies and trains the spooled groups
    ids += [post(api.url, first) for first in (50, 60)]
    dying = GroupSpool(spool_dir, delete_on_checkpoint=False)
    for raw in raw_batch(api.url):
        dying.put(validate_group(raw), fetched_step=3)
    sigkill(api)
    api.start()
    restarted = source_on(api.url, spool_dir, step)
    restarted.start(2)  # registers; the API's first batch is the two groups again: duplicates, acknowledged
    restarted.resume(2)
    assert firsts(restarted.batcher.pending_groups()) == [50, 60]
    assert restarted.spool.counters["duplicates"] == 2
    after = stats(api.url)
    assert (after["accepted_groups"], after["acked_groups"], after["journal_groups"]) == (6, 6, 0)

    # the account by id: 6 posted, 4 trained, 2 pending in the spool, none lost
    account = account_groups(tmp_path / "journal", tmp_path / "stats.json", spool_dir, tmp_path / "none.jsonl")
    assert account.line() == "groups: posted 6, trained 4, set aside 0, pending 2, lost 0"
    restarted.trained(restarted.next_groups(3, {}), 3)
    account = account_groups(tmp_path / "journal", tmp_path / "stats.json", spool_dir, tmp_path / "none.jsonl")
    assert account.line() == "groups: posted 6, trained 6, set aside 0, pending 0, lost 0"


def test_a_trainer_registering_again_gets_the_groups_an_earlier_one_never_acknowledged(
    make_run_api, tmp_path: Path
) -> None:
    api = guard(make_run_api, tmp_path)
    AtroposClient(api.url).register(starting_step=0, **REGISTRATION)
    ids = [post(api.url, first) for first in (10, 20)]
    assert sorted(group_id(g) for g in raw_batch(api.url)) == ids
    assert stats(api.url)["out_groups"] == 2
    client = AtroposClient(api.url)
    client.register(starting_step=0, **REGISTRATION)
    assert stats(api.url)["requeued_groups"] == 2
    served = client.get_batch()
    assert sorted(group_id(g) for g in served) == ids
    assert client.ack(ids) == 2 and client.ack(["unknown-1"]) == 0
    after = stats(api.url)
    assert (after["journal_groups"], after["acked_groups"], after["unknown_acks"]) == (0, 2, 1)
    bad = requests.post(f"{api.url}/ack", json={"ids": "not a list"}, timeout=5)
    assert bad.status_code == 422 and bad.json()["field"] == "ids"


def test_memory_is_bounded_the_backlog_waits_on_disk_and_counts_in_status_env(make_run_api, tmp_path: Path) -> None:
    api = guard(make_run_api, tmp_path, max_queued_sequences=BATCH)
    client = AtroposClient(api.url)
    client.register(starting_step=0, **REGISTRATION)
    assert client.get_batch() is None  # the trainer's first /batch admits environments
    env = {"max_token_length": 64, "desired_name": "e", "weight": 1.0, "group_size": 4}
    assert requests.post(f"{api.url}/register-env", json=env, timeout=5).json()["env_id"] == 0
    ids = [post(api.url, first, env_id=0) for first in (10, 20, 30, 40, 50)]  # none refused for capacity
    now = stats(api.url)
    assert (now["memory_sequences"], now["queue_sequences"], now["backlog_groups"]) == (8, 8, 3)
    status = requests.get(f"{api.url}/status-env", json={"env_id": 0}, timeout=5).json()
    # atroposlib counts its 8 queued sequences (2 groups of 4), the guard adds the backlog's 12 (3 groups)
    assert (status["queue_size"], status["self_queue_size"]) == (5, 5)
    served = []
    for expected_backlog in (1, 0):
        served += client.get_batch()
        now = stats(api.url)
        assert now["memory_sequences"] <= 8 and now["backlog_groups"] == expected_backlog
    assert client.get_batch() is None  # one group of 4 left in memory: no batch of 8
    ids.append(post(api.url, 60, env_id=0))
    served += client.get_batch()
    assert sorted(group_id(g) for g in served) == sorted(ids)  # each served once, in full
    assert firsts(served) == [10, 20, 30, 40, 50, 60]


def test_the_bound_never_stalls_groups_that_do_not_pack(make_run_api, tmp_path: Path) -> None:
    """4 + 2 sequences in memory cannot make a batch of 8: the next group is admitted past the bound."""
    api = guard(make_run_api, tmp_path, max_queued_sequences=BATCH)
    client = AtroposClient(api.url)
    client.register(starting_step=0, **REGISTRATION)
    for first, n in ((10, 4), (20, 2), (30, 4), (40, 2)):
        assert requests.post(f"{api.url}/scored_data", json=group(n=n, first=first), timeout=5).status_code == 200
    assert stats(api.url)["memory_sequences"] == 10  # 4 + 2, then 4 past the bound of 8: [4, 4] packs
    served = client.get_batch()
    assert sum(g.size for g in served) == BATCH
    rest = client.get_batch()  # 2 left in memory, then the last 2 admitted: 2 + 2 < 8, no batch yet
    assert rest is None and stats(api.url)["backlog_groups"] == 0
