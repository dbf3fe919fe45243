"""Where the rollout replicas run relative to the actor: colocated (verl's hybrid engine, the default) or split.

Split placement is verl's one_step_off_policy layout, with its keys: ``actor_rollout_ref.hybrid_engine=false`` and a
rollout pool of ``actor_rollout_ref.rollout.nnodes`` × ``actor_rollout_ref.rollout.n_gpus_per_node`` devices beside
the trainer's ``trainer.nnodes`` × ``trainer.n_gpus_per_node``. The replicas keep serving environments while the actor
computes log-probs, advantages and its update; after each update a checkpoint engine streams the new weights to
them (``actor_rollout_ref.rollout.checkpoint_engine``: ``nccl`` on GPUs, the recipe's ``gloo`` engine on CPU —
:mod:`recipe.atropos.runtime.weight_transfer`).

This module holds the keys and the checks; the trainer builds the worker layout
(:mod:`recipe.atropos.trainer.placement`).
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

# The recipe's CPU checkpoint engine: its registry name and the module verl imports to register it (named here, not
# imported: this module is read by config checks that must not import verl's checkpoint engines).
GLOO_BACKEND = "gloo"
GLOO_MODULE = "recipe.atropos.runtime.weight_transfer"


def is_split(config: DictConfig) -> bool:
    """True when the rollout replicas have resources of their own (``actor_rollout_ref.hybrid_engine=false``)."""
    return not bool(OmegaConf.select(config, "actor_rollout_ref.hybrid_engine", default=True))


def rollout_devices(config: DictConfig) -> int:
    """Devices of the rollout pool (split placement); 0 when colocated."""
    if not is_split(config):
        return 0
    rollout = config.actor_rollout_ref.rollout
    return int(rollout.nnodes) * int(rollout.n_gpus_per_node)


def trainer_devices(config: DictConfig) -> int:
    return int(config.trainer.nnodes) * int(config.trainer.n_gpus_per_node)


def apply_split_cpu_settings(config: DictConfig) -> None:
    """Split placement on the CPU runtime: the ``gloo`` checkpoint engine unless a backend is named, one logical Ray
    GPU per device of both pools, and each process's torch threads = cores / devices (``ATROPOS_CPU_THREADS`` wins),
    since actor and rollout now compute at the same time."""
    rollout = config.actor_rollout_ref.rollout
    engine = rollout.checkpoint_engine
    if str(engine.get("backend", "naive")) == "naive":  # verl's default: colocated only
        OmegaConf.update(config, "actor_rollout_ref.rollout.checkpoint_engine.backend", GLOO_BACKEND)
    if str(engine.backend) == GLOO_BACKEND:
        OmegaConf.update(config, "actor_rollout_ref.rollout.checkpoint_engine.custom_backend_module", GLOO_MODULE)
    devices = trainer_devices(config) + rollout_devices(config)
    OmegaConf.update(config, "ray_kwargs.ray_init.num_gpus", devices, force_add=True)
    os.environ.setdefault("ATROPOS_CPU_THREADS", str(max(1, (os.cpu_count() or 1) // devices)))


def check_split_config(config: DictConfig, max_policy_lag: int | None, lora_adapter: bool) -> None:
    """Refuse split-placement combinations that cannot train correctly; ``ValueError`` names the key and the fix."""
    if not is_split(config):
        return
    rollout = config.actor_rollout_ref.rollout
    if int(rollout.get("nnodes", 0) or 0) <= 0 or int(rollout.get("n_gpus_per_node", 0) or 0) <= 0:
        raise ValueError(
            "actor_rollout_ref.hybrid_engine=false puts the rollout on resources of its own: set "
            "actor_rollout_ref.rollout.nnodes and actor_rollout_ref.rollout.n_gpus_per_node (e.g. 1 and 2)"
        )
    if max_policy_lag == 0:
        raise ValueError(
            "atropos.max_policy_lag=0 with a split rollout (actor_rollout_ref.hybrid_engine=false): environments keep "
            "generating while the actor trains, so every group is at least one update old and none could train. "
            "Set atropos.max_policy_lag>=1 (with algorithm.rollout_correction) or hybrid_engine=true"
        )
    if lora_adapter:
        raise ValueError(
            "LoRA with a split rollout sends full weights through the checkpoint engine (verl's "
            "engine_workers.update_weights passes no LoRA config on that path): set "
            "actor_rollout_ref.model.lora.merge=true, or hybrid_engine=true to push the adapter"
        )
