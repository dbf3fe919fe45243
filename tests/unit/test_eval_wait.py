"""``atropos.eval_wait_s``: before each update the trainer waits until an env's evaluation of the policy version the
endpoint serves is in the metrics file (``RayAtroposTrainer._wait_for_evaluation``, a documented stage hook), so no
evaluation straddles a weight push; it goes on with a warning when none comes."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from recipe.atropos.config.atropos_config import AtroposConfig
from recipe.atropos.metrics_file import append_jsonl
from recipe.atropos.trainer.ray_trainer import RayAtroposTrainer


def evaluation(version: int) -> dict:
    return {"step": version, "source": "env:one_word", "eval/one_word/held_out_success": 0.5}


def stage(path: Path | None, version: int, wait_s: float, online: bool = True) -> SimpleNamespace:
    """What the hook reads of the trainer: the typed block and the endpoint's policy version."""
    atropos = SimpleNamespace(eval_wait_s=wait_s, metrics_file=str(path) if path else None)
    return SimpleNamespace(atropos=atropos, endpoint=SimpleNamespace(policy_version=version) if online else None)


def test_the_update_waits_until_the_served_version_is_evaluated(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, [{"step": 1, "timing_s/step": 3.0}, evaluation(1)])  # the trainer's row, the last evaluation
    timer = threading.Timer(1.5, append_jsonl, (path, [evaluation(2)]))
    timer.start()
    timing: dict[str, float] = {}
    started = time.monotonic()
    RayAtroposTrainer._wait_for_evaluation(stage(path, version=2, wait_s=30), timing)
    timer.join()
    assert 1.5 <= time.monotonic() - started < 10  # not before version 2's evaluation; soon after it (1 s polls)
    assert timing["eval_wait"] >= 1.5


def test_no_evaluation_in_time_warns_and_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    append_jsonl(path, [evaluation(0)])
    with caplog.at_level(logging.WARNING):
        RayAtroposTrainer._wait_for_evaluation(stage(path, version=1, wait_s=1), {})
    assert "no environment evaluated policy version 1 within atropos.eval_wait_s=1 s" in caplog.text


@pytest.mark.parametrize(("wait_s", "online", "has_file"), [(0, True, True), (30, False, True), (30, True, False)])
def test_off_offline_or_without_a_metrics_file_it_does_not_wait(
    tmp_path: Path, wait_s: float, online: bool, has_file: bool
) -> None:
    timing: dict[str, float] = {}
    path = tmp_path / "metrics.jsonl" if has_file else None
    RayAtroposTrainer._wait_for_evaluation(stage(path, version=3, wait_s=wait_s, online=online), timing)
    assert timing == {}


def test_negative_seconds_are_refused() -> None:
    with pytest.raises(ValueError, match="atropos.eval_wait_s=-1"):
        AtroposConfig(eval_wait_s=-1)
