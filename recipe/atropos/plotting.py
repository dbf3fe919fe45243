"""Per-step metrics of a run (the trainer's ``atropos.metrics_file``): read, summarise, plot.

The file holds two kinds of JSON lines: the trainer's, one per training step (``atropos/mean_score`` is the mean
score of the groups that step *kept*: envs drop identical-score groups, so it is not the policy's score), and the
environments' held-out evaluations (``"source": "env:<name>"``, ``step`` = the policy version evaluated, i.e. the
weights after that many training steps; ``eval/<name>/held_out_success``). Both carry ``time``: when the line was
written, in Unix seconds.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

SCORE = "atropos/mean_score"
LENGTH = "response_length/mean"
HELD_OUT_SUFFIX = "/held_out_success"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """One dict per line, trainer steps and env evaluations alike (a half-written last line is skipped)."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def append_metrics_row(path: Path, metrics: dict[str, Any]) -> None:
    """Append one JSON line: the numeric values of ``metrics`` (``step`` first) and ``time`` (now, Unix seconds)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    row: dict[str, Any] = {"step": metrics.get("step"), "time": time.time()}
    row.update({k: float(v) for k, v in metrics.items() if k != "step" and isinstance(v, int | float | np.number)})
    with open(path, "a") as fh:  # one short write: appends stay whole lines
        fh.write(json.dumps(row) + "\n")


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
    deadline = time.monotonic() + timeout_s
    while True:
        if any(step >= version for step, _ in held_out_points(read_metrics(path))):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def step_line(row: dict[str, Any], total_steps: int) -> str:
    """``step 3/15 | mean score 0.412 | response length 12.3 | 31.2 s``, or for an evaluation line
    ``eval one_word after step 3 | held-out success 0.625 (32 samples)``."""
    if is_eval_row(row):
        name = str(row["source"]).removeprefix("env:")
        success = row.get(f"eval/{name}{HELD_OUT_SUFFIX}", float("nan"))
        samples = row.get(f"eval/{name}/held_out_samples", float("nan"))
        return f"eval {name} after step {row.get('step')} | held-out success {success:.3f} ({samples:.0f} samples)"
    return (
        f"step {int(row['step'])}/{total_steps} | mean score {row.get(SCORE, float('nan')):.3f} | "
        f"response length {row.get(LENGTH, float('nan')):.1f} | {row.get('timing_s/step', float('nan')):.1f} s"
    )


def summarize(rows: list[dict[str, Any]], window: int = 5) -> str:
    """Held-out success first → last (when the envs evaluated), then the kept-group mean score:
    ``held-out success 0.170 (step 0) -> 0.940 (step 10); mean score first 5 steps 0.113 -> last 5 steps 0.871
    (15 steps)``."""
    scores = [r[SCORE] for r in trainer_rows(rows) if SCORE in r]
    if not scores:
        return "no steps recorded"
    k = min(window, len(scores))
    first, last = sum(scores[:k]) / k, sum(scores[-k:]) / k
    line = f"mean score first {k} steps {first:.3f} -> last {k} steps {last:.3f} ({len(scores)} steps)"
    held = held_out_points(rows)
    if held:
        (s0, v0), (s1, v1) = held[0], held[-1]
        line = f"held-out success {v0:.3f} (step {s0}) -> {v1:.3f} (step {s1}); kept-group {line}"
    return line


def plot_metrics(rows: list[dict[str, Any]], out_png: Path, title: str = "GRPO on Atropos") -> Path:
    """Top: held-out success (when evaluated) beside the kept-group mean score; bottom: response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = trainer_rows(rows)
    steps = [r["step"] for r in train]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    held = held_out_points(rows)
    if held:
        top.plot([s for s, _ in held], [v for _, v in held], marker="s", color="tab:green", label="held-out success")
    top.plot(
        steps,
        [r.get(SCORE, float("nan")) for r in train],
        marker="o",
        color="tab:blue",
        label="kept-group mean score (training batches)",
    )
    top.set_ylabel("score")
    top.set_ylim(-0.05, 1.05)
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(loc="lower right")
    bottom.plot(steps, [r.get(LENGTH, float("nan")) for r in train], marker="o", color="tab:orange")
    bottom.set_ylabel("response length (tokens)")
    bottom.set_xlabel("training step (held-out: policy after that many steps)")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
