"""``python -m tests.e2e.distill_trainer <main_atropos's arguments>``: main_atropos with the distillation hooks of
:mod:`recipe.atropos.trainer.distillation` in a trainer subclass, the calls the stock trainer makes once it carries
them (issue 24). Used by test_distill_e2e."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import hydra
from omegaconf import DictConfig
from verl import DataProto

from recipe.atropos.main_atropos import run_atropos
from recipe.atropos.trainer import RayAtroposTrainer
from recipe.atropos.trainer.distillation import (
    attach_teacher,
    distill_step_metrics,
    install_distillation_loss,
    take_env_distillation,
    verl_update_flags,
)


class EnvDistillationTrainer(RayAtroposTrainer):
    def __init__(self, config: DictConfig, *args: Any, **kwargs: Any) -> None:
        self.env_distillation = take_env_distillation(config)  # before verl reads the config
        super().__init__(config, *args, **kwargs)

    def init_workers(self) -> None:
        super().init_workers()
        if self.env_distillation is not None:
            install_distillation_loss(self.actor_rollout_wg, self.config, self.env_distillation)

    def _to_dataproto(self, groups: Sequence[Any], metrics: dict[str, float]) -> DataProto:
        batch = super()._to_dataproto(groups, metrics)
        if self.env_distillation is not None:
            pad = self.tokenizer.pad_token_id
            pad = self.tokenizer.eos_token_id if pad is None else pad
            metrics.update(attach_teacher(batch, groups, self.env_distillation, int(pad)))
        return batch

    def _compute_log_probs(self, batch: DataProto, metrics: dict[str, float], timing: dict[str, float]) -> DataProto:
        batch = super()._compute_log_probs(batch, metrics, timing)
        metrics.update(distill_step_metrics(batch))
        return batch

    def _update_actor(self, batch: DataProto) -> DataProto:
        with verl_update_flags(self, self.env_distillation):
            return super()._update_actor(batch)


@hydra.main(config_path=None, config_name=None, version_base=None)
def main(config: DictConfig) -> None:
    take_env_distillation(config)  # on the driver, before the task runner's resource pools
    run_atropos(config, trainer_cls=EnvDistillationTrainer)


if __name__ == "__main__":
    sys.exit(main())
