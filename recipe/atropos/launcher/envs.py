"""The environments of a launch: their checked ``atropos.launcher.envs`` entries, their command lines, and their
registration with the Atropos API.

Invariants:

- an env's name (``name``, else ``env<index>``) is unique: it names the process, its log file and its entry in
  ``env_ids.json``;
- an entry gives exactly one of ``module`` (run with ``python -m``) or ``script``;
- every env's ``group_size`` divides ``data.train_batch_size`` (else the API never forms a batch);
- envs register one at a time, so the env id the API hands out (its registration count) names the env just started;
  ``env_ids.json`` (env id -> name, read by the trainer for exact env mixtures) is replaced whole, never half-written.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests

from recipe.atropos.launcher.config import LaunchError
from recipe.atropos.launcher.processes import ManagedProcess
from recipe.atropos.records import write_json_atomic
from recipe.atropos.staleness import env_max_batches_offpolicy

if TYPE_CHECKING:  # the typed config imports verl: not at import time
    from recipe.atropos.config import EnvConfig, LauncherConfig

logger = logging.getLogger("atropos_launcher")


def checked_envs(launcher: LauncherConfig, batch_size: int) -> dict[str, EnvConfig]:
    """The ``atropos.launcher.envs`` entries by name, in order; :class:`LaunchError` names the entry and the fix."""
    if not launcher.envs:
        raise LaunchError("atropos.launcher.envs is empty: name at least one environment (module or script)")
    envs: dict[str, EnvConfig] = {}
    for i, (name, env) in enumerate(zip(launcher.env_names(), launcher.envs, strict=True)):
        if bool(env.module) == bool(env.script):
            raise LaunchError(f"atropos.launcher.envs[{i}] ({name}): give exactly one of `module` or `script`")
        if name in envs:
            raise LaunchError(f"atropos.launcher.envs[{i}]: the name {name!r} is taken by another env; rename one")
        if env.group_size < 1 or batch_size % env.group_size:
            raise LaunchError(
                f"data.train_batch_size={batch_size} is not a multiple of env {name!r} group_size="
                f"{env.group_size}: the Atropos API would never form a batch. Change one of them."
            )
        envs[name] = env
    return envs


def env_argv(
    name: str,
    env: EnvConfig,
    *,
    api_url: str,
    inference_url: str,
    model: str,
    max_token_length: int,
    max_policy_lag: int | None,
    api_key: str | None = None,
) -> list[str]:
    """``<python> (-m MODULE | SCRIPT) serve --flag value ...``: the API, the endpoint and the model filled in, envs
    kept within the lag cap (:func:`~recipe.atropos.staleness.env_max_batches_offpolicy`); ``env.args`` win."""
    target = ["-m", env.module] if env.module else [str(Path(env.script).expanduser())]
    flags: dict[str, Any] = {
        "env.rollout_server_url": api_url,
        "env.tokenizer_name": model,
        "env.group_size": env.group_size,
        "env.inference_weight": env.weight,
        "env.max_token_length": max_token_length,
        "env.use_wandb": False,
        "env.wandb_name": name,
        "openai.server_type": "vllm",
        "openai.base_url": f"{inference_url}/v1",
        "openai.model_name": model,
        "openai.tokenizer_name": model,
        "openai.api_key": api_key or "x",  # the endpoint's token (recipe.atropos.access); "x": none needed
    }
    ahead = env_max_batches_offpolicy(max_policy_lag)
    if ahead is not None:
        flags["env.max_batches_offpolicy"] = ahead
    flags.update(env.args)
    cli = []
    for key, value in flags.items():
        cli += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return [sys.executable, *target, "serve", *cli]


class TrainerExited(Exception):
    """The trainer exited while the launcher waited for an environment to register (not an error by itself)."""


def wait_registered(
    proc: ManagedProcess, api_url: str, env_id: int, timeout: float, trainer: ManagedProcess | None
) -> bool:
    """True once the API lists ``env_id``; False when the trainer exits first (the API admits envs only while a
    trainer is registered: the caller's next look at the trainer handles its exit). :class:`LaunchError` when the env
    dies or ``timeout`` passes."""

    def registered() -> bool:
        if trainer is not None and trainer.poll() is not None:
            raise TrainerExited
        try:
            answer = requests.get(f"{api_url}/status-env", json={"env_id": env_id}, timeout=5)
        except requests.RequestException:
            return False
        return answer.status_code == 200

    try:
        proc.wait_until(registered, timeout, f"registration with the API as env id {env_id}")
    except TrainerExited:
        return False
    except (RuntimeError, TimeoutError) as error:
        raise LaunchError(str(error)) from error
    return True


def write_env_ids(path: Path, env_ids: dict[int, str]) -> None:
    """``{"<env id>": "<env name>"}``, replaced whole (the trainer reads it while the launcher writes)."""
    write_json_atomic(path, {str(k): v for k, v in env_ids.items()})
