"""Switching a run to the CPU runtime (verl 0.9.1 on CPU): the settings, the environment every verl process needs,
and which of the recipe's modules verl imports (:mod:`recipe.atropos.cpu`: the ``cpu`` platform, the ``hf_cpu`` or
``vllm_cpu`` rollout, the ``gloo`` checkpoint engine).

Runs in the trainer driver before Ray starts: ``main_atropos`` calls :func:`apply_cpu_runtime` when
:func:`should_use_cpu_runtime` says so — no CUDA device, or ``atropos.runtime=cpu``; users never set these switches by
hand. With a GPU nothing here runs and verl's CUDA path (FSDP + vLLM) is untouched. The modules are named here as
strings and imported by verl's processes (``VERL_USE_EXTERNAL_MODULES``), never by this module's importers.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from recipe.atropos.setup.cluster import cluster_settings
from recipe.atropos.setup.placement import apply_split_cpu_settings, is_split
from recipe.atropos.setup.weight_sync import lora_as_adapter

PLATFORM_MODULE = "recipe.atropos.cpu.platform"
ROLLOUT_MODULE = "recipe.atropos.cpu.hf_cpu"
VLLM_CPU_MODULE = "recipe.atropos.cpu.vllm_cpu"

# Ray resources: verl reserves one logical GPU per worker and a few CPUs per actor; on a 2-core box these are
# logical slots (Ray would otherwise wait forever for resources the machine does not have).
RAY_NUM_CPUS = 8
RAY_NUM_GPUS = 1

# FSDP computes in bf16 unless told otherwise; bf16 matmuls on CPUs without bf16 units are many times slower.
FP32 = {"param_dtype": "fp32", "reduce_dtype": "fp32", "buffer_dtype": "fp32"}

# (key, value) pairs every CPU run needs, as dotted keys of verl's ppo_trainer config.
CPU_SETTINGS: tuple[tuple[str, object], ...] = (
    ("trainer.use_v1", False),  # the v0 RayPPOTrainer path (v1 needs transfer_queue)
    ("trainer.device", "cpu"),
    ("trainer.n_gpus_per_node", 1),
    ("trainer.nnodes", 1),
    ("ray_kwargs.ray_init.num_cpus", RAY_NUM_CPUS),
    ("ray_kwargs.ray_init.num_gpus", RAY_NUM_GPUS),
    ("actor_rollout_ref.model.use_remove_padding", False),  # flash-attn varlen kernels are CUDA-only
    ("actor_rollout_ref.model.enable_gradient_checkpointing", False),
    ("actor_rollout_ref.model.override_config.attn_implementation", "eager"),
    ("actor_rollout_ref.actor.strategy", "fsdp2"),  # FSDP1 needs an accelerator for sync_module_states
    ("actor_rollout_ref.actor.fsdp_config.strategy", "fsdp2"),
    ("actor_rollout_ref.actor.fsdp_config.dtype", "float32"),
    ("actor_rollout_ref.actor.fsdp_config.mixed_precision", FP32),
    ("actor_rollout_ref.actor.use_torch_compile", False),
    ("actor_rollout_ref.actor.fsdp_config.use_torch_compile", False),
    ("actor_rollout_ref.ref.strategy", "fsdp2"),
    ("actor_rollout_ref.ref.fsdp_config.strategy", "fsdp2"),
    ("actor_rollout_ref.ref.fsdp_config.dtype", "float32"),
    ("actor_rollout_ref.ref.fsdp_config.mixed_precision", FP32),
    ("actor_rollout_ref.ref.use_torch_compile", False),
    ("actor_rollout_ref.ref.fsdp_config.use_torch_compile", False),
    ("actor_rollout_ref.rollout.name", "hf_cpu"),
    ("actor_rollout_ref.rollout.tensor_model_parallel_size", 1),
    ("ray_kwargs.ray_init.include_dashboard", False),  # the dashboard's processes cost each start ~2 CPU-seconds
)
# verl's own loop on CPU (its agent and reward loop workers: one each, not 8; the recipe uses none, its base config).
NATIVE_LOOP_SETTINGS: tuple[tuple[str, object], ...] = (
    ("actor_rollout_ref.rollout.agent.num_workers", 1),
    ("reward.num_workers", 1),
)


# atropos.cpu_rollout=vllm: verl's own vLLM rollout on vLLM's CPU build (``.venv-vllm``, ``make vllm-env``) instead
# of hf_cpu. vLLM's CPU platform has no sleep mode (weights and KV cache stay resident) and no CUDA graphs; fp32 keeps
# the rollout's log-probs comparable with the fp32 actor's.
VLLM_CPU_SETTINGS: tuple[tuple[str, object], ...] = (
    ("actor_rollout_ref.rollout.name", "vllm_cpu"),
    ("actor_rollout_ref.rollout.enable_sleep_mode", False),
    ("actor_rollout_ref.rollout.free_cache_engine", False),
    ("actor_rollout_ref.rollout.enforce_eager", True),
    ("actor_rollout_ref.rollout.dtype", "float32"),
)


def cpu_rollout_settings(cpu_rollout: str = "hf_cpu") -> tuple[tuple[str, object], ...]:
    """:data:`CPU_SETTINGS`, with the vLLM rollout's settings after them for ``cpu_rollout="vllm"`` (the value is
    checked by the typed config, ``atropos.cpu_rollout``)."""
    if cpu_rollout != "vllm":
        return CPU_SETTINGS
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(
            "atropos.cpu_rollout=vllm needs vLLM's CPU build, which this Python environment lacks: build it with "
            "`make vllm-env` and run with .venv-vllm/bin/python (or set atropos.cpu_rollout=hf_cpu)"
        )
    return CPU_SETTINGS + VLLM_CPU_SETTINGS


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def should_use_cpu_runtime(requested: str = "auto") -> bool:
    """``auto``: only without CUDA; ``cpu``: always; ``cuda``: never (``atropos.runtime``, checked by the typed
    config)."""
    return requested == "cpu" or (requested == "auto" and not cuda_available())


def cpu_runtime_env(extra_modules: Sequence[str] = ()) -> dict[str, str]:
    """Environment every verl process needs on CPU (``VERL_USE_EXTERNAL_MODULES`` is read by ``import verl``)."""
    modules = [PLATFORM_MODULE, ROLLOUT_MODULE, *extra_modules]
    return {
        "VERL_USE_EXTERNAL_MODULES": ",".join(dict.fromkeys(modules)),
        "VERL_PLATFORM": "cpu",
        # verl registers its FSDP engine for cuda/npu only; it reaches devices through the platform, so reuse it.
        "VERL_ENGINE_DEVICE": "cuda",
        "TOKENIZERS_PARALLELISM": "false",
        "TORCH_COMPILE_DISABLE": "1",
    }


def _override(key: str, value: object) -> str:
    if isinstance(value, dict):
        text = "{" + ",".join(f"{k}:{v}" for k, v in value.items()) + "}"
    else:
        text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"++{key}={text}"


def cpu_runtime_overrides(cpu_rollout: str = "hf_cpu") -> list[str]:
    """Hydra overrides for ``python -m verl.trainer.main_ppo`` on CPU (``++`` adds or sets), verl's own loop's
    worker counts included (:data:`NATIVE_LOOP_SETTINGS`)."""
    return [_override(key, value) for key, value in cpu_rollout_settings(cpu_rollout) + NATIVE_LOOP_SETTINGS]


def apply_cpu_runtime(config: DictConfig, extra_modules: Sequence[str] = ()) -> None:
    """Switch an already-composed verl config and this process to the CPU runtime.

    Sets :data:`CPU_SETTINGS` in ``config``, exports :func:`cpu_runtime_env` (Ray workers started afterwards inherit
    it) and imports the platform and rollout modules here, since this process may have imported verl already.
    With ``atropos.cpu_rollout=vllm`` the rollout is verl's vLLM on vLLM's CPU build (:data:`VLLM_CPU_SETTINGS`;
    :mod:`recipe.atropos.cpu.vllm_cpu` is then imported by every verl process, not by this one); with a LoRA
    adapter (:func:`lora_as_adapter`) it also sets ``rollout.load_format=auto``. A split rollout
    (``actor_rollout_ref.hybrid_engine=false``) gets its pool, the ``gloo`` weight engine and thread counts
    (:func:`~recipe.atropos.setup.placement.apply_split_cpu_settings`). Attached to a Ray cluster, the cluster's
    nodes decide the settings :func:`~recipe.atropos.setup.cluster.cluster_settings` names.
    """
    cpu_rollout = str(OmegaConf.select(config, "atropos.cpu_rollout", default="hf_cpu"))
    for key, value in cluster_settings(config, cpu_rollout_settings(cpu_rollout)):
        OmegaConf.update(config, key, value, force_add=True)
    if is_split(config):
        apply_split_cpu_settings(config)
    if cpu_rollout == "vllm":
        extra_modules = [VLLM_CPU_MODULE, *extra_modules]
        if lora_as_adapter(config):
            # vLLM loads the base weights from disk at start (not dummy weights), so verl's first push is the adapter
            # alone (base_sync_done from the start): vllm_cpu loads adapters through verl's add_lora path only.
            OmegaConf.update(config, "actor_rollout_ref.rollout.load_format", "auto", force_add=True)
    env = cpu_runtime_env(extra_modules)
    current = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    env["VERL_USE_EXTERNAL_MODULES"] = ",".join(dict.fromkeys([*env["VERL_USE_EXTERNAL_MODULES"].split(","), *current]))
    os.environ.update(env)
    for module in (PLATFORM_MODULE, ROLLOUT_MODULE):
        importlib.import_module(module)
