"""The contract of a group source: where each training step's groups come from.

:class:`~recipe.atropos.trainer.RayAtroposTrainer` asks its source for exactly ``data.train_batch_size`` sequences of
whole groups per step and tells it what happened to them. verl keeps the source as the trainer's dataloader (its
``state_dict`` goes into every checkpoint's ``data.pt``), so a source also speaks that part of the dataloader protocol.

Sources: :class:`~recipe.atropos.sources.api.ApiGroupSource` (the live Atropos API, FIFO or held to a mixture of
environments) and :class:`~recipe.atropos.sources.jsonl.JsonlGroupSource` (saved groups, offline). A recipe that feeds
groups another way implements this protocol and returns it from ``RayAtroposTrainer._make_group_source``.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from recipe.atropos.schema import ScoredGroup


@runtime_checkable
class GroupSource(Protocol):
    """Lifecycle, in the trainer's order: ``start`` (before verl's workers) → ``resume`` (after the checkpoint load)
    → per step ``next_groups`` → ``trained`` → [``checkpointed``] → ``prefetch``.

    The trainer builds its source inside verl's ``RayPPOTrainer.__init__`` (``_make_group_source``), before that
    ``__init__`` returns."""

    online: bool  # True: environments generate through the trainer's endpoint, which must serve and take weights

    def start(self, step: int) -> None:
        """Before verl's workers start; ``step`` is the step the run will resume at (0 = from scratch)."""

    def resume(self, step: int) -> None:
        """After the checkpoint load set the trainer's step to ``step``."""

    def next_groups(self, step: int, metrics: dict[str, float]) -> list[ScoredGroup]:
        """Whole groups holding exactly the batch size in sequences for training step ``step``; adds its metrics."""

    def trained(self, groups: list[ScoredGroup], step: int) -> None:
        """``groups`` (what ``next_groups`` returned) were trained at ``step``."""

    def checkpointed(self, step: int) -> None:
        """A checkpoint of ``step`` is saved."""

    def prefetch(self, step: int) -> None:
        """After the weight push of ``step``: take what is ready without waiting."""

    def metrics(self) -> dict[str, float]:
        """Cumulative counters for the step's metrics."""

    def steps_available(self) -> int | None:
        """Offline: how many steps the data gives (the run ends there if ``trainer.total_training_steps`` asks for
        more); None: as many as the trainer asks. Not asked of an online source."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def __len__(self) -> int: ...


class BaseGroupSource:
    """No-op lifecycle hooks and the dataloader length verl reads (0: verl's ``_load_checkpoint`` then restores the
    source's state at every step, never skipping it as an epoch boundary)."""

    online = False

    def start(self, step: int) -> None:
        return None

    def resume(self, step: int) -> None:
        return None

    def trained(self, groups: list[ScoredGroup], step: int) -> None:
        return None

    def checkpointed(self, step: int) -> None:
        return None

    def prefetch(self, step: int) -> None:
        return None

    def metrics(self) -> dict[str, float]:
        return {}

    def steps_available(self) -> int | None:
        return None

    def __len__(self) -> int:
        return 0
