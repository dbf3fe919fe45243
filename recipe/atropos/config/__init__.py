"""The recipe's configuration: the shipped YAMLs (Hydra configs extending verl's ``ppo_trainer``) beside the typed
``atropos`` block (:class:`AtroposConfig`) and the start-up checks of a composed config."""

from recipe.atropos.config.atropos_config import (
    AdvantageConfig,
    AtroposConfig,
    EnvConfig,
    InferenceConfig,
    LauncherConfig,
    LauncherTeacherConfig,
    OfflineConfig,
    SpoolConfig,
    atropos_config,
)
from recipe.atropos.config.checks import check_atropos_config

__all__ = [
    "AdvantageConfig",
    "AtroposConfig",
    "EnvConfig",
    "InferenceConfig",
    "LauncherConfig",
    "LauncherTeacherConfig",
    "OfflineConfig",
    "SpoolConfig",
    "atropos_config",
    "check_atropos_config",
]
