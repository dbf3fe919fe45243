"""Why a step waits for data, in one line: the trainer's wait file and the report built from the services' counters.

    waiting 60 s for step 3 | API queue 0 groups | env math: 0 groups received (0 rejected), last post never, 48
    completions served | env blackjack: 0 groups received (0 rejected), last post never, 0 completions served, 41
    calls to /v1/chat/completions failed (404: the endpoint serves no such route, or no such model: its model is
    actor_rollout_ref.model.path) | endpoint: 48 completions served

(one line). While a step waits, the trainer's group source writes ``{"step", "since"}`` to the wait file
(``atropos.wait_file``; the launcher sets ``<run_dir>/trainer_wait.json``) and removes it once the step has its data;
the launcher prints :func:`describe_wait` every ``atropos.launcher.wait_report_s`` while the file exists. The counters
come from the guarded API's ``GET /guard/stats`` (the queue, and per env id: groups received, rejected, last post;
plain ``run-api``: ``GET /status``, no per-env counts), the env names from ``env_ids.json``, and from the inference
endpoint's ``GET /health`` ``stats``: the completions served, and per env (the launcher gives env ``<name>`` the base
URL ``{endpoint}/env/<name>/v1``) its completions and its calls by route and HTTP status, so failing calls are named
with what their status means (:data:`FAILED_HINTS`). An endpoint without per-env counters (older ones) gives the
totals only. A service that does not answer is named as such; nothing here raises.

When the trainer gives up (the poll timed out), :meth:`WaitReport.gave_up` adds the line and what to check
(:func:`check_line`) to its error; the trainer prints that error as one paragraph headed :data:`STOPPED`
(:func:`stop_paragraph`), which the launcher finds in the trainer's log (:func:`find_stop`) and shows as the reason
the run ended.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from recipe.atropos.records import write_json_atomic
from recipe.atropos.rundir import RunDir

__all__ = ["STOPPED", "WaitReport", "describe_wait", "find_stop", "read_wait", "stop_paragraph", "wait_line"]

_TIMEOUT_S = 3.0
# What a failed call's HTTP status means (status >= 400; 5xx: any 500-599), as the waiting line names it.
FAILED_HINTS = {
    "401": "no or a wrong token: give the env atropos.inference.api_key as --openai.api_key",
    "404": "the endpoint serves no such route, or no such model: its model is actor_rollout_ref.model.path",
    "422": "the endpoint refused the request: the trainer's log says why (each reason once)",
    "5xx": "the endpoint failed to answer: see the trainer's log",
}
# The first words of the paragraph a trainer prints when it stops on an error the recipe raised on purpose (the poll
# timeout above all); the launcher looks for them in the trainer's log.
STOPPED = "atropos-verl: the trainer stopped:"


def get_json(url: str) -> dict[str, Any] | None:
    """The JSON of a 200 answer to ``GET url`` (within a few seconds), else None."""
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


def _stats(health: dict[str, Any] | None) -> dict[str, Any]:
    stats = (health or {}).get("stats")
    return stats if isinstance(stats, dict) else {}


def env_calls(health: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    """Env ``name``'s counters in the endpoint's ``/health`` (``{"routes", "completions"}``; ``{}`` when it made no
    call), or None when they are unknown: no answer, an endpoint without per-env counters, or one whose completions
    are attributed to no env (envs not given the per-env base URL)."""
    stats = _stats(health)
    envs = stats.get("envs")
    if health is None or not isinstance(envs, dict):
        return None
    if name in envs and isinstance(envs[name], dict):
        return envs[name]
    if not envs and stats.get("completions", 0):
        return None  # completions served, none to a named env: this run's envs do not call through /env/<name>
    return {}


def served_to(health: dict[str, Any] | None, name: str) -> int | None:
    """The completions the endpoint served to env ``name`` (0 when the endpoint served none at all), None when
    unknown (see :func:`env_calls`)."""
    calls = env_calls(health, name)
    if calls is not None:
        return int(calls.get("completions", 0) or 0)
    if health is not None and not _stats(health).get("completions", 0):
        return 0
    return None


def _failed(routes: Any) -> dict[str, dict[str, int]]:
    """route -> {status: count} of the calls answered with a status >= 400."""
    out: dict[str, dict[str, int]] = {}
    for route, statuses in (routes or {}).items() if isinstance(routes, dict) else ():
        for status, count in (statuses or {}).items() if isinstance(statuses, dict) else ():
            if str(status).isdigit() and int(status) >= 400 and int(count or 0) > 0:
                out.setdefault(str(route), {})[str(status)] = int(count)
    return out


def _hint(status: str) -> str:
    return FAILED_HINTS.get(status) or (FAILED_HINTS["5xx"] if status.startswith("5") else "")


def failed_calls(routes: Any) -> list[str]:
    """``41 calls to /v1/chat/completions failed (404: the endpoint serves no such route, ...)``, one per route with
    failed calls in ``routes`` (``{path: {http status: count}}``)."""
    out = []
    for route, statuses in sorted(_failed(routes).items()):
        if len(statuses) == 1:
            ((status, _),) = statuses.items()
            why = f"{status}: {_hint(status)}" if _hint(status) else status
        else:
            why = ", ".join(f"{n} x {s}: {_hint(s)}" if _hint(s) else f"{n} x {s}" for s, n in sorted(statuses.items()))
        total = sum(statuses.values())
        out.append(f"{total} call{'s' if total > 1 else ''} to {route} failed ({why})")
    return out


def _unattributed(stats: dict[str, Any]) -> dict[str, dict[str, int]]:
    """The endpoint's failed calls that no env's counters hold (per route and status)."""
    rest = _failed(stats.get("routes"))
    envs = stats.get("envs")
    for env in envs.values() if isinstance(envs, dict) else ():
        for route, statuses in _failed((env or {}).get("routes") if isinstance(env, dict) else None).items():
            for status, count in statuses.items():
                if route in rest and status in rest[route]:
                    rest[route][status] -= count
    return {route: {s: n for s, n in sts.items() if n > 0} for route, sts in rest.items()}


def _endpoint_part(calls: dict[str, Any] | None) -> str:
    if calls is None:
        return ""
    text = f", {int(calls.get('completions', 0) or 0)} completions served"
    return text + "".join(f", {failure}" for failure in failed_calls(calls.get("routes")))


def _sorted_ids(ids: set[str]) -> list[str]:
    return sorted(ids, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0, k))


def wait_line(
    step: int,
    waited_s: float,
    *,
    guard: dict[str, Any] | None,
    status: dict[str, Any] | None,
    health: dict[str, Any] | None,
    env_names: dict[str, str],
    now: float | None = None,
    env_notes: dict[str, str] | None = None,
) -> str:
    """The line from the answers of ``/guard/stats`` (``guard``), ``/status`` and the endpoint's ``/health`` (each
    None when that service did not answer), the env names by env id and, by env name, what else to say of an env
    (``env_notes``: the launcher's count of the errors in its log)."""
    now = time.time() if now is None else now
    notes = env_notes or {}
    parts = [f"waiting {waited_s:.0f} s for step {step}"]
    if guard is not None:
        parts.append(f"API queue {guard.get('queue_groups', 0)} groups")
    elif status is not None:
        parts.append(f"API queue {status.get('queue_size', 0)} groups")
    else:
        parts.append("API: no answer")
    counted = (guard or {}).get("envs", {})
    for env_id in _sorted_ids({*env_names, *counted}):
        name = env_names.get(env_id, f"id {env_id}")
        if guard is None:
            text = f"env {name}: no per-env counts (plain run-api)"
        else:
            env = counted.get(env_id, {})
            text = (
                f"env {name}: {env.get('received', 0)} groups received ({env.get('rejected', 0)} rejected), last post "
                f"{_ago(env.get('last_post'), now)}"
            )
            if env.get("last_rejection"):
                text += f", last rejection: {env['last_rejection'][:160]}"
        text += _endpoint_part(env_calls(health, name)) if env_id in env_names else ""
        parts.append(text + (f", {notes[name]}" if name in notes else ""))
    named = set(env_names.values())
    envs = _stats(health).get("envs")
    for name in sorted(envs) if isinstance(envs, dict) else ():
        if name not in named:  # it calls the endpoint but registered with the API under no id the launcher knows
            parts.append(f"env {name} (endpoint counters only):{_endpoint_part(env_calls(health, name))[1:]}")
    if not env_names and not counted and not (isinstance(envs, dict) and envs):
        parts.append("no environment registered")
    if health is None:
        parts.append("endpoint: no answer")
    else:
        text = f"endpoint: {_stats(health).get('completions', 0)} completions served"
        rest = failed_calls(_unattributed(_stats(health)))
        parts.append(text + "".join(f", {failure}" for failure in rest))
    return " | ".join(parts)


def check_line(
    *,
    guard: dict[str, Any] | None,
    status: dict[str, Any] | None,
    health: dict[str, Any] | None,
    env_names: dict[str, str],
    waited_s: float,
    logs_dir: Path | str | None = None,
) -> str:
    """What to check after a wait without data, from the same answers as :func:`wait_line`: ``What to check: ...``."""
    checks = []
    if guard is None and status is None:
        checks.append("the Atropos API did not answer: is run-api running at atropos.api_url?")
    counted = (guard or {}).get("envs", {})
    if guard is not None and not counted and not env_names:
        checks.append(
            "no environment registered with the API: are the envs running and pointed at it (--env.rollout_server_url)?"
        )
    named = set(env_names.values())
    envs = _stats(health).get("envs")
    entries = []  # (name, the API's counters, the endpoint's)
    for env_id in _sorted_ids({*env_names, *counted}):
        name = env_names.get(env_id)
        api = counted.get(env_id, {}) if guard is not None else None  # the guard lists the envs that posted
        entries.append((name or f"id {env_id}", api, env_calls(health, name) if name else None))
    others = sorted(name for name in envs if name not in named) if isinstance(envs, dict) else []
    entries += [(name, None, env_calls(health, name)) for name in others]
    for name, env, calls in entries:
        received = (env or {}).get("received", 0)
        failed = failed_calls(calls.get("routes")) if calls else []
        if failed:
            checks.append(f"env {name}'s calls to the endpoint fail (what each status means is above)")
        elif calls is not None and not calls.get("completions") and not received:
            checks.append(
                f"env {name} got no completion from the endpoint: its log says why (it fails before it generates, "
                "or calls another server than --openai.base_url)"
            )
        elif calls and env is not None and not received:
            checks.append(
                f"env {name} generates but posts no group: it drops them itself (equal scores, group size, "
                "length: its log says which)"
            )
        if (env or {}).get("rejected"):
            checks.append(f"the API refuses env {name}'s groups (last rejection above; rejected_groups.jsonl)")
    logs = f" in {logs_dir}" if logs_dir else ""
    checks.append(
        f'each env\'s log{logs}; docs/atropos.rst, "Using stock Atropos environments"; raise atropos.poll_timeout_s '
        f"(waited {waited_s:.0f} s) only if the envs are just slow"
    )
    return "What to check: " + "; ".join(checks) + "."


def describe_wait(
    step: int,
    waited_s: float,
    *,
    api_url: str,
    inference_url: str | None,
    env_ids_file: Path | str | None,
    env_notes: dict[str, str] | None = None,
    checks: bool = False,
) -> str:
    """:func:`wait_line` with the services asked now (each request times out after a few seconds); with ``checks``
    a second line, :func:`check_line`."""
    guard = get_json(f"{api_url}/guard/stats")
    status = None if guard is not None else get_json(f"{api_url}/status")
    health = get_json(f"{inference_url}/health") if inference_url else None
    names = read_env_names(env_ids_file)
    line = wait_line(step, waited_s, guard=guard, status=status, health=health, env_names=names, env_notes=env_notes)
    if not checks:
        return line
    logs = RunDir(Path(env_ids_file).parent).logs if env_ids_file else None  # env_ids.json's run directory
    check = check_line(guard=guard, status=status, health=health, env_names=names, waited_s=waited_s, logs_dir=logs)
    return f"{line}\n{check}"


def stop_paragraph(message: str) -> str:
    """The paragraph a trainer prints when it stops on an error the recipe raises on purpose: :data:`STOPPED`, the
    error's message (for the poll timeout: what it waited for, the waiting line, what to check), a blank line."""
    return f"{STOPPED} {message.strip()}\n"


def find_stop(text: str) -> str | None:
    """The last :func:`stop_paragraph` in ``text`` (a trainer's log), without its trailing blank line; None if none."""
    starts = [m.start() for m in re.finditer(f"^{re.escape(STOPPED)}", text, re.MULTILINE)]
    return text[starts[-1] :].split("\n\n", 1)[0].strip() if starts else None


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
        """The waiting line of a wait that ends without data (the poll timed out, the trainer fails with it) and, on
        a second line, what to check; the wait file goes, so the launcher stops reporting a wait while the trainer
        shuts down."""
        waited = 0.0 if self._since is None else time.time() - self._since
        self.done()
        return describe_wait(
            step,
            waited,
            api_url=self.api_url,
            inference_url=self.inference_url,
            env_ids_file=self.env_ids_file,
            checks=True,
        )
