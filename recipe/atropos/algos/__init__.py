"""Pure tensor functions of the recipe, imported by the trainer driver and by verl's workers.

- :mod:`~recipe.atropos.algos.advantages`: ``combine_advantages`` (env token-level advantages or verl's GRPO per row)
  and ``normalize_and_clip_advantages``;
- :mod:`~recipe.atropos.algos.losses`: the advantage-weighted CE, standalone and as verl policy loss
  ``advantage_weighted_ce`` (``POLICY_LOSS_NAME``), its truncated IS weights, and ``is_weight_metrics`` /
  ``IS_METRIC_NAMES`` (verl's rollout-correction metrics under the recipe's ``atropos/is_*`` names);
- :mod:`~recipe.atropos.algos.distillation`: verl's distillation loss with its distillation term restricted to the
  tokens that have a teacher (``teacher_mask``), installed on the actor workers by the trainer;
- :mod:`~recipe.atropos.algos.extensions`: the module verl's processes import to register the policy loss.

Lowest layer of the recipe: these modules import torch, numpy and verl, and nothing from ``recipe`` outside ``algos``.
"""
