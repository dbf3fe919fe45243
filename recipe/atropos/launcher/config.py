"""The launcher's view of the trainer config: composition exactly as ``main_atropos`` does it, without importing verl.

Importing this module imports neither verl nor torch (argument parsing and composition stay fast: this project's Hydra
search path plugin, ``hydra_plugins/atropos_verl``, finds verl's configs without importing verl); the typed
``atropos`` block (which imports verl) is built by :func:`recipe.atropos.launcher.preflight.typed_config`.
"""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig


class LaunchError(RuntimeError):
    """A launch that cannot go on: a bad ``atropos.launcher`` entry (the message names the key), or a service that
    failed to start or died (the message names it and carries its log tail)."""


def load_config(config_path: Path, overrides: list[str]) -> DictConfig:
    """Compose the trainer's Hydra config exactly as ``main_atropos`` would (same files, same overrides)."""
    config_path = Path(config_path).resolve()
    with initialize_config_dir(config_dir=str(config_path.parent), version_base=None):
        return compose(config_name=config_path.stem, overrides=overrides)
