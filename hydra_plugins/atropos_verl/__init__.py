"""Hydra finds atropos-verl's and verl's configs from any config folder.

Hydra imports every module under the ``hydra_plugins`` namespace package and applies each ``SearchPathPlugin`` to
every app's config search path. With this one installed (``pip install`` of this project), a config YAML anywhere
(a user's own folder, another recipe) can say ``defaults: [atropos_grpo_base, _self_]`` or extend any shipped config,
and the shipped configs need no ``hydra.searchpath`` of their own (Hydra accepts that key from the primary config
only, so a shipped config that set it could not be extended).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin


def package_dir(name: str) -> Path | None:
    """The folder of package ``name``, found without importing it (verl imports torch and Ray: seconds), or None."""
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError:  # a parent package is missing
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


class AtroposVerlSearchPathPlugin(SearchPathPlugin):
    """Appends this recipe's config folder (``recipe/atropos/config``) and verl's (``verl/trainer/config``:
    ``ppo_trainer`` and its groups), after the app's own config folder, so a user's file of the same name wins.
    They are given as folders (``file://``), not ``pkg://``, so composing imports neither package."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        recipe, verl = package_dir("recipe.atropos"), package_dir("verl")
        if recipe is not None:
            search_path.append(provider="atropos-verl", path=f"file://{recipe / 'config'}")
        if verl is not None:
            search_path.append(provider="verl", path=f"file://{verl / 'trainer' / 'config'}")
