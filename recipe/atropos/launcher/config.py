"""The launcher's view of the trainer config: composition exactly as ``main_atropos`` does it, without importing verl.

Importing this module imports neither verl nor torch (argument parsing and composition stay fast); the typed
``atropos`` block (which imports verl) is built by :func:`recipe.atropos.launcher.preflight.typed_config`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

VERL_PKG = "pkg://verl.trainer.config"


class LaunchError(RuntimeError):
    """A launch that cannot go on: a bad ``atropos.launcher`` entry (the message names the key), or a service that
    failed to start or died (the message names it and carries its log tail)."""


def verl_config_dir() -> Path:
    """verl's ``trainer/config`` directory, found without importing verl (which imports torch and Ray)."""
    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise LaunchError("verl is not installed in this Python: run `make install` (or `pip install -e .`)")
    return Path(next(iter(spec.submodule_search_locations))) / "trainer" / "config"


def searchpath_override(config_path: Path, overrides: list[str]) -> list[str]:
    """``hydra.searchpath=[...]`` with ``pkg://verl.trainer.config`` spelled as its directory ([] if not needed).

    Hydra resolves a ``pkg://`` search path by importing the package; the launcher composes the same files without
    that import (the trainer process, which needs verl, composes with ``pkg://``).
    """
    if any(o.lstrip("+~").startswith("hydra.searchpath") for o in overrides):
        return []
    primary = yaml.safe_load(Path(config_path).read_text()) or {}
    paths = ((primary.get("hydra") or {}).get("searchpath")) or []
    if VERL_PKG not in paths:
        return []
    mapped = [f"file://{verl_config_dir()}" if p == VERL_PKG else p for p in paths]
    return [f"hydra.searchpath=[{','.join(mapped)}]"]


def load_config(config_path: Path, overrides: list[str]) -> DictConfig:
    """Compose the trainer's Hydra config exactly as ``main_atropos`` would (same files, same overrides)."""
    config_path = Path(config_path).resolve()
    with initialize_config_dir(config_dir=str(config_path.parent), version_base=None):
        return compose(
            config_name=config_path.stem, overrides=[*searchpath_override(config_path, overrides), *overrides]
        )
