"""``python -m my_recipe.main_my_recipe <hydra overrides>``: atropos-verl's ``run_atropos`` with this recipe's
trainer, on this recipe's config (which extends one of atropos-verl's through the Hydra search path)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from my_recipe.ray_trainer import HalfAdvantageTrainer
from recipe.atropos import run_atropos


@hydra.main(config_path="config", config_name="my_recipe", version_base=None)
def main(config: DictConfig) -> None:
    run_atropos(config, trainer_cls=HalfAdvantageTrainer)


if __name__ == "__main__":
    main()
