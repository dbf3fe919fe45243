"""The extension: a trainer subclass that overrides one stage, and a group source of its own.

``SyntheticGroupSource`` feeds groups without any environment or API (offline, so the trainer starts no inference
endpoint): each group is one prompt and ``group_size`` random responses whose scores are 0, 1, 2, ... so every group
has a learning signal. ``HalfAdvantageTrainer`` halves the advantages after the stock stage computed them and reports
what it did.
"""

from __future__ import annotations

import random
from typing import Any

from verl import DataProto

from recipe.atropos import IGNORE_INDEX, BaseGroupSource, RayAtroposTrainer, ScoredGroup, validate_group

PROMPT_TOKENS = 8
RESPONSE_TOKENS = 6


class SyntheticGroupSource(BaseGroupSource):
    """``batch_size // group_size`` groups per step, drawn from a seeded RNG; its position survives a checkpoint."""

    online = False

    def __init__(self, batch_size: int, group_size: int, vocab_size: int, seed: int = 0) -> None:
        self.batch_size, self.group_size, self.vocab_size, self.seed = batch_size, group_size, vocab_size, seed
        self.groups_served = 0
        self.trained_steps: list[int] = []

    def _group(self, rng: random.Random) -> ScoredGroup:
        prompt = [rng.randrange(3, self.vocab_size) for _ in range(PROMPT_TOKENS)]
        tokens, masks = [], []
        for _ in range(self.group_size):
            response = [rng.randrange(3, self.vocab_size) for _ in range(RESPONSE_TOKENS)]
            tokens.append(prompt + response)
            masks.append([IGNORE_INDEX] * PROMPT_TOKENS + response)
        scores = [float(i) for i in range(self.group_size)]
        return validate_group({"tokens": tokens, "masks": masks, "scores": scores}, vocab_size=self.vocab_size)

    def next_groups(self, step: int, metrics: dict[str, float]) -> list[ScoredGroup]:
        rng = random.Random(self.seed * 1_000_003 + self.groups_served)
        groups = [self._group(rng) for _ in range(self.batch_size // self.group_size)]
        self.groups_served += len(groups)
        metrics["my_recipe/groups_served"] = float(self.groups_served)
        return groups

    def trained(self, groups: list[ScoredGroup], step: int) -> None:
        self.trained_steps.append(step)

    def state_dict(self) -> dict[str, Any]:
        return {"groups_served": self.groups_served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.groups_served = int(state["groups_served"])


class HalfAdvantageTrainer(RayAtroposTrainer):
    """Atropos-verl's trainer with its own group source and one stage overridden."""

    ADVANTAGE_SCALE = 0.5

    def _make_group_source(self) -> SyntheticGroupSource:
        # Runs inside verl's __init__: read the config, not attributes a subclass sets after super().__init__().
        return SyntheticGroupSource(
            batch_size=int(self.config.data.train_batch_size),
            group_size=int(self.config.my_recipe.group_size),
            vocab_size=len(self.tokenizer),
        )

    def _compute_advantages(self, batch: DataProto, metrics: dict[str, float]) -> DataProto:
        batch = super()._compute_advantages(batch, metrics)
        stock_max = float(batch.batch["advantages"].abs().max())
        batch.batch["advantages"] = batch.batch["advantages"] * self.ADVANTAGE_SCALE
        batch.batch["returns"] = batch.batch["advantages"].clone()
        metrics["my_recipe/stock_advantage_abs_max"] = stock_max
        metrics["my_recipe/advantage_abs_max"] = float(batch.batch["advantages"].abs().max())
        return batch
