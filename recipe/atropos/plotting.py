"""Per-step metrics of a run (the trainer's ``atropos.metrics_file``): read, summarise, plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCORE = "atropos/mean_score"
LENGTH = "response_length/mean"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """One dict per step (JSON lines; a half-written last line is skipped)."""
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def step_line(row: dict[str, Any], total_steps: int) -> str:
    """``step 3/15 | mean score 0.412 | response length 12.3 | 31.2 s``."""
    return (
        f"step {int(row['step'])}/{total_steps} | mean score {row.get(SCORE, float('nan')):.3f} | "
        f"response length {row.get(LENGTH, float('nan')):.1f} | {row.get('timing_s/step', float('nan')):.1f} s"
    )


def summarize(rows: list[dict[str, Any]], window: int = 5) -> str:
    """``mean score first 5 steps 0.113 -> last 5 steps 0.871 (15 steps)``."""
    scores = [r[SCORE] for r in rows if SCORE in r]
    if not scores:
        return "no steps recorded"
    k = min(window, len(scores))
    first, last = sum(scores[:k]) / k, sum(scores[-k:]) / k
    return f"mean score first {k} steps {first:.3f} -> last {k} steps {last:.3f} ({len(scores)} steps)"


def plot_metrics(rows: list[dict[str, Any]], out_png: Path, title: str = "GRPO on Atropos") -> Path:
    """Mean score and mean response length per step, two panels, written to ``out_png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [r.get(SCORE, float("nan")) for r in rows], marker="o")
    top.set_ylabel("mean score")
    top.set_ylim(-0.05, 1.05)
    top.set_title(title)
    top.grid(alpha=0.3)
    bottom.plot(steps, [r.get(LENGTH, float("nan")) for r in rows], marker="o", color="tab:orange")
    bottom.set_ylabel("response length (tokens)")
    bottom.set_xlabel("training step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
