"""verl's teacher replicas in the Atropos loop: the configuration side (what the CPU runtime sets, what is refused).
The per-step side and the design are in :mod:`recipe.atropos.trainer.teacher`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

from recipe.atropos.config.atropos_config import atropos_config
from recipe.atropos.setup.assets import resolve_model_path
from recipe.atropos.setup.placement import is_split, trainer_devices

ROUTING_KEY = "env_name"  # the non-tensor field of the batch that names each row's env (the teacher_key to use)
TOPK_TEACHER_ENGINES = ("vllm", "sglang")  # verl's DistillationTeacherModelConfig._validate_topk_logprobs
CPU_TEACHER = "hf_cpu"
ONE_DEVICE = ("tensor_model_parallel_size", "data_parallel_size", "pipeline_model_parallel_size")


def configured_teachers(block: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    """The ``distillation.teacher_models`` entries that name a model, by entry name (verl drops the default
    ``teacher_model`` entry once others are added; an entry without ``model_path`` is verl's unused default)."""
    models = block.get("teacher_models") or {}
    return {name: m for name, m in models.items() if (m or {}).get("model_path")}


def cpu_teacher_block(block: Mapping[str, Any]) -> dict[str, Any]:
    """``block`` (a resolved ``distillation`` block, plain containers) as the CPU runtime runs it: every teacher on
    ``hf_cpu`` with one process per replica (tensor/data/pipeline parallel 1), the teacher pool one logical device per
    replica on one node. One teacher: one replica (verl sizes it from the pool); several: ``num_replicas`` each, at
    least 1."""
    out = {**block, "teacher_models": dict(block.get("teacher_models") or {})}
    teachers = configured_teachers(block)
    several = len(teachers) > 1
    devices = 0
    for name, entry in teachers.items():
        inference = {**(entry.get("inference") or {}), "name": CPU_TEACHER, **dict.fromkeys(ONE_DEVICE, 1)}
        replicas = max(1, int(entry.get("num_replicas") or 0)) if several else 1
        out["teacher_models"][name] = {**entry, "inference": inference, "num_replicas": replicas}
        devices += replicas
    out.update(n_gpus_per_node=devices, nnodes=1)
    return out


def apply_cpu_teacher(config: DictConfig) -> None:
    """Put :func:`cpu_teacher_block` into ``config`` (the driver, before Ray starts; idempotent), resolve the teachers'
    model paths (the embedded demo model's name included) and give Ray one logical device per teacher replica beside
    the trainer's."""
    block = OmegaConf.to_container(config.distillation, resolve=True)
    cpu = cpu_teacher_block(block)
    for name in configured_teachers(block):
        entry = cpu["teacher_models"][name]
        prefix = f"distillation.teacher_models.{name}"
        OmegaConf.update(config, f"{prefix}.model_path", resolve_model_path(str(entry["model_path"])))
        OmegaConf.update(config, f"{prefix}.num_replicas", entry["num_replicas"], force_add=True)
        for key in ("name", *ONE_DEVICE):
            OmegaConf.update(config, f"{prefix}.inference.{key}", entry["inference"][key], force_add=True)
    OmegaConf.update(config, "distillation.n_gpus_per_node", cpu["n_gpus_per_node"])
    OmegaConf.update(config, "distillation.nnodes", cpu["nnodes"])
    OmegaConf.update(config, "ray_kwargs.ray_init.num_gpus", trainer_devices(config) + cpu["n_gpus_per_node"])


def check_verl_teacher(config: DictConfig, block: Mapping[str, Any], on_cpu: bool) -> None:
    """Refuse, naming the fix, what cannot work with verl's teacher replicas in the Atropos loop. ``block``: the
    resolved ``distillation`` block (with the CPU teacher settings when ``on_cpu``)."""
    if is_split(config):
        raise ValueError(
            "distillation.teacher_models with actor_rollout_ref.hybrid_engine=false: verl builds its teacher "
            "replicas in RayPPOTrainer.init_workers, which split placement replaces. Use hybrid_engine=true, or the "
            "environments' way (unset distillation.teacher_models; atropos.launcher.teacher starts a teacher endpoint)"
        )
    loss = block.get("distillation_loss") or {}
    teachers = configured_teachers(block)
    if str(loss.get("loss_mode")) == "forward_kl_topk":
        for name, entry in teachers.items():
            engine = str((entry.get("inference") or {}).get("name"))
            if engine not in TOPK_TEACHER_ENGINES:
                where = "the CPU runtime's teacher" if on_cpu else f"distillation.teacher_models.{name}.inference.name"
                raise ValueError(
                    f"distillation.distillation_loss.loss_mode=forward_kl_topk with {where} = {engine}: verl 0.9.1 "
                    f"takes a teacher's top-k only from {' or '.join(TOPK_TEACHER_ENGINES)}. Use loss_mode=k3 (the "
                    "teacher's log-prob of the sampled token), or the environments' way for top-k on CPU (unset "
                    "distillation.teacher_models; atropos.launcher.teacher)"
                )
    if len(teachers) > 1:
        if str(block.get("teacher_key")) != ROUTING_KEY:
            raise ValueError(
                f"distillation.teacher_key={block.get('teacher_key')!r} with several teachers: the Atropos batch "
                f"names each row's env under {ROUTING_KEY!r}. Set distillation.teacher_key={ROUTING_KEY} and each "
                "teacher's key to an env's name (atropos.launcher.envs[].name)"
            )
        keys = {str(entry.get("key")) for entry in teachers.values()}
        missing = [name for name in atropos_config(config).launcher.env_names() if name not in keys]
        if missing:
            raise ValueError(
                f"distillation.teacher_models: no teacher's key is the env name(s) {missing} (keys: {sorted(keys)}). "
                "Add a teacher with key=<env name> for each of atropos.launcher.envs, or use one teacher for all"
            )
