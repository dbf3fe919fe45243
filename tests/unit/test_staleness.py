"""Training on stale rollouts: truncated-IS gradients by hand, the lag cap, the config rules."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from verl import DataProto
from verl.trainer.ppo.core_algos import get_policy_loss_fn
from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch
from verl.utils.config import omega_conf_to_dataclass

import recipe.atropos.algos.losses  # noqa: F401  (registers advantage_weighted_ce)
from recipe.atropos.algos.losses import is_weight_metrics
from recipe.atropos.config import atropos_config, check_atropos_config
from recipe.atropos.config.checks import check_staleness_config, share_rollout_correction_with_actor
from recipe.atropos.endpoint.ledger import CompletionLedger
from recipe.atropos.launcher.config import load_config
from recipe.atropos.sources.fifo import FifoBatcher
from recipe.atropos.staleness import LagMeter
from recipe.atropos.trainer.step_metrics import promote_actor_is_metrics
from tests.factories import CONFIG_DIR, TINY_CONFIG

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
    max_lag = atropos_config(load_config(CONFIG_DIR / "atropos_grpo.yaml", [])).max_policy_lag
    assert max_lag == 2
    ledger = CompletionLedger()
    groups = []
    for version, prompt in ((3, 10), (1, 20), (0, 30)):
        tokens = [[prompt, 1, 2], [prompt, 3, 4]]
        for t in tokens:
            ledger.record(t[:1], t[1:], version)
        groups.append({"tokens": tokens, "scores": [0.0, 1.0]})
    meter = LagMeter(ledger.sequence_version, max_lag)
    batcher = FifoBatcher(batch_size=4)
    batcher.add(groups)
    chosen = batcher.select(is_stale=lambda g: meter.is_stale(g, step=4))
    assert chosen == groups[:2] and batcher.stale_dropped == 1 and batcher.pending_groups() == []
    metrics = meter.metrics(chosen, step=4)
    assert (metrics["atropos/policy_lag_0"], metrics["atropos/policy_lag_1"], metrics["atropos/policy_lag_2plus"]) == (
        0.5,
        0.0,
        0.5,
    )
    assert metrics["atropos/policy_lag_mean"] == 1.0 and metrics["atropos/policy_lag_max"] == 2.0


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_passes_the_staleness_rules(name: str) -> None:
    config = load_config(
        CONFIG_DIR / f"{name}.yaml", ["actor_rollout_ref.model.path=/m", "trainer.total_training_steps=5"]
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
    config = load_config(CONFIG_DIR / "atropos_grpo_cpu_demo.yaml", overrides)
    with pytest.raises(ValueError, match="loss_mode=vanilla"):
        check_staleness_config(config, atropos_config(config))
    vanilla = load_config(
        CONFIG_DIR / "atropos_grpo_cpu_demo.yaml", [*overrides, "actor_rollout_ref.actor.policy_loss.loss_mode=vanilla"]
    )
    check_staleness_config(vanilla, atropos_config(vanilla))  # PPO clip against the old policy: allowed


def test_lag_without_any_correction_is_refused() -> None:
    config = load_config(
        CONFIG_DIR / "atropos_grpo.yaml",
        ["algorithm.rollout_correction.rollout_is=null", "algorithm.rollout_correction.bypass_mode=false"],
    )
    with pytest.raises(ValueError, match="rollout_is=token .* or atropos.max_policy_lag=0"):
        check_staleness_config(config, atropos_config(config))
    on_policy = load_config(
        CONFIG_DIR / "atropos_grpo.yaml",
        [
            "algorithm.rollout_correction.rollout_is=null",
            "algorithm.rollout_correction.bypass_mode=false",
            "atropos.max_policy_lag=0",
        ],
    )
    check_staleness_config(on_policy, atropos_config(on_policy))


def test_the_actor_workers_config_carries_the_rollout_correction() -> None:
    """The loss runs in the actor workers, which see only actor_rollout_ref: it must hold the IS settings."""
    config = load_config(CONFIG_DIR / "atropos_grpo_cpu_demo.yaml", [])
    share_rollout_correction_with_actor(config)
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    corr = actor.policy_loss.rollout_correction
    assert corr.get("rollout_is") == "token" and float(corr.get("rollout_is_threshold")) == 2.0
    assert corr.get("bypass_mode") is True


def test_bypass_is_metrics_from_the_actor_get_the_short_names() -> None:
    metrics = {"actor/atropos/is_weight_mean": 1.1, "actor/atropos/is_weight_max": 2.0}
    promote_actor_is_metrics(metrics)
    assert metrics["atropos/is_weight_mean"] == 1.1 and metrics["atropos/is_weight_max"] == 2.0


def test_an_estimator_other_than_grpo_is_refused_naming_grpo() -> None:
    """The trainer never calls verl's compute_advantage: an estimator it would ignore (or gae's critic) is refused."""
    for estimator in ("gae", "rloo"):
        config = load_config(
            TINY_CONFIG,
            ["actor_rollout_ref.model.path=/m", f"algorithm.adv_estimator={estimator}"],
        )
        with pytest.raises(ValueError, match="use algorithm.adv_estimator=grpo"):
            check_atropos_config(config)
