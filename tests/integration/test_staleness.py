"""Training on stale rollouts: truncated-IS gradients by hand, the lag cap, the config rules, the lag histogram."""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from verl import DataProto
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.utils.config import omega_conf_to_dataclass

import recipe.atropos.algos.losses  # noqa: F401  (registers advantage_weighted_ce)
from recipe.atropos.sources.mixture import select_groups
from recipe.atropos.endpoint.server import CompletionLedger
from recipe.atropos.launch_atropos_verl_services import env_specs, load_config
from recipe.atropos.launcher.report import read_metrics
from recipe.atropos.launcher.processes import ManagedProcess, tail
from recipe.atropos.staleness import (
    check_staleness_config,
    is_weight_metrics,
    lag_histogram,
    promote_actor_is_metrics,
    share_rollout_correction_with_actor,
)
from recipe.atropos.trainer import check_atropos_config
from tests.helpers import launcher_argv

CONFIGS = Path(__file__).resolve().parents[2] / "recipe" / "atropos" / "config"
SHIPPED = ["atropos_grpo", "atropos_grpo_tiny", "atropos_grpo_cpu_demo", "atropos_grpo_gpu"]
TOKEN_TIS = {"rollout_is": "token", "rollout_is_threshold": 2.0, "bypass_mode": True}


def lag1_case() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two tokens sampled one update ago: π_rollout = (0.2, 0.6); the policy being trained gives (0.5, 0.3).

    Ratios π_θ/π_rollout = (2.5, 0.5) → truncated at C = 2: w = (2.0, 0.5)."""
    log_prob = torch.log(torch.tensor([[0.5, 0.3]])).requires_grad_(True)
    rollout = torch.log(torch.tensor([[0.2, 0.6]]))
    advantages = torch.tensor([[2.0, 2.0]])
    mask = torch.ones(1, 2)
    return log_prob, rollout, advantages, mask


def test_bypass_lag1_batch_gets_the_truncated_is_weighted_gradient() -> None:
    log_prob, rollout, adv, mask = lag1_case()
    fn = get_policy_loss_fn("advantage_weighted_ce")
    config = SimpleNamespace(global_batch_info={}, policy_loss={"rollout_correction": TOKEN_TIS})
    loss, metrics = fn(rollout, log_prob, adv, mask, loss_agg_mode="token-mean", config=config)
    # token-mean of -A·w·log π: -(2·2·log 0.5 + 2·0.5·log 0.3) / 2
    assert loss.item() == pytest.approx(-(4 * math.log(0.5) + 1 * math.log(0.3)) / 2)
    loss.backward()
    # d loss / d log π = -A·w / n_tokens = (-2·2/2, -2·0.5/2)
    assert torch.allclose(log_prob.grad, torch.tensor([[-2.0, -0.5]]))
    assert metrics["atropos/is_weight_mean"] == pytest.approx(1.25)
    assert metrics["atropos/is_weight_max"] == pytest.approx(2.0)
    assert metrics["atropos/is_truncated_fraction"] == pytest.approx(0.5)


def test_decoupled_lag1_batch_gets_the_same_gradient_from_the_trainers_weights() -> None:
    """Decoupled mode: the trainer computes w = min(π_old/π_rollout, C) once; one update starts at π_θ = π_old."""
    log_prob, rollout, adv, mask = lag1_case()
    batch = DataProto.from_dict(
        tensors={"old_log_probs": log_prob.detach().clone(), "rollout_log_probs": rollout, "response_mask": mask}
    )
    batch, corr_metrics = compute_rollout_correction_and_add_to_batch(batch, TOKEN_TIS | {"bypass_mode": False})
    weights = batch.batch["rollout_is_weights"]
    assert torch.allclose(weights, torch.tensor([[2.0, 0.5]]))
    assert is_weight_metrics(corr_metrics) == pytest.approx(
        {"atropos/is_weight_mean": 1.25, "atropos/is_weight_max": 2.0, "atropos/is_truncated_fraction": 0.5}
    )
    fn = get_policy_loss_fn("advantage_weighted_ce")
    config = SimpleNamespace(global_batch_info={}, policy_loss={"rollout_correction": TOKEN_TIS})
    loss, _ = fn(batch.batch["old_log_probs"], log_prob, adv, mask, config=config, rollout_is_weights=weights)
    loss.backward()
    assert torch.allclose(log_prob.grad, torch.tensor([[-2.0, -0.5]]))


def test_without_rollout_is_the_loss_stays_plain_reinforce() -> None:
    log_prob, rollout, adv, mask = lag1_case()
    fn = get_policy_loss_fn("advantage_weighted_ce")
    config = SimpleNamespace(global_batch_info={}, policy_loss={"rollout_correction": {"rollout_is": None}})
    loss, metrics = fn(rollout, log_prob, adv, mask, config=config)
    loss.backward()
    assert torch.allclose(log_prob.grad, torch.tensor([[-1.0, -1.0]]))
    assert "atropos/is_weight_mean" not in metrics


def test_a_group_over_the_lag_cap_is_dropped_and_counted() -> None:
    """Trainer at step 4 (3 updates done): versions 3, 1, 0 → lags 0, 2, 3; the default cap (2) drops lag 3."""
    max_lag = int(load_config(CONFIGS / "atropos_grpo.yaml", []).atropos.max_policy_lag)
    assert max_lag == 2
    ledger = CompletionLedger()
    groups = []
    for version, prompt in ((3, 10), (1, 20), (0, 30)):
        tokens = [[prompt, 1, 2], [prompt, 3, 4]]
        for t in tokens:
            ledger.record(t[:1], t[1:], version)
        groups.append({"tokens": tokens, "scores": [0.0, 1.0]})
    global_steps = 4

    def lag_of(tokens: list[int]) -> int | None:
        version = ledger.version_of(tokens)
        return None if version is None else (global_steps - 1) - version

    sel = select_groups(groups, batch_size=4, lag_of=lag_of, max_policy_lag=max_lag)
    assert sel.chosen == groups[:2] and sel.stale_groups_dropped == 1 and sel.carry == []
    assert sel.lags == [0, 0, 2, 2]
    assert lag_histogram(sel.lags) == {
        "atropos/policy_lag_0": 0.5,
        "atropos/policy_lag_1": 0.0,
        "atropos/policy_lag_2plus": 0.5,
    }


def test_lag_histogram_by_hand() -> None:
    assert lag_histogram([0, 1, 1, 2, 5]) == pytest.approx(
        {"atropos/policy_lag_0": 0.2, "atropos/policy_lag_1": 0.4, "atropos/policy_lag_2plus": 0.4}
    )
    assert lag_histogram([]) == {}


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_passes_the_staleness_rules(name: str) -> None:
    config = load_config(
        CONFIGS / f"{name}.yaml", ["actor_rollout_ref.model.path=/m", "trainer.total_training_steps=5"]
    )
    check_atropos_config(config)
    corr = config.algorithm.rollout_correction
    assert corr.rollout_is == "token" and float(corr.rollout_is_threshold) == 2.0
    assert config.atropos.max_policy_lag is not None


@pytest.mark.parametrize(
    "overrides",
    [["actor_rollout_ref.actor.ppo_mini_batch_size=16"], ["actor_rollout_ref.actor.ppo_epochs=2"]],
)
def test_advantage_weighted_ce_with_several_updates_is_refused_naming_vanilla(overrides: list[str]) -> None:
    config = load_config(CONFIGS / "atropos_grpo_cpu_demo.yaml", overrides)
    with pytest.raises(ValueError, match="loss_mode=vanilla"):
        check_staleness_config(config)
    vanilla = load_config(
        CONFIGS / "atropos_grpo_cpu_demo.yaml", [*overrides, "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"]
    )
    check_staleness_config(vanilla)  # PPO clip against the old policy: allowed


def test_lag_without_any_correction_is_refused() -> None:
    config = load_config(
        CONFIGS / "atropos_grpo.yaml",
        ["algorithm.rollout_correction.rollout_is=null", "algorithm.rollout_correction.bypass_mode=false"],
    )
    with pytest.raises(ValueError, match="rollout_is=token .* or atropos.max_policy_lag=0"):
        check_staleness_config(config)
    on_policy = load_config(
        CONFIGS / "atropos_grpo.yaml",
        [
            "algorithm.rollout_correction.rollout_is=null",
            "algorithm.rollout_correction.bypass_mode=false",
            "atropos.max_policy_lag=0",
        ],
    )
    check_staleness_config(on_policy)


def test_the_actor_workers_config_carries_the_rollout_correction() -> None:
    """The loss runs in the actor workers, which see only actor_rollout_ref: it must hold the IS settings."""
    config = load_config(CONFIGS / "atropos_grpo_cpu_demo.yaml", [])
    share_rollout_correction_with_actor(config)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    corr = actor.policy_loss.rollout_correction
    assert corr.get("rollout_is") == "token" and float(corr.get("rollout_is_threshold")) == 2.0
    assert corr.get("bypass_mode") is True


def test_launcher_keeps_envs_within_the_lag_cap() -> None:
    config = load_config(CONFIGS / "atropos_grpo_cpu_demo.yaml", [])
    argv = env_specs(config)[0].argv("http://a", "http://b", "/m", 64)
    flags = dict(zip(argv[4::2], argv[5::2], strict=True))
    assert flags["--env.max_batches_offpolicy"] == "1"  # max_policy_lag 2: one batch queued ahead + in-flight
    deeper = load_config(CONFIGS / "atropos_grpo_cpu_demo.yaml", ["atropos.max_policy_lag=4"])
    argv = env_specs(deeper)[0].argv("http://a", "http://b", "/m", 64)
    assert dict(zip(argv[4::2], argv[5::2], strict=True))["--env.max_batches_offpolicy"] == "3"
    on_policy = load_config(CONFIGS / "atropos_grpo_cpu_demo.yaml", ["atropos.max_policy_lag=0"])
    argv = env_specs(on_policy)[0].argv("http://a", "http://b", "/m", 64)
    assert dict(zip(argv[4::2], argv[5::2], strict=True))["--env.max_batches_offpolicy"] == "1"


def test_bypass_is_metrics_from_the_actor_get_the_short_names() -> None:
    metrics = {"actor/atropos/is_weight_mean": 1.1, "actor/atropos/is_weight_max": 2.0}
    promote_actor_is_metrics(metrics)
    assert metrics["atropos/is_weight_mean"] == 1.1 and metrics["atropos/is_weight_max"] == 2.0


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_bypass_mode_trains_end_to_end_without_the_old_log_prob_pass(tmp_path: Path, tiny_model: Path) -> None:
    """The demo's mode on the tiny config: the actor applies min(π_θ/π_rollout, 2) itself; no old-log-prob pass;
    the env's held-out evaluations land in the metrics file and the summary."""
    model = tiny_model
    run_dir = tmp_path / "run"
    # The tiny config, its first env evaluating on held-out questions every API step (env flag names hold dots, so
    # the YAML is edited rather than overridden).
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    shutil.copy(CONFIGS / "atropos_grpo_base.yaml", config_dir / "atropos_grpo_base.yaml")
    tiny = yaml.safe_load((CONFIGS / "atropos_grpo_tiny.yaml").read_text())
    tiny["atropos"]["launcher"]["envs"][0]["args"].update({"env.steps_per_eval": 1, "env.eval_questions": 2})
    (config_dir / "tiny_eval.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    argv = launcher_argv(
        model,
        run_dir,
        "trainer.total_training_steps=3",
        "algorithm.rollout_correction.bypass_mode=true",
        "atropos.final_eval_wait_s=300",
        config=config_dir / "tiny_eval.yaml",
    )
    launcher = ManagedProcess("launcher", argv, tmp_path / "launcher.log").start()
    try:
        deadline = 540.0
        while launcher.poll() is None and deadline > 0:
            time.sleep(1)
            deadline -= 1
        assert launcher.poll() == 0, tail(launcher.log_path, 80)
    finally:
        launcher.stop()
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
