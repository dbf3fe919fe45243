"""Bypass mode with the rollout split from the actor, end to end: the actor applies the truncated IS weights itself, no
old-log-prob pass, while the hf_cpu replica keeps serving the environments on a device of its own and gets each update
through the gloo checkpoint engine; the env's held-out evaluations reach the metrics file and the summary."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml

from recipe.atropos.launcher.processes import tail
from recipe.atropos.metrics_file import read_metrics
from tests.helpers import checkpoint_state

CONFIGS = Path(__file__).resolve().parents[2] / "recipe" / "atropos" / "config"


def model_bytes(model_dir: Path) -> tuple[int, int]:
    """(bytes, tensors) of the model's weights as the actor sends them (its state dict, fp32 on CPU)."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    return sum(t.numel() * t.element_size() for t in state.values()), len(state)


@pytest.mark.timeout(600)
def test_bypass_mode_with_a_split_rollout_trains_end_to_end(tmp_path: Path, launch, tiny_model: Path) -> None:
    """The demo's mode on the tiny config: the actor applies min(π_θ/π_rollout, 2) itself; no old-log-prob pass;
    the env's held-out evaluations land in the metrics file and the summary. Split placement: the endpoint never
    holds a request; after every swap the replica samples with the weights the actor checkpointed at that step."""
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
        "actor_rollout_ref.hybrid_engine=false",
        "actor_rollout_ref.rollout.nnodes=1",
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
    # ---- split placement ---------------------------------------------------------------------------------------
    trainer_log = (run_dir / "logs" / "trainer.log").read_text()
    assert "split placement: actor on 1 x 1 devices, 1 rollout replica(s) on 1 x 1, weights via gloo" in trainer_log
    payload, n_tensors = model_bytes(tiny_model)
    for row in rows:
        step = int(row["step"])
        assert row["atropos/endpoint/paused_s"] == 0.0  # the gate never held a request: envs were always served
        assert "timing_s/pause_endpoint" not in row
        # one load at start-up and one per step, now serving this step's policy
        assert row["rollout/0/probe_weight_loads"] == step + 1
        assert row["rollout/0/policy_version"] == row["atropos/policy_version"] == step
        # the whole model crossed the gloo engine (buckets add at most 15 alignment bytes per tensor)
        sent = row["atropos/weight_sync/megabytes"] * 2**20
        assert payload <= sent <= payload + 15 * n_tensors
        # the replica's probe module holds exactly what the actor checkpointed at this step
        state = checkpoint_state(run_dir, step)
        (name,) = [k for k in state if k.endswith("layers.0.self_attn.q_proj.weight")]
        expected = float(state[name].to(torch.float64).sum())
        assert row["rollout/0/probe_module_weight_checksum"] == pytest.approx(expected, abs=1e-9)
        # held = the replica's weight-load time (no gate pause), a fraction of the step
        held, step_s = row["atropos/endpoint/held_s"], row["timing_s/step"]
        assert 0.0 < held < step_s and row["atropos/endpoint/paused_fraction"] == pytest.approx(held / step_s)
    served = [row["atropos/endpoint/completions_during_update"] for row in rows]
    print(f"split: completions served during the actor's updates per step {served}")
