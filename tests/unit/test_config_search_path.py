"""A config YAML in any folder extends the shipped ones: this project's Hydra search path plugin
(``hydra_plugins/atropos_verl``) puts ``recipe/atropos/config`` and verl's ``trainer/config`` on every Hydra app's
search path, so neither a user's config nor a shipped one needs ``hydra.searchpath`` (which Hydra accepts from the
primary config only: a shipped config that set it could not be extended)."""

from __future__ import annotations

from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir

from recipe.atropos.config import atropos_config
from recipe.atropos.launcher.config import load_config
from tests.factories import CONFIG_DIR


def write(folder: Path, name: str, content: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(content))
    return path


def test_no_shipped_config_sets_a_search_path() -> None:
    for path in CONFIG_DIR.glob("*.yaml"):
        assert "searchpath" not in (yaml.safe_load(path.read_text()).get("hydra") or {}), path.name


def test_a_config_outside_the_repo_extends_the_base(tmp_path: Path) -> None:
    mine = write(
        tmp_path / "my_configs",
        "mine",
        {
            "defaults": ["atropos_grpo_base", "_self_"],
            "data": {"train_batch_size": 24},
            "atropos": {"max_policy_lag": 3},
        },
    )
    config = load_config(mine, ["actor_rollout_ref.model.path=/models/x"])  # as the launcher composes it
    assert config.data.train_batch_size == 24  # mine
    assert atropos_config(config).max_policy_lag == 3  # mine, over the base's
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "advantage_weighted_ce"  # the base's
    assert config.algorithm.adv_estimator == "grpo" and "critic" in config  # verl's ppo_trainer, under the base


def test_a_config_outside_the_repo_extends_a_shipped_config_as_main_atropos_composes_it(tmp_path: Path) -> None:
    mine = write(tmp_path / "elsewhere", "tiny_longer", {"defaults": ["atropos_grpo_tiny", "_self_"]})
    with initialize_config_dir(config_dir=str(mine.parent), version_base=None):  # Hydra's own compose, no launcher
        config = compose(config_name=mine.stem, overrides=["trainer.total_training_steps=7"])
    shipped = load_config(CONFIG_DIR / "atropos_grpo_tiny.yaml", ["trainer.total_training_steps=7"])
    assert config == shipped
