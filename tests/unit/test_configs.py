"""Every shipped config composes and passes verl's own ``validate_config``, as the trainer would run it; the base
YAML's ``atropos:`` block repeats the defaults of ``AtroposConfig`` exactly."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import yaml
from omegaconf import OmegaConf
from verl.trainer.ppo.utils import need_critic, need_reference_policy
from verl.utils.config import validate_config

from recipe.atropos.config import AtroposConfig, atropos_config, check_atropos_config
from recipe.atropos.launcher.config import load_config
from recipe.atropos.setup.cpu_runtime import CPU_SETTINGS
from recipe.atropos.setup.gpu import FLASH_ATTN_INSTALL, check_gpu_runtime, flash_attn_importable, needs_flash_attn
from recipe.atropos.setup.placement import is_split, rollout_devices, trainer_devices
from tests.factories import CONFIG_DIR, TINY_CONFIG

# Configs to run (the base is only extended).
SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("atropos_grpo*.yaml") if p.stem != "atropos_grpo_base")


def _as_run(name: str):
    """The config as main_atropos runs it: the CPU runtime's settings for CPU configs, as-is for the GPU one."""
    config = load_config(CONFIG_DIR / f"{name}.yaml", [])
    if name != "atropos_grpo_gpu":
        for key, value in CPU_SETTINGS:
            OmegaConf.update(config, key, value, force_add=True)
    OmegaConf.resolve(config)
    return config


def test_the_list_of_shipped_configs_is_the_documented_one() -> None:
    assert {"atropos_grpo", "atropos_grpo_tiny", "atropos_grpo_cpu_demo", "atropos_grpo_gpu"} <= set(SHIPPED)
    # every YAML shipped is a primary config (checked below) or the base they all extend
    assert {p.stem for p in CONFIG_DIR.glob("*.yaml")} == {*SHIPPED, "atropos_grpo_base"}
    for name in SHIPPED:  # each extends the base, directly or through another shipped config
        defaults = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())["defaults"]
        assert "atropos_grpo_base" in defaults or set(defaults) & set(SHIPPED), name


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_passes_verls_validate_config(name: str) -> None:
    config = _as_run(name)
    assert not need_critic(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=False)
    atropos_config(config)  # the typed `atropos` block accepts it (unknown keys, wrong types, bad values raise)


def test_gpu_config_fits_one_gpu_and_keeps_bounded_checkpoints() -> None:
    config = _as_run("atropos_grpo_gpu")
    assert config.trainer.n_gpus_per_node == 1 and config.trainer.nnodes == 1
    assert config.trainer.max_actor_ckpt_to_keep == 2
    # verl's agent and reward loops are not used: no worker processes for them (the base config)
    assert config.actor_rollout_ref.rollout.agent.num_workers == 0 and config.reward.num_workers == 0
    assert 0 < config.actor_rollout_ref.rollout.gpu_memory_utilization <= 0.4
    assert config.atropos.inference.served_model_name is None  # vllm_http asks vLLM for its served name
    # One optimizer step per batch (the advantage-weighted CE is an on-policy loss; IS corrects the lag).
    assert config.actor_rollout_ref.actor.ppo_mini_batch_size == config.data.train_batch_size
    assert config.algorithm.rollout_correction.rollout_is == "token"


# docs/atropos.rst, "Split placement on one 8-GPU node": the GPU config with these overrides.
GPU_SPLIT = [
    "actor_rollout_ref.hybrid_engine=false",
    "actor_rollout_ref.rollout.nnodes=1",
    "actor_rollout_ref.rollout.n_gpus_per_node=2",
    "actor_rollout_ref.rollout.gpu_memory_utilization=0.85",
    "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl",
    "trainer.n_gpus_per_node=6",
    "data.train_batch_size=288",
]


def test_gpu_split_overrides_add_up_on_one_8_gpu_node() -> None:
    """The documented split of one 8-GPU node: 6 + 2 GPUs, a batch split evenly over the training ranks, two vLLM
    replicas, verl's nccl engine, a lag cap that admits the update split adds; verl's validate_config passes."""
    config = load_config(CONFIG_DIR / "atropos_grpo_gpu.yaml", GPU_SPLIT)
    OmegaConf.resolve(config)
    validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=False)
    trainer, rollout = config.trainer, config.actor_rollout_ref.rollout
    assert is_split(config) and trainer_devices(config) + rollout_devices(config) == 8
    assert trainer.n_gpus_per_node == 6 and rollout.n_gpus_per_node == 2
    assert config.data.train_batch_size % trainer.n_gpus_per_node == 0
    per_rank = config.data.train_batch_size // trainer.n_gpus_per_node
    assert per_rank % config.actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu == 0
    assert rollout_devices(config) // rollout.tensor_model_parallel_size == 2  # replicas
    assert rollout.checkpoint_engine.backend == "nccl" and config.atropos.max_policy_lag >= 1
    check_atropos_config(config)  # the split checks pass


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
        CONFIG_DIR / "atropos_grpo_gpu.yaml",
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
        TINY_CONFIG,
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


# ---- the base YAML's `atropos:` block against the dataclass defaults ---------------------------------------------
def dataclass_defaults(cls: type) -> dict[str, Any]:
    """Every field of ``cls`` with its default (default_factory called), nested dataclasses as dicts; verl's
    ``BaseConfig._target_`` (set by ``omega_conf_to_dataclass``, never written in a YAML) left out."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name == "_target_":
            continue
        if f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        else:
            raise AssertionError(f"{cls.__name__}.{f.name} has no default: the YAML cannot repeat it")
        out[f.name] = dataclass_defaults(type(value)) if dataclasses.is_dataclass(value) else value
    return out


def differences(yaml_value: Any, default: Any, path: str) -> list[str]:
    """Where the YAML and the defaults disagree: missing or extra keys, unequal values (numbers as floats)."""
    if isinstance(default, dict) and isinstance(yaml_value, dict):
        out = [f"{path}.{k}: in the dataclass, not in the YAML" for k in sorted(default.keys() - yaml_value.keys())]
        out += [f"{path}.{k}: in the YAML, not in the dataclass" for k in sorted(yaml_value.keys() - default.keys())]
        for key in sorted(default.keys() & yaml_value.keys()):
            out += differences(yaml_value[key], default[key], f"{path}.{key}")
        return out
    numbers = (int, float)
    if isinstance(default, numbers) and isinstance(yaml_value, numbers) and not isinstance(default, bool):
        equal = not isinstance(yaml_value, bool) and float(yaml_value) == float(default)
    else:
        equal = type(yaml_value) is type(default) and yaml_value == default
    return [] if equal else [f"{path}: YAML {yaml_value!r}, dataclass {default!r}"]


def test_base_yaml_atropos_block_repeats_the_dataclass_defaults_key_by_key() -> None:
    block = yaml.safe_load((CONFIG_DIR / "atropos_grpo_base.yaml").read_text())["atropos"]
    defaults = dataclass_defaults(AtroposConfig)
    assert defaults["launcher"]["envs"] == []  # the base starts no environment; configs list their own
    diffs = differences(block, defaults, "atropos")
    assert not diffs, "atropos_grpo_base.yaml and AtroposConfig disagree:\n" + "\n".join(diffs)


def test_the_comparison_sees_a_changed_default_a_missing_key_and_an_extra_one() -> None:
    defaults = {"a": 1.0, "b": {"c": None, "d": []}, "e": True}
    assert differences({"a": 1, "b": {"c": None, "d": []}, "e": True}, defaults, "x") == []  # 1 == 1.0
    assert differences({"a": 2, "b": {"c": "${y}", "x": 1}, "e": 1}, defaults, "x") == [
        "x.a: YAML 2, dataclass 1.0",
        "x.b.d: in the dataclass, not in the YAML",
        "x.b.x: in the YAML, not in the dataclass",
        "x.b.c: YAML '${y}', dataclass None",
        "x.e: YAML 1, dataclass True",
    ]
