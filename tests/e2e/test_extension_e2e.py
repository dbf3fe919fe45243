"""Another recipe extends atropos-verl: ``tests/e2e/extension_recipe/my_recipe`` (a trainer subclass that overrides
one stage, a group source of its own, a Hydra config that extends a shipped one through the search path, and an
entry point that calls ``run_atropos(trainer_cls=...)``) is copied to a folder outside the repository and trains 2
steps from there, every process real (Ray, verl's workers, the tiny model)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
import torch

from recipe.atropos.launcher.processes import ManagedProcess, tail
from recipe.atropos.metrics_file import read_metrics
from tests.helpers import wait_exit

RECIPE = Path(__file__).resolve().parent / "extension_recipe" / "my_recipe"
GROUP_SIZE = 4  # my_recipe.group_size; scores 0..3 in every group


@pytest.mark.timeout(600)
def test_a_recipe_outside_the_repo_trains_through_a_subclass_and_its_own_source(
    tmp_path: Path, tiny_model: Path, no_leftovers: list[ManagedProcess]
) -> None:
    outside = tmp_path / "elsewhere"
    shutil.copytree(RECIPE, outside / "my_recipe")
    run = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "my_recipe.main_my_recipe",
        f"actor_rollout_ref.model.path={tiny_model}",
        f"atropos.metrics_file={run / 'metrics.jsonl'}",
        f"trainer.default_local_dir={run / 'checkpoints'}",
        f"hydra.run.dir={run / 'hydra'}",
    ]
    trainer = ManagedProcess("my_recipe", argv, run / "my_recipe.log", cwd=str(outside))
    no_leftovers.append(trainer.start())
    assert wait_exit(trainer, 540) == 0, tail(trainer.log_path, 80)

    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    # GRPO over scores 0, 1, 2, 3: mean 1.5, unbiased std sqrt(5/3); the largest |advantage| is 1.5 / 1.291 = 1.162
    grpo_max = 1.5 / (5 / 3) ** 0.5
    for row in rows:
        # the source fed every step: 2 groups of 4 (batch 8) per step
        assert row["my_recipe/groups_served"] == 2 * row["step"]
        assert row["atropos/mean_score"] == pytest.approx(1.5)
        # the stock stage computed GRPO, the override halved it
        assert row["my_recipe/stock_advantage_abs_max"] == pytest.approx(grpo_max, rel=1e-4)
        assert row["my_recipe/advantage_abs_max"] == pytest.approx(grpo_max / 2, rel=1e-4)
        assert row["actor/pg_loss"] != 0.0
        assert "atropos/policy_version" not in row  # an offline source: no inference endpoint
    # the checkpoint of step 2 holds the source's state (verl saves the dataloader's state_dict in data.pt)
    data = torch.load(run / "checkpoints" / "global_step_2" / "data.pt", weights_only=False)
    assert data == {"groups_served": 4}
