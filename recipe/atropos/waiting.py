"""Why a step waits for data, in one line: the trainer's wait file and the report built from the services' counters.

    waiting 60 s for step 3 | API queue 0 groups | env math: 0 groups received (0 rejected), last post never |
    endpoint: 272 completions served

(one line). While a step waits, the trainer's group source writes ``{"step", "since"}`` to the wait file
(``atropos.wait_file``; the launcher sets ``<run_dir>/trainer_wait.json``) and removes it once the step has its data;
the launcher prints :func:`describe_wait` every ``atropos.launcher.wait_report_s`` while the file exists, and the
trainer's poll-timeout error ends with the same line. The counters come from the guarded API's ``GET /guard/stats``
(the queue, and per env id: groups received, rejected, last post; plain ``run-api``: ``GET /status``, no per-env
counts), the env names from ``env_ids.json``, the completions served from the inference endpoint's ``GET /health``.
A service that does not answer is named as such; nothing here raises.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from recipe.atropos.records import write_json_atomic

__all__ = ["WaitReport", "describe_wait", "read_wait", "wait_line"]

_TIMEOUT_S = 3.0


def _get(url: str) -> dict[str, Any] | None:
    try:
        answer = requests.get(url, timeout=_TIMEOUT_S)
        return answer.json() if answer.status_code == 200 else None
    except (requests.RequestException, ValueError):
        return None


def read_wait(path: Path | str | None) -> dict[str, Any] | None:
    """``{"step", "since"}`` while the trainer waits for a step's data, else None."""
    try:
        state = json.loads(Path(path).read_text()) if path else None
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) and "step" in state and "since" in state else None


def read_env_names(path: Path | str | None) -> dict[str, str]:
    """``env_ids.json`` (env id -> name) as the launcher wrote it; {} when absent."""
    try:
        names = json.loads(Path(path).read_text()) if path else {}
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {}


def _ago(when: float | None, now: float) -> str:
    return "never" if not when else f"{max(0.0, now - when):.0f} s ago"


def wait_line(
    step: int,
    waited_s: float,
    *,
    guard: dict[str, Any] | None,
    status: dict[str, Any] | None,
    health: dict[str, Any] | None,
    env_names: dict[str, str],
    now: float | None = None,
) -> str:
    """The line from the answers of ``/guard/stats`` (``guard``), ``/status`` and the endpoint's ``/health`` (each
    None when that service did not answer) and the env names by env id."""
    now = time.time() if now is None else now
    parts = [f"waiting {waited_s:.0f} s for step {step}"]
    if guard is not None:
        parts.append(f"API queue {guard.get('queue_groups', 0)} groups")
    elif status is not None:
        parts.append(f"API queue {status.get('queue_size', 0)} groups")
    else:
        parts.append("API: no answer")
    counted = (guard or {}).get("envs", {})
    for env_id in sorted({*env_names, *counted}, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k)):
        name = env_names.get(env_id, f"id {env_id}")
        if guard is None:
            parts.append(f"env {name}: no per-env counts (plain run-api)")
            continue
        env = counted.get(env_id, {})
        text = (
            f"env {name}: {env.get('received', 0)} groups received ({env.get('rejected', 0)} rejected), last post "
            f"{_ago(env.get('last_post'), now)}"
        )
        if env.get("last_rejection"):
            text += f", last rejection: {env['last_rejection'][:160]}"
        parts.append(text)
    if not env_names and not counted:
        parts.append("no environment registered")
    if health is None:
        parts.append("endpoint: no answer")
    else:
        parts.append(f"endpoint: {(health.get('stats') or {}).get('completions', 0)} completions served")
    return " | ".join(parts)


def describe_wait(
    step: int, waited_s: float, *, api_url: str, inference_url: str | None, env_ids_file: Path | str | None
) -> str:
    """:func:`wait_line` with the services asked now (each request times out after a few seconds)."""
    guard = _get(f"{api_url}/guard/stats")
    status = None if guard is not None else _get(f"{api_url}/status")
    health = _get(f"{inference_url}/health") if inference_url else None
    names = read_env_names(env_ids_file)
    return wait_line(step, waited_s, guard=guard, status=status, health=health, env_names=names)


@dataclass
class WaitReport:
    """The trainer's side: marks the wait in ``wait_file`` (when set) and describes it (the poll-timeout error)."""

    api_url: str
    inference_url: str | None = None
    env_ids_file: str | None = None
    wait_file: str | None = None
    _since: float | None = None

    def waiting(self, step: int) -> None:
        """The step waits for data from now (a second call for the same wait keeps the first time)."""
        if self._since is None:
            self._since = time.time()
            if self.wait_file:
                write_json_atomic(Path(self.wait_file), {"step": int(step), "since": self._since})

    def done(self) -> None:
        """The step has its data (or gave up): the wait file goes."""
        self._since = None
        if self.wait_file:
            Path(self.wait_file).unlink(missing_ok=True)

    def gave_up(self, step: int) -> str:
        """The waiting line of a wait that ends without data (the poll timed out, the trainer fails with it); the wait
        file goes, so the launcher stops reporting a wait while the trainer shuts down."""
        waited = 0.0 if self._since is None else time.time() - self._since
        self.done()
        return describe_wait(
            step, waited, api_url=self.api_url, inference_url=self.inference_url, env_ids_file=self.env_ids_file
        )
