"""The recipe's start-up check of a composed config: fails before Ray starts, naming the key and the fix.

Shared by ``main_atropos``, the launcher's pre-flight and :class:`~recipe.atropos.trainer.RayAtroposTrainer`.
"""

from __future__ import annotations

from omegaconf import DictConfig

from recipe.atropos.advantages import check_advantage_options
from recipe.atropos.staleness import check_staleness_config

VLLM_ROLLOUTS = ("vllm", "vllm_cpu")  # rollouts that serve vLLM's OpenAI HTTP API (vllm_http backend)


def check_atropos_config(config: DictConfig) -> None:
    """Fail before Ray starts, naming the key and the fix."""
    source = str(config.atropos.get("source", "api"))
    if source not in ("api", "jsonl"):
        raise ValueError(f"atropos.source={source!r}: use 'api' (live run-api) or 'jsonl' (atropos.jsonl_paths)")
    if source == "jsonl" and not config.atropos.get("jsonl_paths"):
        raise ValueError("atropos.source=jsonl needs atropos.jsonl_paths: files or globs of saved ScoredData groups")
    offline_epochs = source == "jsonl" and (config.atropos.get("offline") or {}).get("epochs")
    if not config.trainer.get("total_training_steps") and not offline_epochs:
        raise ValueError(
            "trainer.total_training_steps is required: data comes from the Atropos API, so there is no dataset to "
            "count epochs over. Pass e.g. trainer.total_training_steps=100"
        )
    if not config.actor_rollout_ref.model.get("path"):
        raise ValueError("actor_rollout_ref.model.path is required: a model directory or hub name")
    if config.atropos.inference.backend not in ("ray", "vllm_http"):
        raise ValueError(f"atropos.inference.backend={config.atropos.inference.backend!r}: use 'ray' or 'vllm_http'")
    check_staleness_config(config)
    # vllm_cpu: verl's vLLM replica on the CPU runtime (atropos.cpu_rollout=vllm) serves the same HTTP API.
    if config.atropos.inference.backend == "vllm_http" and config.actor_rollout_ref.rollout.name not in VLLM_ROLLOUTS:
        raise ValueError(
            f"atropos.inference.backend=vllm_http needs a vLLM rollout, actor_rollout_ref.rollout.name=vllm (got "
            f"{config.actor_rollout_ref.rollout.name!r}): use atropos.inference.backend=ray"
        )
    adv_cfg = config.atropos.get("advantage") or {}
    check_advantage_options(str(adv_cfg.get("normalize", "none")), adv_cfg.get("clip"))
