"""Where each training step's groups come from (the trainer driver): the live Atropos API (FIFO or an exact mixture of
environments) or saved JSONL groups, behind one :class:`GroupSource` protocol."""

from recipe.atropos.sources.api import ApiGroupSource
from recipe.atropos.sources.base import BaseGroupSource, GroupSource
from recipe.atropos.sources.factory import make_group_source
from recipe.atropos.sources.fifo import FifoBatcher
from recipe.atropos.sources.jsonl import JsonlGroupSource
from recipe.atropos.sources.mixture import MixtureBatcher

__all__ = [
    "ApiGroupSource",
    "BaseGroupSource",
    "FifoBatcher",
    "GroupSource",
    "JsonlGroupSource",
    "MixtureBatcher",
    "make_group_source",
]
