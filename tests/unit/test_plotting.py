"""Summaries and plots of a metrics file holding trainer steps and env held-out evaluations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipe.atropos.launcher.report import plot_metrics, step_line, summarize
from recipe.atropos.metrics_file import held_out_points, read_metrics, trainer_rows
from recipe.atropos.rundir import RunDir


def mixed_rows(tmp_path: Path) -> list[dict]:
    """Base-model eval (step 0), 6 training steps, evals after steps 2 (two envs) and 6."""
    lines = [{"step": 0, "source": "env:a", "eval/a/held_out_success": 0.125, "eval/a/held_out_samples": 32}]
    for step, score in enumerate([0.2, 0.3, 0.4, 0.5, 0.6, 0.7], start=1):
        lines.append({"step": step, "atropos/mean_score": score, "response_length/mean": 10.0 - step})
        if step == 2:
            lines.append({"step": 2, "source": "env:a", "eval/a/held_out_success": 0.5})
            lines.append({"step": 2, "source": "env:b", "eval/b/held_out_success": 0.75})
    lines.append({"step": 6, "source": "env:a", "eval/a/held_out_success": 0.875, "eval/a/held_out_samples": 32})
    path = RunDir(tmp_path).metrics_file
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return read_metrics(path)


def test_held_out_points_average_envs_per_policy_version(tmp_path: Path) -> None:
    rows = mixed_rows(tmp_path)
    assert held_out_points(rows) == [(0, 0.125), (2, pytest.approx(0.625)), (6, 0.875)]
    assert [r["step"] for r in trainer_rows(rows)] == [1, 2, 3, 4, 5, 6]


def test_summary_reports_held_out_first_then_the_kept_group_mean(tmp_path: Path) -> None:
    # kept-group mean: first 5 steps (0.2..0.6) → 0.4, last 5 (0.3..0.7) → 0.5
    assert summarize(mixed_rows(tmp_path)) == (
        "held-out success 0.125 (step 0) -> 0.875 (step 6); "
        "kept-group mean score first 5 steps 0.400 -> last 5 steps 0.500 (6 steps)"
    )


def test_step_line_for_an_evaluation(tmp_path: Path) -> None:
    rows = mixed_rows(tmp_path)
    assert step_line(rows[0], 6) == "eval a after step 0 | held-out success 0.125 (32 samples)"
    assert step_line(rows[1], 6).startswith("step 1/6 | mean score 0.200")


def test_plot_has_both_curves(tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    saved = {}
    real_close = plt.close
    plt.close = lambda fig: saved.setdefault("fig", fig)  # keep the figure to inspect it
    try:
        out = plot_metrics(mixed_rows(tmp_path), tmp_path / "m.png")
    finally:
        plt.close = real_close
    assert out.stat().st_size > 0
    labels = [line.get_label() for line in saved["fig"].axes[0].get_lines()]
    assert labels == ["held-out success", "kept-group mean score (training batches)"]
    xs = list(saved["fig"].axes[0].get_lines()[0].get_xdata())
    assert xs == [0, 2, 6]
