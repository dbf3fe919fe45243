"""Checks a launch makes before any service starts; each failure is one line naming the key and the fix.

Also answers two questions the launcher and trainer share: the model's vocabulary size (token ids must be below it)
and whether a run directory already holds a finished run.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig


class PreflightError(ValueError):
    """A configuration that cannot start; the message is one line naming the key and the fix."""


def model_vocab_size(model_path: str) -> int | None:
    """``vocab_size`` from the model directory's ``config.json`` (the embedding's rows), else None."""
    config = Path(model_path) / "config.json"
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return None
    size = data.get("vocab_size") or (data.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def check_model_path(path: str) -> None:
    """A local model directory with a config.json, the embedded demo model, or a hub name already cached."""
    from recipe.atropos.runtime.assets import EMBEDDED_DEMO_MODEL

    if not path or path == "None":
        raise PreflightError("actor_rollout_ref.model.path is not set: pass actor_rollout_ref.model.path=DIR")
    if path == EMBEDDED_DEMO_MODEL:
        from recipe.atropos.runtime.assets import default_cache_dir, smollm2_gguf_path

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


def check_envs(entries: Sequence[Any]) -> None:
    """Each env's module is importable (found without running it) or its script exists."""
    for i, spec in enumerate(entries):
        where = f"atropos.launcher.envs[{i}] ({spec.name})"
        if spec.module:
            try:
                found = importlib.util.find_spec(spec.module)
            except (ImportError, ValueError) as exc:
                found, reason = None, f" ({exc})"
            else:
                reason = ""
            if found is None:
                raise PreflightError(
                    f"{where}: module {spec.module!r} is not importable{reason}; install it or fix `module`"
                )
        elif not Path(spec.script).expanduser().is_file():
            raise PreflightError(f"{where}: script {spec.script!r} does not exist; fix `script`")


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


def run_preflight(config: DictConfig, envs: Sequence[Any]) -> None:
    """Every check above plus the trainer's own (:func:`recipe.atropos.config.checks.check_atropos_config`)."""
    if os.environ.get("VERL_PLATFORM") == "cpu":  # inherited from a CPU run: verl would look our platform up on import
        importlib.import_module("recipe.atropos.runtime.platform")
    from recipe.atropos.config.checks import check_atropos_config

    try:
        check_atropos_config(config)
    except ValueError as exc:
        raise PreflightError(str(exc).replace("\n", " ")) from None
    check_model_path(str(config.actor_rollout_ref.model.path))
    check_envs(envs)
    lcfg = config.atropos.launcher
    check_port_free("atropos.launcher.api_port", lcfg.get("api_port"))
    check_port_free("atropos.launcher.inference_port", lcfg.get("inference_port"))
    if int(lcfg.get("max_api_restarts", 0)) < 0 or int(lcfg.get("max_env_restarts", 0)) < 0:
        raise PreflightError("atropos.launcher.max_api_restarts / max_env_restarts must be >= 0")
