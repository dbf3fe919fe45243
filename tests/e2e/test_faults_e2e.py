"""Fault suite, process level: whole runs through the launcher (tiny config, real run-api/guard, envs, verl, Ray).

Each scenario asserts the run finishes its steps, counts what it rejected, loses nothing it had fetched (the spool's
``written == deleted + stale + pending``), bounds what it lost, and leaves no process behind (the ``launch``
fixture). Each prints one row of the fault table (``FAULT-TABLE`` lines in the captured output: run with ``-s`` to
see them). Faults that each leave the run's accounting exact share one run (an env killed and malformed groups
posted after step 1).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import psutil
import pytest
import requests

from recipe.atropos.metrics_file import read_metrics
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(900)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def accounting(run_dir: Path) -> dict:
    """Posted / fetched / trained / rejected / set aside / pending from the run directory's counters."""
    guard = read_json(run_dir / "api_guard_stats.json")
    spool_dir = run_dir / "checkpoints" / "spool"
    spool = read_json(spool_dir / "counters.json")
    pending = len(list((spool_dir / "pending").glob("*.json"))) if spool_dir.exists() else 0
    trainer_rejected = run_dir / "rejected_groups_trainer.jsonl"
    final = read_json(run_dir / "api_final_stats.json")
    return {
        "left_in_api": final.get("queue_groups", 0) + final.get("cached_groups", 0),
        "posted": guard.get("accepted_groups", 0),
        "rejected_api": guard.get("rejected_groups", 0),
        "rejected_trainer": len(trainer_rejected.read_text().splitlines()) if trainer_rejected.exists() else 0,
        "fetched": spool.get("written", 0),
        "trained": spool.get("trained", 0),
        "deleted": spool.get("deleted", 0),
        "stale": spool.get("stale", 0),
        "recovered": spool.get("recovered", 0),
        "pending": pending,
    }


def assert_nothing_fetched_lost(acc: dict) -> None:
    assert acc["fetched"] > 0
    assert acc["fetched"] == acc["deleted"] + acc["stale"] + acc["pending"], acc


def lost_in_api(acc: dict) -> int:
    """Accepted by the API but neither fetched by the trainer nor still queued at the end: died with an API."""
    return acc["posted"] - acc["fetched"] - acc["left_in_api"]


def table_row(name: str, steps: int, total: int, acc: dict, stall_s: float, extra: str = "") -> None:
    print(
        f"FAULT-TABLE | {name} | steps {steps}/{total} | posted {acc['posted']} | fetched {acc['fetched']} | "
        f"left in API at end {acc['left_in_api']} | lost in API {lost_in_api(acc)} | "
        f"trained {acc['trained']} | rejected api {acc['rejected_api']} trainer {acc['rejected_trainer']} | "
        f"set aside {acc['stale']} | left in spool {acc['pending']} | stall {stall_s:.1f} s | {extra}",
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


def test_api_killed_mid_run_is_restarted_and_the_run_finishes(launch) -> None:
    total = 5
    # The env mixture keeps at most one batch of surplus per env, so the steps after the kill must poll the restarted
    # API (with a deeper surplus they can all be served from groups fetched before it, and nothing re-registers).
    run = launch(f"trainer.total_training_steps={total}", "atropos.mixture_max_pending_batches=1")
    run.wait_for(lambda: "step 1/" in run.log_text(), 600, "step 1")
    kill(run.child("recipe.atropos.guard.app"))
    # Read before the launcher restarts the API: the guard saved its count at each accepted group, and the trainer
    # cannot fetch from a dead API (a batch it got just before the kill but had not spooled yet only widens the bound).
    at_kill = accounting(run.run_dir)
    killed_at = time.monotonic()
    assert run.wait_exit(800) == 0, run.log_text()[-4000:]
    rows = read_metrics(run.run_dir / "metrics.jsonl")
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    state = read_json(run.run_dir / "launcher_state.json")
    assert state["api_restarts"] == 1
    assert rows[-1]["atropos/reregistrations"] >= 1.0
    assert rows[-1]["atropos/api_restarts"] == 1.0
    acc = accounting(run.run_dir)
    assert_nothing_fetched_lost(acc)
    # what the API held when it died (accepted before the kill, not yet fetched) is the most that was lost
    lost_bound = at_kill["posted"] - at_kill["fetched"]
    assert 0 <= lost_in_api(acc) <= lost_bound, (acc, at_kill)
    table_row(
        "run-api killed after step 1",
        len(rows),
        total,
        acc,
        max_gap_s(rows),
        f"lost {lost_in_api(acc)} <= {lost_bound} groups (in the API's memory at the kill); restarts {state}; "
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
    acc = accounting(run.run_dir)
    assert_nothing_fetched_lost(acc)
    assert lost_in_api(acc) == 0
    table_row(
        "one env killed and 4 malformed groups posted after step 1",
        len(rows),
        total,
        acc,
        max_gap_s(rows),
        f"all 4 got 422; truncated bodies refused {truncated}; restarts {state}",
    )


def test_ctrl_c_then_resume_trains_the_spooled_groups(launch) -> None:
    total = 4
    run = launch(f"trainer.total_training_steps={total}", "trainer.save_freq=1")
    latest = run.run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    run.wait_for(lambda: latest.exists() and int(latest.read_text() or 0) >= 1, 600, "a checkpoint")
    run.send_signal(signal.SIGINT)
    assert run.wait_exit(120) == 130
    interrupted = accounting(run.run_dir)
    assert_nothing_fetched_lost(interrupted)
    step = int(latest.read_text())
    # the checkpoint left by the stop is usable: the actor's shard and its HF config
    actor = run.run_dir / "checkpoints" / f"global_step_{step}" / "actor"
    assert any(actor.glob("model_world_size_*_rank_0.pt"))
    assert (actor / "huggingface" / "config.json").exists()
    resumed = launch(f"trainer.total_training_steps={total}", "trainer.save_freq=1")
    assert resumed.wait_exit(800) == 0, resumed.log_text()[-4000:]
    rows = read_metrics(run.run_dir / "metrics.jsonl")
    assert int(rows[-1]["step"]) == total
    acc = accounting(run.run_dir)
    assert acc["recovered"] >= interrupted["pending"] - acc["stale"]
    assert_nothing_fetched_lost(acc)
    assert lost_in_api(acc) == 0  # the first API wrote its queue at the stop, the second restored it
    table_row(
        f"Ctrl-C after checkpoint {step}, then resume",
        int(rows[-1]["step"]),
        total,
        acc,
        max_gap_s(rows),
        f"spooled at interrupt {interrupted['pending']}, recovered {acc['recovered']}; API queue written at the "
        f"stop and restored: {read_json(run.run_dir / 'api_guard_stats.json').get('restored_groups')} groups",
    )
    # a third launch finds the run finished
    again = launch(f"trainer.total_training_steps={total}")
    assert again.wait_exit(120) == 0
    assert "already finished" in again.log_text()
