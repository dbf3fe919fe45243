"""The launcher's view of the trainer config: composition (without importing verl) and the environments to start."""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

VERL_PKG = "pkg://verl.trainer.config"


class LaunchError(RuntimeError):
    """A service failed to start or died; the message names it and carries its log tail."""


@dataclass(frozen=True)
class EnvSpec:
    """One environment to run with ``serve``: a module (``python -m``) or a script, plus its own flags."""

    name: str
    module: str | None = None
    script: str | None = None
    group_size: int = 8
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)
    max_batches_offpolicy: int | None = None  # from atropos.max_policy_lag: envs generate no further ahead

    def argv(self, api_url: str, inference_url: str, model: str, max_token_length: int) -> list[str]:
        target = ["-m", self.module] if self.module else [str(Path(self.script).expanduser())]
        flags: dict[str, Any] = {
            "env.rollout_server_url": api_url,
            "env.tokenizer_name": model,
            "env.group_size": self.group_size,
            "env.inference_weight": self.weight,
            "env.max_token_length": max_token_length,
            "env.use_wandb": False,
            "env.wandb_name": self.name,
            "openai.server_type": "vllm",
            "openai.base_url": f"{inference_url}/v1",
            "openai.model_name": model,
            "openai.tokenizer_name": model,
            "openai.api_key": "x",
        }
        if self.max_batches_offpolicy is not None:
            flags["env.max_batches_offpolicy"] = self.max_batches_offpolicy
        flags.update(self.args)  # the env's own flags win
        cli = []
        for key, value in flags.items():
            cli += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
        return [sys.executable, *target, "serve", *cli]


def verl_config_dir() -> Path:
    """verl's ``trainer/config`` directory, found without importing verl (``import verl`` imports torch: ~4 s)."""
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


def env_specs(config: DictConfig) -> list[EnvSpec]:
    """The ``atropos.launcher.envs`` entries, checked (one of module/script; batch size a multiple of group size)."""
    entries = OmegaConf.to_container(config.atropos.launcher.envs, resolve=True) or []
    if not entries:
        raise LaunchError("atropos.launcher.envs is empty: name at least one environment (module or script)")
    batch_size = int(config.data.train_batch_size)
    specs = []
    for i, entry in enumerate(entries):
        max_lag = config.atropos.get("max_policy_lag")
        # Queue depth one below the cap: groups still in flight when an update starts take the last version of slack.
        ahead = None if max_lag is None else max(1, int(max_lag) - 1)
        spec = EnvSpec(**{"name": f"env{i}", "max_batches_offpolicy": ahead, **entry})
        if bool(spec.module) == bool(spec.script):
            raise LaunchError(f"atropos.launcher.envs[{i}] ({spec.name}): give exactly one of `module` or `script`")
        if spec.group_size < 1 or batch_size % spec.group_size:
            raise LaunchError(
                f"data.train_batch_size={batch_size} is not a multiple of env {spec.name!r} group_size="
                f"{spec.group_size}: the Atropos API would never form a batch. Change one of them."
            )
        specs.append(spec)
    return specs
