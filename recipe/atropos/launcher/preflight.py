"""Checks a launch makes before any service starts; each failure is one line naming the key and the fix.

:func:`typed_config` builds a launch's typed ``atropos`` block (once, when the launcher is made); :func:`run_preflight`
checks the rest: the whole config (the trainer's own checks), the model path, the fixed ports, and each env's
interpreter (it must import atroposlib) and the env itself, imported there (which also reads the servers its
``config_init`` declares). Also says whether a run directory already holds a finished run.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig

if TYPE_CHECKING:  # the typed config imports verl: not at import time
    from recipe.atropos.config import AtroposConfig, LauncherConfig
    from recipe.atropos.launcher.env_entries import EnvServers


class PreflightError(ValueError):
    """A configuration that cannot start; the message is one line naming the key and the fix."""


def check_model_path(path: str) -> None:
    """A local model directory with a config.json, the embedded demo model, or a hub name already cached."""
    from recipe.atropos.setup.assets import EMBEDDED_DEMO_MODEL

    if not path or path == "None":
        raise PreflightError("actor_rollout_ref.model.path is not set: pass actor_rollout_ref.model.path=DIR")
    if path == EMBEDDED_DEMO_MODEL:
        from recipe.atropos.setup.assets import default_cache_dir, smollm2_gguf_path

        if (default_cache_dir() / "SmolLM2-135M-Instruct" / "config.json").exists():
            return
        try:
            smollm2_gguf_path()
        except (RuntimeError, FileNotFoundError) as exc:
            raise PreflightError(f"actor_rollout_ref.model.path={path}: {exc}; or pass a model directory") from None
        return
    local = Path(path).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise PreflightError(
                f"actor_rollout_ref.model.path={path}: the directory has no config.json; point it at a Hugging Face "
                "model directory"
            )
        return
    if local.exists() or path.startswith(("/", ".", "~")) or path.count("/") != 1:
        raise PreflightError(f"actor_rollout_ref.model.path={path}: no such model directory; fix the path")
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
    except Exception:  # noqa: BLE001 - any failure here means "not usable offline", reported below
        cached = None
    if not isinstance(cached, str):
        raise PreflightError(
            f"actor_rollout_ref.model.path={path}: not a local directory and not in the Hugging Face cache; "
            "download it first or pass a model directory"
        )


def env_pythons(launcher: LauncherConfig) -> dict[str, tuple[str, str]]:
    """Each env's interpreter and where it was named (:func:`.env_python.resolve_env_python`), by env name."""
    from recipe.atropos.launcher.env_python import resolve_env_python

    return {
        name: resolve_env_python(env.python, launcher.env_python)
        for name, env in zip(launcher.env_names(), launcher.envs, strict=True)
    }


def check_envs(launcher: LauncherConfig, pythons: Mapping[str, tuple[str, str]] | None = None) -> dict[str, EnvServers]:
    """Each env's script exists, its interpreter runs and imports atroposlib, the env imports there with its
    ``pythonpath`` (:func:`~recipe.atropos.launcher.env_entries.probe_envs`, which also reads the servers its
    ``config_init`` declares: returned by env name), and the entry's ``servers``/``policy_server``/args fit those.
    ``pythons``: name -> (interpreter, where it was named)."""
    from recipe.atropos.launcher.env_entries import EnvEntryError, check_servers, probe_envs
    from recipe.atropos.launcher.env_python import (
        ATROPOSLIB_PIN,
        DEFAULT_VENV,
        FALLBACK,
        INSTALL_HINT,
        env_python_problem,
    )

    pythons = dict(pythons) if pythons is not None else env_pythons(launcher)
    names = launcher.env_names()
    where = {name: f"atropos.launcher.envs[{i}] ({name})" for i, name in enumerate(names)}
    entries = dict(zip(names, launcher.envs, strict=True))
    problems: dict[str, str | None] = {}
    for name, env in entries.items():
        if env.script and not Path(env.script).expanduser().is_file():
            raise PreflightError(f"{where[name]}: script {env.script!r} does not exist; fix `script`")
        python, source = pythons[name]
        if python not in problems:
            problems[python] = env_python_problem(python)
        if problems[python]:
            if source in (str(DEFAULT_VENV), FALLBACK):
                fix = INSTALL_HINT
            else:
                fix = f"point {source} at a Python with atroposlib {ATROPOSLIB_PIN}, or unset it for .venv-envs"
            raise PreflightError(f"{where[name]}: the env interpreter {problems[python]} (named by {source}); {fix}")
    try:
        found = probe_envs(entries, {name: python for name, (python, _) in pythons.items()})
        for name, env in entries.items():
            check_servers(name, env, found[name])  # `servers`, `policy_server`, args fit what config_init declares
    except EnvEntryError as error:
        raise PreflightError(f"{where[error.name]}: {error.reason}") from None
    return found


def check_port_free(key: str, port: int | None, host: str = "127.0.0.1") -> None:
    if not port:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, int(port)))
        except OSError as exc:
            reason = f"the port is in use ({exc.strerror})"
            raise PreflightError(f"{key}={port}: {reason}; pick another or set null") from None


def finished_step(checkpoint_dir: Path) -> int | None:
    """The step of the latest checkpoint in ``checkpoint_dir`` (verl's tracker file), None if there is none."""
    tracker = Path(checkpoint_dir) / "latest_checkpointed_iteration.txt"
    try:
        return int(tracker.read_text().strip())
    except (OSError, ValueError):
        return None


def _one_line(exc: ValueError) -> PreflightError:
    return PreflightError(str(exc).replace("\n", " "))


def typed_config(config: DictConfig) -> AtroposConfig:
    """The typed ``atropos`` block of ``config`` (:func:`recipe.atropos.config.atropos_config`); a bad key or value is
    a :class:`PreflightError`."""
    if os.environ.get("VERL_PLATFORM") == "cpu":  # inherited from a CPU run: verl would look our platform up on import
        importlib.import_module("recipe.atropos.cpu.platform")
    from recipe.atropos.config import atropos_config

    try:
        return atropos_config(config)
    except ValueError as exc:
        raise _one_line(exc) from None


def run_preflight(
    config: DictConfig, atropos: AtroposConfig, pythons: Mapping[str, tuple[str, str]] | None = None
) -> dict[str, EnvServers]:
    """The trainer's own checks of the whole config (:func:`recipe.atropos.config.check_atropos_config`), then the
    model path, the fixed ports of ``atropos`` (the typed block of ``config``) and, where this launcher runs them, the
    envs (:func:`check_envs`; their declared servers are returned by name, {} when it runs none)."""
    from recipe.atropos.config import check_atropos_config

    try:
        check_atropos_config(config, atropos)
    except ValueError as exc:
        raise _one_line(exc) from None
    check_model_path(str(config.actor_rollout_ref.model.path))
    launcher = atropos.launcher
    if launcher.role != "trainer":  # the ports of the services this launcher's role runs, where they bind
        check_port_free("atropos.launcher.api_port", launcher.api_port, launcher.api_host)
    if launcher.role != "services":
        check_port_free("atropos.launcher.inference_port", launcher.inference_port, atropos.inference.host)
    return check_envs(launcher, pythons) if launcher.role != "trainer" else {}
