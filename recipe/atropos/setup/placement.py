"""Where the rollout replicas run relative to the actor: colocated (verl's hybrid engine, the default) or split.

Split placement is verl's one_step_off_policy layout, with its keys: ``actor_rollout_ref.hybrid_engine=false`` and a
rollout pool of ``actor_rollout_ref.rollout.nnodes`` × ``actor_rollout_ref.rollout.n_gpus_per_node`` devices beside
the trainer's ``trainer.nnodes`` × ``trainer.n_gpus_per_node``. The replicas keep serving environments while the actor
computes log-probs, advantages and its update; after each update a checkpoint engine streams the new weights to
them (``actor_rollout_ref.rollout.checkpoint_engine``: ``nccl`` on GPUs, the recipe's ``gloo`` engine on CPU —
:mod:`recipe.atropos.cpu.weight_transfer`).

This module reads the keys and sets the CPU runtime's split settings (the trainer driver, before Ray starts); the
config checks refuse what cannot train (:func:`recipe.atropos.config.checks.check_split_config`); the trainer builds
the worker layout (:mod:`recipe.atropos.trainer.split_workers`).
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, OmegaConf

from recipe.atropos.setup.weight_sync import GLOO_BACKEND, GLOO_MODULE


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
