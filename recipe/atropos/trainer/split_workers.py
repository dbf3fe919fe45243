"""The trainer's side of split placement: verl's worker layout without the hybrid engine, and the weight swap.

Colocated (``actor_rollout_ref.hybrid_engine=true``, verl's default) is ``RayPPOTrainer.init_workers`` unchanged:
the endpoint holds the environments' requests while the actor computes, and the replicas get the new weights through
the hybrid worker (checkpoint engine ``naive``). Split (``hybrid_engine=false``) builds what verl's
one_step_off_policy builds (``verl/experimental/one_step_off_policy/ray_trainer.py``): the actor (and a separate
reference worker when KL needs one) on the trainer's pool, standalone rollout replicas on a pool of their own
(``LLMServerManager`` without a worker group → ``RolloutReplica.init_standalone``), and a ``CheckpointEngineManager``
that streams each update from actor rank 0 to the replicas' ``CheckpointEngineWorker`` (verl's), which hands it to
the rollout's weight receiver.

How a swap looks to the environments (:func:`swap_holds_requests`): ``hf_cpu`` loads new weights under its
generation lock and tags every completion with the version that produced it, so the endpoint keeps admitting
requests and a swap holds the replica only for the load itself; a rollout that cannot tag completions (vLLM: verl's
manager aborts in-flight requests for a sync, and a completion would mix two policies) is drained and held at the
endpoint for the transfer.
"""

from __future__ import annotations

import logging
from typing import Any

from omegaconf import DictConfig, open_dict
from verl.single_controller.ray import RayClassWithInitArgs
from verl.single_controller.ray.base import create_colocated_worker_cls
from verl.trainer.ppo.utils import Role
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.rollout.llm_server import LLMServerManager

from recipe.atropos.setup.placement import is_split

logger = logging.getLogger(__name__)

# Rollouts whose completions carry the policy version that produced them (TokenOutput.extra_fields), so weights can
# be swapped under them without holding the endpoint.
VERSION_TAGGING_ROLLOUTS = ("hf_cpu",)


class HybridEngineFlag:
    """``RayPPOTrainer.__init__`` asserts ``actor_rollout_ref.hybrid_engine`` (verl/trainer/ppo/ray_trainer.py:334,
    "Currently, only support hybrid engine") although nothing in it depends on it; verl's own one_step_off trainer
    re-implements that constructor instead. This context presents the flag as true for the constructor only and
    restores it, so the workers built afterwards see the user's ``false``."""

    def __init__(self, config: DictConfig) -> None:
        self.config = config
        self.split = is_split(config)

    def __enter__(self) -> bool:
        if self.split:
            with open_dict(self.config):
                self.config.actor_rollout_ref.hybrid_engine = True
        return self.split

    def __exit__(self, *exc: Any) -> None:
        if self.split:
            with open_dict(self.config):
                self.config.actor_rollout_ref.hybrid_engine = False


def swap_holds_requests(config: DictConfig) -> bool:
    """True when a weight swap must hold the endpoint's requests: colocated (the replicas share the device with the
    actor) or a rollout that cannot tag completions with their policy version."""
    return not is_split(config) or str(config.actor_rollout_ref.rollout.name) not in VERSION_TAGGING_ROLLOUTS


def init_split_workers(trainer: Any) -> None:
    """Build the split layout on ``trainer`` (a RayPPOTrainer): ``actor_rollout_wg`` (role ``actor``),
    ``ref_policy_wg`` (role ``ref``, or the actor itself with LoRA), ``llm_server_manager`` with standalone replicas,
    ``checkpoint_manager`` on ``actor_rollout_ref.rollout.checkpoint_engine``."""
    from verl.checkpoint_engine import CheckpointEngineManager

    config = trainer.config
    engine_config = omega_conf_to_dataclass(config.actor_rollout_ref.rollout.checkpoint_engine)
    if engine_config.backend == "naive":
        raise ValueError(
            "actor_rollout_ref.rollout.checkpoint_engine.backend=naive only updates colocated replicas: with "
            "hybrid_engine=false use nccl on GPUs (the CPU runtime selects the recipe's gloo engine)"
        )
    trainer.resource_pool_manager.create_resource_pool()
    role = Role.ActorRolloutRef if Role.ActorRolloutRef in trainer.role_worker_mapping else Role.ActorRollout
    worker_cls = trainer.role_worker_mapping[role]
    pool = trainer.resource_pool_manager.get_resource_pool(role)
    classes = {"actor": RayClassWithInitArgs(cls=worker_cls, config=config.actor_rollout_ref, role="actor")}
    separate_ref = trainer.use_reference_policy and not trainer.ref_in_actor
    if separate_ref:
        classes["ref"] = RayClassWithInitArgs(cls=worker_cls, config=config.actor_rollout_ref, role="ref")
    group = trainer.ray_worker_group_cls(
        resource_pool=pool,
        ray_cls_with_init=create_colocated_worker_cls(class_dict=classes),
        device_name=trainer.device_name,
    )
    workers = group.spawn(prefix_set=classes.keys())
    if separate_ref:
        trainer.ref_policy_wg = workers["ref"]
        trainer.ref_policy_wg.init_model()
    trainer.actor_rollout_wg = workers["actor"]
    trainer.actor_rollout_wg.init_model()
    if trainer.ref_in_actor:
        trainer.ref_policy_wg = trainer.actor_rollout_wg
    trainer.async_rollout_mode = True
    trainer.llm_server_manager = LLMServerManager.create(config=config)  # no worker group: standalone replicas
    trainer.checkpoint_manager = CheckpointEngineManager(
        config=engine_config, actor_wg=trainer.actor_rollout_wg, replicas=trainer.llm_server_manager.get_replicas()
    )
    rollout = config.actor_rollout_ref.rollout
    logger.info(
        "split placement: actor on %d x %d devices, %d rollout replica(s) on %d x %d, weights via %s",
        int(config.trainer.nnodes),
        int(config.trainer.n_gpus_per_node),
        len(trainer.llm_server_manager.get_replicas()),
        int(rollout.nnodes),
        int(rollout.n_gpus_per_node),
        engine_config.backend,
    )
