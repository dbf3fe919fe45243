"""Split placement's keys and checks (``actor_rollout_ref.hybrid_engine=false``), on the tiny config as the CPU runtime
runs it."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from recipe.atropos.config import check_atropos_config
from recipe.atropos.launcher.config import load_config
from recipe.atropos.setup.cpu_runtime import apply_cpu_runtime
from recipe.atropos.setup.placement import is_split, rollout_devices, trainer_devices
from recipe.atropos.setup.weight_sync import GLOO_BACKEND, GLOO_MODULE
from recipe.atropos.trainer.split_workers import HybridEngineFlag, swap_holds_requests
from tests.factories import TINY_CONFIG

SPLIT = ["actor_rollout_ref.hybrid_engine=false", "actor_rollout_ref.rollout.nnodes=1"]


def tiny(*overrides: str):
    return load_config(TINY_CONFIG, ["actor_rollout_ref.model.path=/nonexistent", *overrides])


def test_colocated_is_the_default_and_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATROPOS_CPU_THREADS", raising=False)
    config = tiny()
    apply_cpu_runtime(config)
    assert not is_split(config) and rollout_devices(config) == 0
    assert config.actor_rollout_ref.rollout.checkpoint_engine.backend == "naive"
    assert config.ray_kwargs.ray_init.num_gpus == 1
    assert swap_holds_requests(config)  # the endpoint is held while the actor computes


def test_split_on_cpu_gets_the_gloo_engine_a_device_per_pool_and_a_core_each(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATROPOS_CPU_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    config = tiny(*SPLIT)
    apply_cpu_runtime(config)
    engine = config.actor_rollout_ref.rollout.checkpoint_engine
    assert is_split(config) and (engine.backend, engine.custom_backend_module) == (GLOO_BACKEND, GLOO_MODULE)
    assert trainer_devices(config) == rollout_devices(config) == 1
    assert config.ray_kwargs.ray_init.num_gpus == 2  # a logical GPU for each pool
    import os

    assert os.environ["ATROPOS_CPU_THREADS"] == "4"  # 8 cores / 2 devices
    assert not swap_holds_requests(config)  # hf_cpu tags completions: swaps run under requests
    OmegaConf.update(config, "actor_rollout_ref.rollout.name", "vllm_cpu")
    assert swap_holds_requests(config)  # vLLM cannot: the endpoint holds requests for the swap
    check_atropos_config(config)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["actor_rollout_ref.hybrid_engine=false"], "actor_rollout_ref.rollout.nnodes"),
        ([*SPLIT, "atropos.max_policy_lag=0"], "atropos.max_policy_lag>=1"),
        ([*SPLIT, "actor_rollout_ref.model.lora_rank=8"], "lora.merge=true"),
    ],
)
def test_split_combinations_that_cannot_train_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("=", "=")):
        check_atropos_config(tiny(*overrides))


def test_the_hybrid_engine_flag_reads_true_inside_verls_constructor_only() -> None:
    config = tiny(*SPLIT)
    with HybridEngineFlag(config) as split:
        assert split and config.actor_rollout_ref.hybrid_engine is True
    assert config.actor_rollout_ref.hybrid_engine is False
    colocated = tiny()
    with HybridEngineFlag(colocated) as split:
        assert not split and colocated.actor_rollout_ref.hybrid_engine is True
