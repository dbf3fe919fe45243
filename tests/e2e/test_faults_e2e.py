"""Fault suite, process level: whole runs through the launcher (tiny config, real run-api/guard, envs, verl, Ray).

Each scenario asserts the run finishes its steps, counts what it rejected, loses nothing it had fetched (the spool's
``written == deleted + stale + pending``), and leaves no process behind. Each prints one row of the fault table
(``FAULT-TABLE`` lines in the captured output: run with ``-s`` to see them).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from recipe.atropos.launcher.report import read_metrics
from tests.helpers import launcher_argv, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def launch(run_dir: Path, model: Path, log: Path, *overrides: str) -> subprocess.Popen:
    argv = launcher_argv(model, run_dir, *overrides)
    return subprocess.Popen(argv, stdout=open(log, "a"), stderr=subprocess.STDOUT)  # noqa: SIM115


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


def child_with(proc: subprocess.Popen, needle: str) -> psutil.Process:
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if any(needle in part for part in child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no child process running {needle}")


def test_api_killed_mid_run_is_restarted_and_the_run_finishes(tmp_path: Path, tiny_model: Path, no_leftovers) -> None:
    total = 5
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    proc = launch(run_dir, tiny_model, log, f"trainer.total_training_steps={total}")
    wait_for(lambda: "step 2/" in log.read_text(), 600, "step 2", proc, log)
    before = accounting(run_dir)
    child_with(proc, "recipe.atropos.guard.app").kill()
    killed_at = time.monotonic()
    assert proc.wait(timeout=800) == 0, log.read_text()[-4000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    state = read_json(run_dir / "launcher_state.json")
    assert state["api_restarts"] == 1
    assert rows[-1]["atropos/reregistrations"] >= 1.0
    assert rows[-1]["atropos/api_restarts"] == 1.0
    acc = accounting(run_dir)
    assert_nothing_fetched_lost(acc)
    assert 0 <= lost_in_api(acc)
    # what the API held when it died (posted before the kill, not yet fetched) is the most that was lost
    lost_bound = before["posted"] - before["fetched"]
    table_row(
        "run-api killed after step 2",
        len(rows),
        total,
        acc,
        max_gap_s(rows),
        f"lost <= {lost_bound} groups (in the API's memory at the kill); restarts {state}; "
        f"run took {time.monotonic() - killed_at:.0f} s after the kill",
    )


def test_env_crash_is_restarted_and_the_run_finishes(tmp_path: Path, tiny_model: Path, no_leftovers) -> None:
    total = 4
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    proc = launch(run_dir, tiny_model, log, f"trainer.total_training_steps={total}")
    wait_for(lambda: "step 1/" in log.read_text(), 600, "step 1", proc, log)
    child_with(proc, "recipe.atropos.envs.one_word_env").kill()
    assert proc.wait(timeout=800) == 0, log.read_text()[-4000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    state = read_json(run_dir / "launcher_state.json")
    assert sum(state["env_restarts"].values()) == 1
    acc = accounting(run_dir)
    assert_nothing_fetched_lost(acc)
    assert lost_in_api(acc) == 0
    table_row("one env killed after step 1", len(rows), total, acc, max_gap_s(rows), f"restarts {state}")


def test_ctrl_c_then_resume_trains_the_spooled_groups(tmp_path: Path, tiny_model: Path, no_leftovers) -> None:
    total = 4
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    latest = run_dir / "checkpoints" / "latest_checkpointed_iteration.txt"
    proc = launch(run_dir, tiny_model, log, f"trainer.total_training_steps={total}", "trainer.save_freq=1")
    wait_for(lambda: latest.exists() and int(latest.read_text() or 0) >= 1, 600, "a checkpoint", proc, log)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    interrupted = accounting(run_dir)
    assert_nothing_fetched_lost(interrupted)
    step = int(latest.read_text())
    proc = launch(run_dir, tiny_model, log, f"trainer.total_training_steps={total}", "trainer.save_freq=1")
    assert proc.wait(timeout=800) == 0, log.read_text()[-4000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert int(rows[-1]["step"]) == total
    acc = accounting(run_dir)
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
        f"stop and restored: {read_json(run_dir / 'api_guard_stats.json').get('restored_groups')} groups",
    )
    # a third launch finds the run finished
    again = launch(run_dir, tiny_model, log, f"trainer.total_training_steps={total}")
    assert again.wait(timeout=120) == 0
    assert "already finished" in log.read_text()


def test_bad_groups_posted_mid_run_are_refused_and_the_run_finishes(
    tmp_path: Path, tiny_model: Path, no_leftovers
) -> None:
    """The four groups that ended or stalled a run before the guard: token id past the vocabulary, NaN score,
    a group of 5 in a batch of 8, an empty group."""
    import requests

    total = 3
    run_dir, log = tmp_path / "run", tmp_path / "launcher.log"
    proc = launch(run_dir, tiny_model, log, f"trainer.total_training_steps={total}")
    wait_for(lambda: "step 1/" in log.read_text(), 600, "step 1", proc, log)
    argv = child_with(proc, "recipe.atropos.guard.app").cmdline()
    url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
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
    assert proc.wait(timeout=800) == 0, log.read_text()[-4000:]
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [int(r["step"]) for r in rows] == list(range(1, total + 1))
    guard = read_json(run_dir / "api_guard_stats.json")
    assert guard["rejected"] == {"tokens": 2, "scores": 1, "group_size": 1}
    assert len((run_dir / "rejected_groups.jsonl").read_text().splitlines()) == 4
    assert "rejected 4 (group_size 1, scores 1, tokens 2" in (run_dir / "summary.txt").read_text()
    acc = accounting(run_dir)
    assert_nothing_fetched_lost(acc)
    assert lost_in_api(acc) == 0
    table_row("4 malformed groups posted after step 1", len(rows), total, acc, max_gap_s(rows), "all 4 got 422")
