"""Summaries and plots of a metrics file holding trainer steps and env held-out evaluations."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from recipe.atropos.launcher.report import MetricsPlot, plot_metrics, step_line, summarize, write_run_report
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


def test_the_plot_is_redrawn_at_each_new_evaluation_only(tmp_path: Path) -> None:
    """As the launcher's look at the run calls it: rows 0..k of the metrics file, growing."""
    rows = mixed_rows(tmp_path)  # eval rows at indexes 0, 3, 4 and 8 (evaluations after steps 0, 2, 2, 6)
    plot = MetricsPlot(tmp_path / "metrics.png", "tiny")
    drawn = [k for k in range(1, len(rows) + 1) if plot.refresh(rows[:k]) is not None]
    assert drawn == [1, 4, 5, 10]  # the first row is an evaluation; then each new evaluation row, no training step
    assert plot.evals_drawn == 4 and plot.path.stat().st_size > 0 and plot.failures == 0
    assert plot.draw([]) is None  # nothing recorded: no plot


def test_a_failing_plot_is_logged_and_counted_never_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rows = mixed_rows(tmp_path)
    folder = tmp_path / "a_folder.png"
    folder.mkdir()  # savefig cannot write over a folder
    plot = MetricsPlot(folder, "tiny")
    assert plot.refresh(rows) is None and plot.failures == 1
    assert plot.last_error.startswith("IsADirectoryError: ")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as without the demo extra: import matplotlib fails
    assert plot.draw(rows) is None and plot.failures == 2
    assert plot.last_error.startswith("ModuleNotFoundError: import of matplotlib halted")
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "ERROR"] == [
        f"could not plot {folder} (failure 1)",
        f"could not plot {folder} (failure 2)",
    ]
    summary = write_run_report(RunDir(tmp_path), "tiny", 0, 0, plot=plot)  # the run's report still comes
    assert summary.splitlines()[-1] == f"a_folder.png: 3 plot failures, the last: {plot.last_error}"
