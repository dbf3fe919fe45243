"""The reference model and KL: values of a small batch against a hand computation, through the functions the trainer
and the actor call (verl's ``kl_penalty``, the actor's loss ``ppo_loss`` with its micro-batch metric aggregation,
``apply_kl_penalty`` inside ``RayAtroposTrainer._compute_advantages``), the role verl gives the reference (its own
engine, or the actor without adapters under LoRA), and the CPU runtime's fix that lets the reference engine shard.

The batch: one group of 2 sequences with 3 response tokens, the last token of the second masked out (5 trained
tokens), actor log-probs ``ACTOR`` and reference log-probs ``REF``:

    token              a0     a1     a2  |   b0     b1    b2 (masked)
    actor log π      -1.0   -0.5   -2.0  | -0.3   -0.7   -9.0
    ref log π_ref    -1.2   -0.5   -1.0  | -0.1   -1.0   -0.2
    k1 = log π - log π_ref
                      0.2    0.0   -1.0  | -0.2    0.3
    low_var_kl (k3) = exp(d) - d - 1 with d = log π_ref - log π
                   e^-0.2+0.2-1   0   e^1-1-1 | e^0.2-0.2-1   e^-0.3+0.3-1
                   = 0.0187308  0  0.7182818 | 0.0214028   0.0408182
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from verl import DataProto
from verl.trainer.ppo.core_algos import agg_loss, get_kl_controller, kl_penalty
from verl.trainer.ppo.utils import need_reference_policy
from verl.utils import tensordict_utils as tu
from verl.utils.config import omega_conf_to_dataclass
from verl.utils.metric import reduce_metrics
from verl.utils.py_functional import append_to_dict
from verl.workers.utils.losses import ppo_loss
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

import recipe.atropos.algos.losses  # noqa: F401  (registers the advantage_weighted_ce policy loss, as every worker does)
from recipe.atropos.config import atropos_config
from recipe.atropos.config.checks import share_rollout_correction_with_actor
from recipe.atropos.launcher.config import load_config
from recipe.atropos.setup.cpu_runtime import CPU_SETTINGS
from recipe.atropos.trainer import RayAtroposTrainer
from recipe.atropos.trainer.dataproto import scored_data_to_dataproto
from tests.factories import TINY_CONFIG, X

ACTOR = torch.tensor([[-1.0, -0.5, -2.0], [-0.3, -0.7, -9.0]])
REF = torch.tensor([[-1.2, -0.5, -1.0], [-0.1, -1.0, -0.2]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
K1 = [[0.2, 0.0, -1.0], [-0.2, 0.3, 0.0]]  # masked token: 0 (verl multiplies by the mask)
K3 = [
    [math.exp(-0.2) + 0.2 - 1, 0.0, math.exp(1.0) - 1.0 - 1],
    [math.exp(0.2) - 0.2 - 1, math.exp(-0.3) + 0.3 - 1, 0.0],
]
# token-mean over the 5 trained tokens (the actor's default loss_agg_mode)
K3_TOKEN_MEAN = (0.0187308 + 0.0 + 0.7182818 + 0.0214028 + 0.0408182) / 5  # = 0.1598467
K1_TOKEN_MEAN = (0.2 + 0.0 - 1.0 - 0.2 + 0.3) / 5  # = -0.14


def group(advantages: list[list[float]] | None = None) -> dict:
    """The two sequences: prompt token 1, then 3 response tokens; the env's inference_logprobs are ACTOR's."""
    g = {
        "tokens": [[1, 11, 12, 13], [1, 21, 22, 23]],
        "masks": [[X, 11, 12, 13], [X, 21, 22, X]],
        "scores": [1.0, 0.0],
        "inference_logprobs": [[0.0, *ACTOR[0].tolist()], [0.0, *ACTOR[1].tolist()]],
    }
    if advantages is not None:
        g["advantages"] = advantages
    return g


def as_run(*overrides: str) -> DictConfig:
    """The tiny config as main_atropos runs it on CPU, with ``overrides``."""
    config = load_config(TINY_CONFIG, ["actor_rollout_ref.model.path=/nonexistent/tiny", *overrides])
    for key, value in CPU_SETTINGS:
        OmegaConf.update(config, key, value, force_add=True)
    share_rollout_correction_with_actor(config)  # as RayAtroposTrainer.__init__ does
    OmegaConf.resolve(config)
    return config


# ---- verl's estimators ---------------------------------------------------------------------------------------------
def test_kl_estimators_and_token_mean_by_hand() -> None:
    assert kl_penalty(ACTOR, REF, "k1") * MASK == pytest.approx(torch.tensor(K1), abs=1e-6)
    assert kl_penalty(ACTOR, REF, "low_var_kl") * MASK == pytest.approx(torch.tensor(K3), abs=1e-6)
    assert float(agg_loss(kl_penalty(ACTOR, REF, "low_var_kl"), MASK, "token-mean")) == pytest.approx(
        K3_TOKEN_MEAN, abs=1e-6
    )
    assert float(agg_loss(kl_penalty(ACTOR, REF, "k1"), MASK, "token-mean")) == pytest.approx(K1_TOKEN_MEAN, abs=1e-6)
    # the reference is the initial policy: before any update both estimators are 0
    assert float(agg_loss(kl_penalty(ACTOR, ACTOR.clone(), "low_var_kl"), MASK, "token-mean")) == 0.0


# ---- the actor's KL loss (use_kl_loss) -----------------------------------------------------------------------------
def engine_log_probs(micro, log_probs: torch.Tensor) -> torch.Tensor:
    """What the model engine hands the loss for one micro-batch: per-token log-probs in the no-padding layout, shifted
    left by one (position t holds log π of token t+1)."""
    offsets = micro["input_ids"].offsets()
    prompt_len = micro["prompts"].shape[1]
    values = torch.zeros(int(offsets[-1]))
    for i in range(len(offsets) - 1):
        r = int(micro["attention_mask"][i, prompt_len:].sum())
        end = int(offsets[i + 1])
        values[end - r - 1 : end - 1] = log_probs[i, :r]
    nested = torch.nested.nested_tensor_from_jagged(values, offsets=offsets)
    assert torch.equal(no_padding_2_padding(nested, micro)[:, : log_probs.shape[1]], log_probs)  # the layout is right
    return nested


@pytest.mark.parametrize(("kl_loss_type", "expected"), [("low_var_kl", K3_TOKEN_MEAN), ("k1", K1_TOKEN_MEAN)])
def test_actor_kl_loss_metric_by_hand(kl_loss_type: str, expected: float) -> None:
    """verl's actor loss (``ppo_loss``) on two micro-batches of one sequence, its metrics merged as the worker merges
    them and reduced as the trainer does: ``actor/kl_loss`` is the token-mean over the whole mini-batch, and the loss
    adds ``kl_loss_coef`` times it (advantages 0: the policy term is 0)."""
    config = as_run(
        "actor_rollout_ref.actor.use_kl_loss=true",
        f"actor_rollout_ref.actor.kl_loss_type={kl_loss_type}",
        "actor_rollout_ref.actor.kl_loss_coef=0.1",
    )
    actor = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    assert actor.loss_agg_mode == "token-mean"
    batch = scored_data_to_dataproto([group()], max_prompt_length=1, max_response_length=3, pad_token_id=0)
    assert torch.equal(batch.batch["response_mask"], MASK)
    batch.batch["old_log_probs"] = ACTOR.clone()
    batch.batch["ref_log_prob"] = REF.clone()
    batch.batch["advantages"] = torch.zeros(2, 3)
    data = left_right_2_no_padding(batch.to_tensordict())  # as RayPPOTrainer._update_actor
    # as the trainer (global_batch_size = ppo_mini_batch_size) and FSDPEngine.forward_backward_batch set them
    tu.assign_non_tensor(data, global_batch_size=2, dp_size=1, batch_num_tokens=int(data["loss_mask"].sum()))
    metrics: dict = {}
    losses = []
    for micro, log_probs in zip(tu.chunk_tensordict(data, 2), ACTOR.chunk(2), strict=True):
        loss, micro_metrics = ppo_loss(actor, {"log_probs": engine_log_probs(micro, log_probs)}, micro)
        losses.append(float(loss))
        append_to_dict(metrics, micro_metrics)  # the engine's postprocess_batch_func
    reduced = reduce_metrics({f"actor/{k}": v for k, v in metrics.items()})  # the trainer's rename + reduce
    assert reduced["actor/kl_loss"] == pytest.approx(expected, abs=1e-6)
    assert reduced["actor/kl_coef"] == pytest.approx(0.1)
    assert sum(losses) == pytest.approx(0.1 * expected, abs=1e-6)


# ---- KL in the reward (use_kl_in_reward), through the trainer's stages ---------------------------------------------
def stub_trainer(config: DictConfig) -> RayAtroposTrainer:
    """A RayAtroposTrainer without workers: the attributes verl's __init__ sets for KL, and log-prob passes that
    return ``ACTOR`` (old) and ``REF`` (reference)."""
    # Private state, no public way: RayPPOTrainer.__init__ needs Ray worker groups and a resource pool, so the stages
    # are called on a trainer built without it, and its worker calls (_compute_ref/old_log_prob) are replaced.
    trainer = object.__new__(RayAtroposTrainer)
    trainer.config = config
    trainer.atropos = atropos_config(config)
    trainer.use_reference_policy = need_reference_policy(config)
    trainer.kl_ctrl_in_reward = get_kl_controller(config.algorithm.kl_ctrl)
    n = 4
    trainer._compute_ref_log_prob = lambda batch: DataProto.from_dict({"ref_log_prob": REF.repeat(n // 2, 1)})
    trainer._compute_old_log_prob = lambda batch: (
        DataProto.from_dict({"old_log_probs": ACTOR.repeat(n // 2, 1), "entropys": torch.zeros(n, 3)}),
        0.0,
    )
    return trainer


@pytest.mark.parametrize("bypass", [False, True])
def test_kl_in_reward_by_hand(bypass: bool) -> None:
    """``algorithm.use_kl_in_reward`` with verl's default ``kl_penalty: kl`` (k1) and a fixed coefficient 0.1.

    Rewards: score on the last trained token minus 0.1·k1 on every trained token. Sequence a: [0, 0, 1] − 0.1·[0.2, 0,
    −1.0] = [−0.02, 0, 1.1], sum 1.08; b: [0, 0, 0] − 0.1·[−0.2, 0.3, 0] = [0.02, −0.03, 0], sum −0.01. GRPO without
    std normalisation: mean 0.535, advantages +0.545 / −0.545 (without KL: +0.5 / −0.5). Metric: mean over sequences
    of the masked token-mean of k1: ((0.2 + 0 − 1.0)/3 + (−0.2 + 0.3)/2)/2 = −0.1083333.

    A second, identical group carries the environment's token-level advantages: it trains on them unchanged, the KL
    penalty in its rewards does not reach it. Bypass mode: no old-log-prob pass; the KL is taken against the
    environments' inference_logprobs (the behaviour policy), here equal to ACTOR.
    """
    config = as_run(
        "algorithm.use_kl_in_reward=true",
        "algorithm.kl_ctrl.kl_coef=0.1",
        "algorithm.norm_adv_by_std_in_grpo=false",
        f"algorithm.rollout_correction.bypass_mode={str(bypass).lower()}",
    )
    assert config.algorithm.kl_penalty == "kl" and config.algorithm.kl_ctrl.type == "fixed"
    trainer = stub_trainer(config)
    if bypass:
        trainer._compute_old_log_prob = lambda batch: pytest.fail("bypass mode runs no old-log-prob pass")
    env_adv = [[0.0, 0.5, 0.5, 0.5], [0.0, -0.5, -0.5, -0.5]]
    batch = scored_data_to_dataproto(
        [group(), group(advantages=env_adv)], max_prompt_length=1, max_response_length=3, pad_token_id=0
    )
    metrics: dict = {}
    timing: dict = {}
    batch = trainer._compute_log_probs(batch, metrics, timing)
    assert "ref" in timing  # logged as timing_s/ref
    assert torch.equal(batch.batch["ref_log_prob"], REF.repeat(2, 1))
    if bypass:
        assert torch.equal(batch.batch["old_log_probs"], batch.batch["rollout_log_probs"])
    batch = trainer._compute_advantages(batch, metrics)

    assert metrics["actor/reward_kl_penalty"] == pytest.approx(-0.1083333, abs=1e-6)
    assert metrics["actor/reward_kl_penalty_coeff"] == pytest.approx(0.1)
    rewards = torch.tensor([[-0.02, 0.0, 1.1], [0.02, -0.03, 0.0]]).repeat(2, 1)
    assert batch.batch["token_level_rewards"] == pytest.approx(rewards, abs=1e-6)
    advantages = torch.tensor([[0.545] * 3, [-0.545, -0.545, 0.0], [0.5] * 3, [-0.5, -0.5, 0.0]])
    assert batch.batch["advantages"] == pytest.approx(advantages, abs=1e-5)
    assert batch.non_tensor_batch["uid"][0] != batch.non_tensor_batch["uid"][2]


# ---- where the reference lives -------------------------------------------------------------------------------------
def test_reference_role_fused_or_actor_without_adapters() -> None:
    """verl's own role choice, as AtroposTaskRunner calls it: with KL on, the reference is a second engine in the
    actor's worker (ActorRolloutRef); with LoRA it is the actor with its adapters off (ActorRollout only: no second
    model); with KL off, no reference at all."""
    from verl.trainer.main_ppo_v0 import BaseTaskRunner
    from verl.trainer.ppo.ray_trainer import Role

    def roles(*overrides: str) -> set:
        runner = BaseTaskRunner()
        runner.add_actor_rollout_worker(as_run(*overrides))
        return set(runner.role_worker_mapping)

    assert roles("actor_rollout_ref.actor.use_kl_loss=true") == {Role.ActorRolloutRef}
    assert roles("algorithm.use_kl_in_reward=true") == {Role.ActorRolloutRef}
    assert roles("actor_rollout_ref.actor.use_kl_loss=true", "actor_rollout_ref.model.lora_rank=8") == {
        Role.ActorRollout
    }
    assert roles() == {Role.ActorRollout}
    assert not need_reference_policy(as_run())


def test_reference_engine_shards_on_cpu() -> None:
    """verl builds the reference (a forward-only engine) with FSDP2 ``CPUOffloadPolicy(pin_memory=True)``; without an
    accelerator torch cannot pin memory ("Cannot access accelerator device when none is available"). The CPU
    runtime's platform module (imported by every verl process) makes that policy unpinned there."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    import recipe.atropos.cpu.platform  # noqa: F401  (what VERL_USE_EXTERNAL_MODULES imports in every worker)

    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present: pinned memory works and nothing is changed")
    assert CPUOffloadPolicy(pin_memory=True).pin_memory is False
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    expected = module(torch.ones(2, 4)).detach()
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", store=dist.FileStore(str(Path(tmp) / "store"), 1), rank=0, world_size=1)
        try:
            fully_shard(module, mesh=init_device_mesh("cpu", (1,)), offload_policy=CPUOffloadPolicy(pin_memory=True))
            with torch.no_grad():
                out = module(torch.ones(2, 4))
        finally:
            dist.destroy_process_group()
    assert np.allclose(out.numpy(), expected.numpy())
