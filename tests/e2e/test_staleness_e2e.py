"""Bypass mode end to end: the actor applies the truncated IS weights itself, no old-log-prob pass; the env's
held-out evaluations reach the metrics file and the summary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from recipe.atropos.launcher.processes import tail
from recipe.atropos.metrics_file import read_metrics

CONFIGS = Path(__file__).resolve().parents[2] / "recipe" / "atropos" / "config"


@pytest.mark.timeout(600)
def test_bypass_mode_trains_end_to_end_without_the_old_log_prob_pass(tmp_path: Path, launch) -> None:
    """The demo's mode on the tiny config: the actor applies min(π_θ/π_rollout, 2) itself; no old-log-prob pass;
    the env's held-out evaluations land in the metrics file and the summary."""
    # The tiny config, its first env evaluating on held-out questions every API step (env flag names hold dots, so
    # the YAML is edited rather than overridden).
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    shutil.copy(CONFIGS / "atropos_grpo_base.yaml", config_dir / "atropos_grpo_base.yaml")
    tiny = yaml.safe_load((CONFIGS / "atropos_grpo_tiny.yaml").read_text())
    tiny["atropos"]["launcher"]["envs"][0]["args"].update({"env.steps_per_eval": 1, "env.eval_questions": 2})
    (config_dir / "tiny_eval.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    run = launch(
        "trainer.total_training_steps=3",
        "algorithm.rollout_correction.bypass_mode=true",
        "atropos.final_eval_wait_s=300",
        config=config_dir / "tiny_eval.yaml",
    )
    run_dir = run.run_dir
    assert run.wait_exit(540) == 0, tail(run.log, 80)
    rows = read_metrics(run_dir / "metrics.jsonl")
    evals = [r for r in rows if r.get("source") == "env:one_word"]
    rows = [r for r in rows if "source" not in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    # held-out evaluations reach the trainer's metrics file: one at start-up (base model, version 0), then more
    assert evals and evals[0]["step"] == 0 and evals[0]["eval/one_word/held_out_samples"] == 8
    # ... and the last one measured the final policy: the trainer kept serving it until the env had (final_eval_wait_s)
    assert evals[-1]["step"] == 3, [e["step"] for e in evals]
    assert "no environment evaluated the final policy" not in (run_dir / "logs" / "trainer.log").read_text()
    assert all(0.0 <= r["eval/one_word/held_out_success"] <= 1.0 for r in evals)
    assert (run_dir / "summary.txt").read_text().startswith("held-out success ")
    for row in rows:
        assert "timing_s/old_log_prob" not in row  # skipped: the rollout's log-probs are the behaviour policy
        assert 0.0 < row["atropos/is_weight_mean"] <= 2.0 and row["atropos/is_weight_max"] <= 2.0
        assert 0.0 <= row["atropos/is_truncated_fraction"] <= 1.0
        lags = [row["atropos/policy_lag_0"], row["atropos/policy_lag_1"], row["atropos/policy_lag_2plus"]]
        assert sum(lags) == pytest.approx(1.0)
