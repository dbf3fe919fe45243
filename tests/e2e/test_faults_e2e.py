"""Fault suite, process level: whole runs through the launcher (tiny config, real guard/run-api, envs, verl, Ray).

Every scenario ends with the account of every group by id (:mod:`recipe.atropos.launcher.accounting`: posted,
trained, set aside with the reason, pending, lost) and asserts **0 lost**: the guarded API journals each group until
the trainer acknowledges it after its spool write, and the spool trains each id once. Each prints one row of the
fault table (``FAULT-TABLE`` lines: run with ``-s`` to see them). Scenarios share runs where each leaves the
accounting exact: an env killed and malformed groups posted in one run; Ctrl-C, a SIGKILLed trainer and a SIGKILLed
launcher in one run resumed three times. The API kill runs with a memory bound of one batch, so groups wait on disk.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
import requests

from recipe.atropos.launcher.accounting import GroupAccount
from recipe.atropos.launcher.report import group_account
from recipe.atropos.metrics_file import read_metrics
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(900)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def spool_counters(run_dir: Path) -> dict:
    """The spool's counters and pending files: nothing fetched is lost (``written == deleted + stale + pending``)."""
    spool_dir = run_dir / "checkpoints" / "spool"
    spool = read_json(spool_dir / "counters.json")
    spool["pending"] = len(list((spool_dir / "pending").glob("*.json"))) if spool_dir.exists() else 0
    return spool


def assert_nothing_fetched_lost(spool: dict) -> None:
    assert spool["written"] > 0
    assert spool["written"] == spool["deleted"] + spool["stale"] + spool["pending"], spool


def account(run_dir: Path, *, finished: bool = True) -> GroupAccount:
    """The run's account by group id; 0 lost (the ids are named otherwise); a finished run printed the same line."""
    acc = group_account(run_dir)
    assert acc is not None, "no API journal in the run directory"
    assert acc.lost == 0, (acc.line(), acc.lost_ids)
    assert acc.posted == acc.trained + acc.set_aside_total + acc.pending + acc.lost
    assert acc.trained > 0
    if finished:
        assert acc.line() in (run_dir / "summary.txt").read_text()
    return acc


def table_row(name: str, steps: int, total: int, acc: GroupAccount, stall_s: float, extra: str = "") -> None:
    print(
        f"FAULT-TABLE | {name} | steps {steps}/{total} | posted {acc.posted} | trained {acc.trained} | "
        f"set aside {acc.set_aside_total} ({acc.reasons() or 'none'}) | pending {acc.pending} | lost {acc.lost} | "
        f"stall {stall_s:.1f} s | {extra}",
        flush=True,
    )


def max_gap_s(rows: list[dict]) -> float:
    """Longest step after the first (which includes warm-up), a stand-in for the stall a fault caused."""
    return max((float(r.get("timing_s/step", 0.0)) for r in rows[1:]), default=0.0)


def kill(proc: psutil.Process) -> None:
    """SIGKILL, and wait until it is dead (a zombie until the launcher reaps it): it counts nothing more."""

    def dead() -> bool:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    proc.kill()
    wait_until(dead, 10, f"pid {proc.pid} to die", interval=0.01)


def test_api_killed_mid_run_is_restarted_and_the_run_finishes_losing_nothing(launch) -> None:
    total = 5
    # The env mixture keeps at most one batch of surplus per env, so the steps after the kill must poll the restarted
    # API (with a deeper surplus they can all be served from groups fetched before it, and nothing re-registers).
    # Memory bound of one batch: further groups wait in the journal's backlog on disk.
    run = launch(
        f"trainer.total_training_steps={total}",
        "atropos.mixture_max_pending_batches=1",
        "atropos.guard.max_queued_sequences=8",
    )
    run.wait_for(lambda: "step 1/" in run.log_text(), 600, "step 1")
    api = run.child("recipe.atropos.guard.app")
    url = f"http://127.0.0.1:{api.cmdline()[api.cmdline().index('--port') + 1]}"

    def holds_unfetched() -> bool:  # posted, not yet fetched: what a plain run-api loses to a SIGKILL
        stats = requests.get(f"{url}/guard/stats", timeout=5).json()
        return stats["memory_groups"] + stats["backlog_groups"] > 0

    run.wait_for(holds_unfetched, 300, "groups waiting in the API")
    kill(api)
    at_kill = read_json(run.run_dir / "api_guard_stats.json")  # saved at every change: the state at the kill
    assert at_kill["journal_groups"] >= 1, at_kill
    killed_at = time.monotonic()
    assert run.wait_exit(800) == 0, run.log_text()[-4000:]
    rows = read_metrics(run.run_dir / "metrics.jsonl")
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    state = read_json(run.run_dir / "launcher_state.json")
    assert state["api_restarts"] == 1
    assert rows[-1]["atropos/reregistrations"] >= 1.0
    assert rows[-1]["atropos/api_restarts"] == 1.0
    assert_nothing_fetched_lost(spool_counters(run.run_dir))
    guard = read_json(run.run_dir / "api_guard_stats.json")
    # what the killed API held unacknowledged was served again by the next one (its journal), none lost
    assert guard["resumed_groups"] == at_kill["journal_groups"], (guard, at_kill)
    acc = account(run.run_dir)
    table_row(
        "run-api SIGKILLed after step 1 (memory bound 8 sequences)",
        len(rows),
        total,
        acc,
        max_gap_s(rows),
        f"unacknowledged at the kill {at_kill['journal_groups']} (in memory {at_kill['memory_sequences']} seqs, "
        f"on disk {at_kill['backlog_groups']} groups), served again {guard['resumed_groups']}; restarts {state}; "
        f"run took {time.monotonic() - killed_at:.0f} s after the kill",
    )


def test_env_crash_and_bad_groups_after_step_1_the_run_finishes_and_loses_nothing(launch, tiny_model: Path) -> None:
    """Two faults in one run, each leaving the accounting exact: an env killed (restarted by the launcher), and the
    four groups that ended or stalled a run before the guard posted to the API: token id past the vocabulary, NaN
    score, a group of 5 in a batch of 8, an empty group (each refused with 422)."""
    total = 4
    run = launch(f"trainer.total_training_steps={total}")
    run.wait_for(lambda: "step 1/" in run.log_text(), 600, "step 1")
    argv = run.child("recipe.atropos.guard.app").cmdline()
    url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
    kill(run.child("recipe.atropos.envs.one_word_env"))
    vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    x = -100
    bad = [
        {"tokens": [[1, 2, vocab]] * 4, "masks": [[x, x, vocab]] * 4, "scores": [1.0, 0.0, 1.0, 0.0]},
        {"tokens": [[1, 2, 3]] * 4, "masks": [[x, x, 3]] * 4, "scores": [float("nan"), 0.0, 1.0, 0.0]},
        {"tokens": [[1, 2, 3]] * 5, "masks": [[x, x, 3]] * 5, "scores": [1.0, 0.0, 1.0, 0.0, 1.0]},
        {"tokens": [], "masks": [], "scores": []},
    ]
    headers = {"Content-Type": "application/json"}
    codes = [requests.post(f"{url}/scored_data", data=json.dumps(b), headers=headers).status_code for b in bad]
    assert codes == [422, 422, 422, 422]
    assert run.wait_exit(800) == 0, run.log_text()[-4000:]
    rows = read_metrics(run.run_dir / "metrics.jsonl")
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    state = read_json(run.run_dir / "launcher_state.json")
    assert sum(state["env_restarts"].values()) == 1
    guard = read_json(run.run_dir / "api_guard_stats.json")
    # An env killed in the middle of a POST leaves the guard a truncated body, refused as `body` (at most one: the
    # env sends one group at a time). Only that may come beside the four groups posted here.
    truncated = guard["rejected"].get("body", 0)
    assert truncated <= 1, guard
    assert {k: v for k, v in guard["rejected"].items() if k != "body"} == {"tokens": 2, "scores": 1, "group_size": 1}
    assert len((run.run_dir / "rejected_groups.jsonl").read_text().splitlines()) == 4 + truncated
    counts = "body 1, group_size 1" if truncated else "group_size 1"
    assert f"rejected {4 + truncated} ({counts}, scores 1, tokens 2" in (run.run_dir / "summary.txt").read_text()
    assert_nothing_fetched_lost(spool_counters(run.run_dir))
    acc = account(run.run_dir)
    assert acc.set_aside["rejected by the API (tokens)"] == 2 and acc.set_aside["rejected by the API (scores)"] == 1
    table_row(
        "one env SIGKILLed and 4 malformed groups posted after step 1",
        len(rows),
        total,
        acc,
        max_gap_s(rows),
        f"all 4 got 422; truncated bodies refused {truncated}; restarts {state}",
    )


def descendants_of(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_ctrl_c_trainer_sigkill_and_launcher_sigkill_then_resume_lose_nothing(launch) -> None:
    """One run, three faults, each followed by a resume: Ctrl-C after the first checkpoint; the trainer SIGKILLed in
    the middle of a step (the launcher stops the rest and exits 1); the launcher itself SIGKILLed (its services and
    Ray die with it). The fourth launch finishes; nothing is lost, and a fifth finds the run finished."""
    total = 6  # room for a step after each resume, before the end
    args = (f"trainer.total_training_steps={total}", "trainer.save_freq=1")
    run = launch(*args)
    latest = run.run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"

    def checkpoint() -> int:
        return int(latest.read_text() or 0) if latest.exists() else 0

    run.wait_for(lambda: checkpoint() >= 1, 600, "a checkpoint")
    run.send_signal(signal.SIGINT)
    assert run.wait_exit(120) == 130
    interrupted = spool_counters(run.run_dir)
    assert_nothing_fetched_lost(interrupted)
    step = checkpoint()
    # the checkpoint left by the stop is usable: the actor's shard and its HF config
    actor = run.run_dir / "checkpoints" / f"global_step_{step}" / "actor"
    assert any(actor.glob("model_world_size_*_rank_0.pt"))
    assert (actor / "huggingface" / "config.json").exists()
    mid = account(run.run_dir, finished=False)
    table_row(f"Ctrl-C after checkpoint {step}", step, total, mid, 0.0, f"spooled at the stop {interrupted['pending']}")

    # resume, then SIGKILL the trainer in the middle of the next step (its batch fetched, not yet trained)
    second = launch(*args)
    second.wait_for(lambda: checkpoint() > step, 600, "a step after the resume")
    trained_to = checkpoint()
    metrics = run.run_dir / "metrics.jsonl"
    second.wait_for(lambda: len(read_metrics(metrics)) >= trained_to, 120, "the step's metrics row")
    trainer = second.child("recipe.atropos.main_atropos")
    kill(trainer)
    assert second.wait_exit(180) == 1
    mid = account(run.run_dir, finished=False)
    table_row(f"trainer SIGKILLed after checkpoint {trained_to}", trained_to, total, mid, 0.0)

    # resume, then SIGKILL the launcher: every process it started dies with it (none re-parented to init)
    resumed_at = checkpoint()  # the killed trainer may have saved one more checkpoint since trained_to was read
    third = launch(*args)
    third.wait_for(lambda: checkpoint() > resumed_at, 600, "a step after the second resume")
    children = descendants_of(third.proc.pid)
    names = {c.pid: " ".join(c.cmdline())[:120] for c in children}
    assert any("main_atropos" in name for name in names.values())
    third.proc.popen.send_signal(signal.SIGKILL)
    third.proc.popen.wait(30)
    killed = time.monotonic()
    last_death = {}

    def all_gone() -> bool:
        for child in children:
            if child.pid not in last_death and gone(child):
                last_death[child.pid] = time.monotonic() - killed
        return len(last_death) == len(children)

    try:  # the services die at once (PR_SET_PDEATHSIG), the rest by the watchdog within a second or two
        wait_until(all_gone, 30, "the launcher's processes to die with it", interval=0.1)
    except AssertionError as error:
        left = [names[c.pid] for c in children if c.pid not in last_death]
        raise AssertionError(f"{len(left)} processes outlived the launcher: {left}") from error
    slowest = max(last_death, key=last_death.get)
    killed_at = checkpoint()
    mid = account(run.run_dir, finished=False)
    died = f"{len(children)} processes died with it, the last after {last_death[slowest]:.1f} s ({names[slowest]})"
    table_row(f"launcher SIGKILLed after checkpoint {killed_at}", killed_at, total, mid, 0.0, died)

    last = launch(*args)
    assert last.wait_exit(800) == 0, last.log_text()[-4000:]
    rows = read_metrics(metrics)
    assert int(rows[-1]["step"]) == total
    spool = spool_counters(run.run_dir)
    assert_nothing_fetched_lost(spool)
    assert spool["recovered"] >= 1
    acc = account(run.run_dir)
    guard = read_json(run.run_dir / "api_guard_stats.json")
    table_row(
        "Ctrl-C, trainer SIGKILL, launcher SIGKILL, each resumed",
        int(rows[-1]["step"]),
        total,
        acc,
        max_gap_s(rows),
        f"spool recovered {spool['recovered']}, duplicates dropped {spool['duplicates']}; "
        f"API starts {guard['starts']}, "
        f"groups served again from its journal {guard['resumed_groups']} (last start)",
    )
    # a fifth launch finds the run finished
    again = launch(*args)
    assert again.wait_exit(120) == 0
    assert "already finished" in again.log_text()
