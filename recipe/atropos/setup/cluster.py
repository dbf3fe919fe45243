"""The trainer attached to an existing Ray cluster (``ray_kwargs.ray_init.address``) instead of a Ray it starts.

verl's multi-node recipe: ``ray start --head`` on one node, ``ray start --address=HEAD:PORT`` on the others, then the
trainer with ``trainer.nnodes`` x ``trainer.n_gpus_per_node`` workers (one placement group per node). On the CPU
runtime each node's "GPUs" are logical Ray slots (``ray start --num-gpus 1``: one FSDP rank per node, gloo between
them; our platform counts one device per process). With an address set:

- the user's ``trainer.nnodes`` / ``trainer.n_gpus_per_node`` stand (the CPU runtime would force 1 and 1), and
  ``ray.init`` gets no ``num_cpus`` / ``num_gpus`` (a cluster's resources are set by ``ray start``; Ray refuses them
  when connecting);
- the CPU runtime's environment travels in the job's ``runtime_env`` (workers on other nodes do not inherit this
  process's environment);
- the task runner, which serves the inference endpoint, is pinned to this process's node, so the endpoint listens on
  the host the launcher and the environments were told about;
- the cluster is left running at exit (``run_atropos`` shuts down only a Ray it started).
"""

from __future__ import annotations

import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

# CPU-runtime settings a cluster decides instead (skipped by apply_cpu_runtime when attached).
CLUSTER_DECIDES = (
    "trainer.nnodes",
    "trainer.n_gpus_per_node",
    "ray_kwargs.ray_init.num_cpus",
    "ray_kwargs.ray_init.num_gpus",
    "ray_kwargs.ray_init.include_dashboard",  # the cluster's head started it (or not)
)
# This process's environment the workers need on every node (when set): the CPU runtime's switches, wandb's mode.
FORWARDED_ENV = (
    "VERL_USE_EXTERNAL_MODULES",
    "VERL_PLATFORM",
    "VERL_ENGINE_DEVICE",
    "TOKENIZERS_PARALLELISM",
    "TORCH_COMPILE_DISABLE",
    "WANDB_MODE",
)


def cluster_address(config: DictConfig) -> str | None:
    """``ray_kwargs.ray_init.address`` (``HOST:PORT`` of a running cluster's head, or ``auto``), None when unset."""
    address = OmegaConf.select(config, "ray_kwargs.ray_init.address", default=None)
    return str(address) if address else None


def cluster_settings(config: DictConfig, settings: tuple[tuple[str, object], ...]) -> tuple[tuple[str, object], ...]:
    """``settings`` (``(key, value)`` pairs of the CPU runtime) less :data:`CLUSTER_DECIDES` when attached."""
    if cluster_address(config) is None:
        return settings
    return tuple((key, value) for key, value in settings if key not in CLUSTER_DECIDES)


def ray_init_kwargs(config: DictConfig, runtime_env: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of ``ray.init``: ``ray_kwargs.ray_init`` with ``runtime_env`` merged in; attached, without
    ``num_cpus`` / ``num_gpus`` and with :data:`FORWARDED_ENV` in the job's ``env_vars``."""
    ray_init: dict[str, Any] = OmegaConf.to_container(config.ray_kwargs.get("ray_init", {}), resolve=True)
    merged = OmegaConf.to_container(OmegaConf.merge(runtime_env, ray_init.get("runtime_env") or {}))
    if cluster_address(config) is not None:
        for key in ("num_cpus", "num_gpus"):
            ray_init.pop(key, None)
        forwarded = {key: os.environ[key] for key in FORWARDED_ENV if os.environ.get(key)}
        merged["env_vars"] = {**forwarded, **(merged.get("env_vars") or {})}
    ray_init["runtime_env"] = merged
    return ray_init


def pinned_here() -> dict[str, Any]:
    """Ray actor options that place an actor on this process's node (where the endpoint must listen)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)}
