"""The metrics file of a run (``atropos.metrics_file``): its line format, and the trainer/env evaluation sync.

The file holds two kinds of JSON lines: the trainer's, one per training step (``atropos/mean_score`` is the mean
score of the groups that step *kept*: envs drop identical-score groups, so it is not the policy's score), and the
environments' held-out evaluations (``"source": "env:<name>"``, ``step`` = the policy version evaluated, i.e. the
weights after that many training steps; ``eval/<name>/held_out_success``). Both carry ``time``: when the line was
written, in Unix seconds.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from recipe.atropos.polling import poll_until
from recipe.atropos.records import append_jsonl, read_jsonl

SCORE = "atropos/mean_score"
LENGTH = "response_length/mean"
HELD_OUT_SUFFIX = "/held_out_success"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """One dict per line, trainer steps and env evaluations alike (a half-written last line is skipped)."""
    return [row for row in read_jsonl(path) if isinstance(row, dict)]


def append_metrics_row(path: Path, metrics: dict[str, Any]) -> None:
    """Append one JSON line: the numeric values of ``metrics`` (``step`` first) and ``time`` (now, Unix seconds)."""
    row: dict[str, Any] = {"step": metrics.get("step"), "time": time.time()}
    row.update({k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, int | float | np.number)})
    append_jsonl(path, [row])


def is_eval_row(row: dict[str, Any]) -> bool:
    """An environment's evaluation line (not a training step)."""
    return str(row.get("source", "")).startswith("env:")


def trainer_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in rows if not is_eval_row(r)]


def held_out_points(rows: list[dict[str, Any]]) -> list[tuple[int, float]]:
    """(policy version, held-out success) per evaluation, sorted by version; several envs are averaged per version."""
    by_step: dict[int, list[float]] = {}
    for row in rows:
        if not is_eval_row(row) or row.get("step") is None:
            continue
        for key, value in row.items():
            if key.endswith(HELD_OUT_SUFFIX) and isinstance(value, int | float) and not math.isnan(value):
                by_step.setdefault(int(row["step"]), []).append(float(value))
    return [(step, sum(v) / len(v)) for step, v in sorted(by_step.items())]


def wait_for_evaluation(path: Path, version: int, timeout_s: float, poll_s: float = 1.0) -> bool:
    """Wait until an environment's evaluation of policy ``version`` (or later) is in the metrics file ``path``;
    False after ``timeout_s``."""

    def evaluated() -> bool:
        return any(step >= version for step, _ in held_out_points(read_metrics(path)))

    return bool(poll_until(evaluated, timeout_s, poll_s))
