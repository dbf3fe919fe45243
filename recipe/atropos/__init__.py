"""atropos-verl: GRPO online RL in verl on Atropos environments.

The names other recipes import are listed in ``__all__`` and documented in ``docs/atropos.rst`` ("Public API").
They are imported on first use (PEP 562), so ``import recipe.atropos`` stays cheap for the processes that need none
of them (the API guard, the environments, the launcher's argument parsing).

Sub-packages, by the process that runs them:

- ``schema``, ``records``, ``spool``, ``rundir``, ``polling``, ``metrics_file``, ``config``, ``staleness``,
  ``waiting``, ``access``: shared by every process (lowest layer): the wire schema, files the recipe writes, the
  trainer's spool, a run directory's file names, the one wait loop, the typed config;
- ``algos``: pure tensor functions, imported by verl's workers (advantages, the advantage-weighted CE, the teacher
  mask of verl's distillation loss);
- ``transport``, ``sources``, ``endpoint``, ``trainer``: the trainer driver (HTTP client of the API, where a step's
  groups come from, the inference endpoint, ``RayAtroposTrainer``);
- ``setup``: the trainer driver before Ray starts and the launcher's pre-flight (model assets, CPU runtime settings,
  placement, cluster attach, GPU checks); ``cpu``: what verl's processes import on CPU (platform, the hf_cpu and
  vLLM-CPU rollouts, weight transfer);
- ``guard``: the Atropos API process; ``launcher``: the supervisor; ``envs``: bundled environments (their own
  processes).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    # the trainer and how to run it (another recipe: subclass the trainer, override a stage, pass trainer_cls)
    "RayAtroposTrainer": "recipe.atropos.trainer",
    "run_atropos": "recipe.atropos.main_atropos",
    # where a step's groups come from
    "GroupSource": "recipe.atropos.sources",
    "BaseGroupSource": "recipe.atropos.sources",
    "make_group_source": "recipe.atropos.sources",
    "AtroposClient": "recipe.atropos.transport.client",
    # groups -> DataProto -> advantages -> loss
    "scored_data_to_dataproto": "recipe.atropos.trainer.dataproto",
    "combine_advantages": "recipe.atropos.algos.advantages",
    "CombinedAdvantages": "recipe.atropos.algos.advantages",
    "normalize_and_clip_advantages": "recipe.atropos.algos.advantages",
    "compute_advantage_weighted_sft_loss": "recipe.atropos.algos.losses",
    "compute_policy_loss_advantage_weighted_ce": "recipe.atropos.algos.losses",
    # the typed config
    "AtroposConfig": "recipe.atropos.config",
    "atropos_config": "recipe.atropos.config",
    # the wire schema
    "ScoredGroup": "recipe.atropos.schema",
    "validate_group": "recipe.atropos.schema",
    "GroupValidationError": "recipe.atropos.schema",
    "IGNORE_INDEX": "recipe.atropos.schema",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'recipe.atropos' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
