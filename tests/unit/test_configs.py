"""Every shipped config composes and passes verl's own ``validate_config``, as the trainer would run it."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

from recipe.atropos.launch_atropos_verl_services import load_config
from recipe.atropos.runtime import CPU_SETTINGS
from recipe.atropos.runtime.gpu import FLASH_ATTN_INSTALL, check_gpu_runtime, flash_attn_importable, needs_flash_attn

CONFIGS = Path(__file__).resolve().parents[2] / "recipe" / "atropos" / "config"
# Primary configs (the base sets no Hydra search path and is only extended).
SHIPPED = sorted(p.stem for p in CONFIGS.glob("atropos_grpo*.yaml") if p.stem != "atropos_grpo_base")


def _as_run(name: str):
    """The config as main_atropos runs it: the CPU runtime's settings for CPU configs, as-is for the GPU one."""
    config = load_config(CONFIGS / f"{name}.yaml", [])
    if name != "atropos_grpo_gpu":
        for key, value in CPU_SETTINGS:
            OmegaConf.update(config, key, value, force_add=True)
    OmegaConf.resolve(config)
    return config


def test_the_list_of_shipped_configs_is_the_documented_one() -> None:
    assert {"atropos_grpo", "atropos_grpo_tiny", "atropos_grpo_cpu_demo", "atropos_grpo_gpu"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_passes_verls_validate_config(name: str) -> None:
    config = _as_run(name)
    assert not need_critic(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=False)


def test_gpu_config_fits_one_gpu_and_keeps_bounded_checkpoints() -> None:
    config = _as_run("atropos_grpo_gpu")
    assert config.trainer.n_gpus_per_node == 1 and config.trainer.nnodes == 1
    assert config.trainer.max_actor_ckpt_to_keep == 2
    assert config.actor_rollout_ref.rollout.agent.num_workers == 1 and config.reward.num_workers == 1
    assert 0 < config.actor_rollout_ref.rollout.gpu_memory_utilization <= 0.4
    assert config.atropos.inference.served_model_name is None  # vllm_http asks vLLM for its served name
    # One optimizer step per batch (the advantage-weighted CE is an on-policy loss; IS corrects the lag).
    assert config.actor_rollout_ref.actor.ppo_mini_batch_size == config.data.train_batch_size
    assert config.algorithm.rollout_correction.rollout_is == "token"


def test_gpu_config_needs_flash_attn_and_says_how_to_install_it() -> None:
    config = _as_run("atropos_grpo_gpu")
    assert needs_flash_attn(config)
    if flash_attn_importable():
        pytest.skip("flash-attn is installed here: nothing to refuse")
    with pytest.raises(RuntimeError, match="flash-attn==2.8.3 --no-build-isolation"):
        check_gpu_runtime(config)
    assert FLASH_ATTN_INSTALL in str(pytest.raises(RuntimeError, check_gpu_runtime, config).value)


def test_gpu_config_without_remove_padding_and_with_sdpa_needs_no_flash_attn() -> None:
    config = load_config(
        CONFIGS / "atropos_grpo_gpu.yaml",
        [
            "actor_rollout_ref.model.use_remove_padding=false",
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa",
        ],
    )
    assert not needs_flash_attn(config)
    check_gpu_runtime(config)  # no error


def test_cpu_runtime_turns_flash_attn_off() -> None:
    assert not needs_flash_attn(_as_run("atropos_grpo_cpu_demo"))


@pytest.mark.parametrize(("rollout", "accepted"), [("vllm", True), ("vllm_cpu", True), ("hf_cpu", False)])
def test_vllm_http_backend_needs_a_vllm_rollout(rollout: str, accepted: bool) -> None:
    from recipe.atropos.config.checks import check_atropos_config

    config = load_config(
        CONFIGS / "atropos_grpo_tiny.yaml",
        [
            "actor_rollout_ref.model.path=/m",
            "atropos.inference.backend=vllm_http",
            f"actor_rollout_ref.rollout.name={rollout}",
        ],
    )
    if accepted:
        check_atropos_config(config)
    else:
        with pytest.raises(ValueError, match="vllm_http needs a vLLM rollout"):
            check_atropos_config(config)
