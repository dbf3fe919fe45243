"""What each weight push from the actor to the rollout carries, and over which engine, as the config decides it.

- :func:`lora_as_adapter`: a LoRA run pushes the adapter tensors (``lora.merge`` false, verl's default) rather than
  weights merged into the base; the CPU runtime, the config checks and the split checks read it.
- :data:`GLOO_BACKEND` / :data:`GLOO_MODULE`: the recipe's CPU checkpoint engine (a split rollout on CPU), by its
  registry name and the module verl imports to register it (:mod:`recipe.atropos.cpu.weight_transfer`). Named here,
  not imported: config checks read these without importing verl's checkpoint engines.
"""

from __future__ import annotations

from omegaconf import DictConfig

GLOO_BACKEND = "gloo"
GLOO_MODULE = "recipe.atropos.cpu.weight_transfer"


def lora_as_adapter(config: DictConfig) -> bool:
    """True when the actor trains LoRA (``actor_rollout_ref.model.lora_rank`` or ``lora.rank`` > 0) and verl pushes
    the adapter tensors to the rollout (``lora.merge`` false, verl's default) rather than weights merged into the
    base."""
    model = config.actor_rollout_ref.model
    lora = model.get("lora") or {}
    rank = int(model.get("lora_rank", 0) or 0) or int(lora.get("rank", 0) or 0)
    return rank > 0 and not bool(lora.get("merge", False))
