"""The environments of a launch: their checked ``atropos.launcher.envs`` entries, what each declares (probed in its own
interpreter), their command lines and process environments, and their registration with the Atropos API.

Invariants:

- an env's name (``name``, else ``env<index>``) is unique and URL-safe: it names the process, its log file, its entry
  in ``env_ids.json`` and its path at the endpoint (``{inference_url}/env/<name>/v1``, the endpoint counts requests by
  it);
- an entry gives exactly one of ``module`` (run with ``python -m``) or ``script`` (checked by the typed config,
  :class:`recipe.atropos.config.LauncherConfig`);
- every env's ``group_size`` divides ``data.train_batch_size`` (else the API never forms a batch);
- an env runs in its own interpreter (:func:`recipe.atropos.launcher.env_python.resolve_env_python`) with its
  ``pythonpath`` first on ``PYTHONPATH``; the probe (:mod:`recipe.atropos.launcher.env_probe`) runs the same way;
- an env whose ``config_init`` declares two or more servers gets no ``--openai.*`` flag (atroposlib exits 2 on one)
  but ``--config <run_dir>/env_configs/<name>.yaml`` with an ``openai:`` list, the policy server pointed at the
  endpoint (:func:`server_list`);
- envs register one at a time, so the env id the API hands out (its registration count) names the env just started;
  ``env_ids.json`` (env id -> name, read by the trainer for exact env mixtures) is replaced whole, never half-written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
import yaml

from recipe.atropos.launcher import env_probe
from recipe.atropos.launcher.config import LaunchError
from recipe.atropos.launcher.processes import ManagedProcess
from recipe.atropos.records import write_json_atomic
from recipe.atropos.staleness import env_max_batches_offpolicy

if TYPE_CHECKING:  # the typed config imports verl: not at import time
    from recipe.atropos.config import EnvConfig, LauncherConfig

logger = logging.getLogger("atropos_launcher")

ENV_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PROBE_SCRIPT = Path(env_probe.__file__).resolve()
PROBE_TIMEOUT_S = 300.0
REQUIREMENTS_HINT = "python -m recipe.atropos.launcher.env_python --requirements REQUIREMENTS.txt"


def checked_envs(launcher: LauncherConfig, batch_size: int) -> dict[str, EnvConfig]:
    """The ``atropos.launcher.envs`` entries by name, in order; :class:`LaunchError` names the entry and the fix."""
    if not launcher.envs:
        raise LaunchError("atropos.launcher.envs is empty: name at least one environment (module or script)")
    envs: dict[str, EnvConfig] = {}
    for i, (name, env) in enumerate(zip(launcher.env_names(), launcher.envs, strict=True)):
        if not ENV_NAME.fullmatch(name) or name.startswith("v1"):
            raise LaunchError(
                f"atropos.launcher.envs[{i}]: the name {name!r} must be letters, digits, '.', '_', '-' and not "
                "start with 'v1' (it is a path segment of the env's endpoint URL, from which atroposlib cuts '/v1'); "
                "rename it"
            )
        if name in envs:
            raise LaunchError(f"atropos.launcher.envs[{i}]: the name {name!r} is taken by another env; rename one")
        if env.group_size < 1 or batch_size % env.group_size:
            raise LaunchError(
                f"data.train_batch_size={batch_size} is not a multiple of env {name!r} group_size="
                f"{env.group_size}: the Atropos API would never form a batch. Change one of them."
            )
        envs[name] = env
    return envs


def _absolute(path: str) -> str:
    """``~`` expanded, relative to the working directory (the launcher's, which its children share)."""
    return os.path.abspath(os.path.expanduser(str(path)))


def env_pythonpath(env: EnvConfig) -> list[str]:
    """The entry's ``pythonpath`` folders, absolute."""
    return [_absolute(p) for p in env.pythonpath]


def env_environ(env: EnvConfig, python: str | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The variables an env's process (and its probe) gets on top of the launcher's: ``PYTHONPATH`` with the entry's
    folders first; with ``python`` inside a venv, that venv's ``bin`` first on ``PATH`` and ``VIRTUAL_ENV`` (as if
    activated: a ``python`` the env starts by name is its own)."""
    base = os.environ if base is None else base
    extra: dict[str, str] = {}
    folders = env_pythonpath(env)
    if folders:
        extra["PYTHONPATH"] = os.pathsep.join([*folders, *([base["PYTHONPATH"]] if base.get("PYTHONPATH") else [])])
    if python:
        bin_dir = os.path.dirname(_absolute(python))
        venv = os.path.dirname(bin_dir)
        if os.path.isfile(os.path.join(venv, "pyvenv.cfg")):
            extra["VIRTUAL_ENV"] = venv
            extra["PATH"] = os.pathsep.join([bin_dir, *([base["PATH"]] if base.get("PATH") else [])])
    return extra


@dataclass(frozen=True)
class EnvServers:
    """What an env's ``config_init()`` declares as its servers (:mod:`recipe.atropos.launcher.env_probe`)."""

    kind: str = "list"  # list | single | baseline
    servers: list[dict[str, Any]] = field(default_factory=list)
    env_class: str = ""

    @property
    def multi(self) -> bool:
        """Two or more servers: atroposlib refuses ``--openai.*`` flags (exit 2), the launcher passes ``--config``."""
        return self.kind == "list" and len(self.servers) >= 2


def probe_argv(python: str, env: EnvConfig) -> list[str]:
    target = ["--module", env.module] if env.module else ["--script", _absolute(str(env.script))]
    return [python, str(PROBE_SCRIPT), *target]


class EnvEntryError(LaunchError):
    """An env entry that cannot start as written: ``reason`` (one line, with the fix) names no entry (the preflight
    prefixes ``atropos.launcher.envs[i] (name)``)."""

    def __init__(self, name: str, reason: str) -> None:
        super().__init__(f"env {name!r}: {reason}")
        self.name, self.reason = name, reason


class EnvProbeError(EnvEntryError):
    """An env that cannot be imported in its interpreter (:func:`probe_envs`)."""


def _probe_result(name: str, python: str, returncode: int, out: str, err: str) -> EnvServers:
    for line in reversed(out.splitlines()):
        if line.startswith(env_probe.RESULT):
            data = json.loads(line[len(env_probe.RESULT) :])
            return EnvServers(kind=data["kind"], servers=data["servers"], env_class=data.get("class", ""))
        if line.startswith(env_probe.ERROR):
            reason = line[len(env_probe.ERROR) :]
            break
    else:
        lines = err.strip().splitlines()
        reason = f"the probe exited with code {returncode}" + (f" ({lines[-1]})" if lines else "")
    if "ModuleNotFoundError" in reason or "not importable" in reason:
        fix = f"install what it needs into that interpreter ({REQUIREMENTS_HINT}) or add its folder to `pythonpath`"
    else:
        fix = "fix the env or its entry"
    raise EnvProbeError(name, f"{reason} (in {python}); {fix}")


def probe_envs(
    envs: Mapping[str, EnvConfig], pythons: Mapping[str, str], timeout_s: float = PROBE_TIMEOUT_S
) -> dict[str, EnvServers]:
    """Each env's declared servers, probed in its own interpreter with its own ``PYTHONPATH``: all at once, one probe
    per distinct (interpreter, target, pythonpath). :class:`EnvProbeError` (one line) names the first env, in order,
    that cannot be imported, and the fix."""
    keys = {
        name: (pythons[name], tuple(probe_argv(pythons[name], env)), tuple(env_pythonpath(env)))
        for name, env in envs.items()
    }
    procs: dict[tuple, subprocess.Popen] = {}
    for name, env in envs.items():
        if keys[name] not in procs:
            procs[keys[name]] = subprocess.Popen(
                probe_argv(pythons[name], env),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.DEVNULL,
                text=True,
                env={**os.environ, **env_environ(env, pythons[name])},
            )
    deadline = time.monotonic() + timeout_s
    done: dict[tuple, tuple[int, str, str]] = {}
    found: dict[str, EnvServers] = {}
    try:
        for name in envs:
            key = keys[name]
            if key not in done:
                try:
                    out, err = procs[key].communicate(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise EnvProbeError(
                        name, f"importing it in {pythons[name]} took over {timeout_s:.0f} s; fix the env"
                    ) from None
                done[key] = (procs[key].returncode, out, err)
            found[name] = _probe_result(name, pythons[name], *done[key])
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return found


def server_list(
    name: str, env: EnvConfig, declared: list[dict[str, Any]], endpoint: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The ``openai:`` list of a multi-server env: ``declared`` (config_init's, or the env's own YAML's), the one at
    ``policy_server`` updated with ``endpoint``, each updated with the entry's ``servers`` dict at its index (a dict
    past the declared ones adds a server)."""
    if env.policy_server >= len(declared):
        raise EnvEntryError(
            name,
            f"policy_server={env.policy_server} but config_init() declares {len(declared)} servers; use an index "
            f"below {len(declared)}",
        )
    merged = []
    for i in range(max(len(declared), len(env.servers))):
        server = dict(declared[i]) if i < len(declared) else {}
        if i == env.policy_server:
            server.update(endpoint)
        if i < len(env.servers):
            server.update(env.servers[i] or {})
        merged.append(server)
    first, policy = merged[0].get("server_type", "openai"), merged[env.policy_server].get("server_type")
    if first != policy:
        raise EnvEntryError(
            name,
            f"atroposlib talks to all of an env's servers with the client of servers[0] (server_type {first}), but "
            f"the policy server (index {env.policy_server}) is {policy}: set servers[0].server_type to {policy} in "
            "the entry's `servers`, or make the policy index 0",
        )
    return merged


def servers_config(
    name: str, env: EnvConfig, servers: EnvServers | None, endpoint: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The ``--config`` YAML of a multi-server env (the env's own ``args.config`` YAML, if any, with the ``openai:``
    list of :func:`server_list`); None for a one-server env, whose endpoint goes in ``--openai.*`` flags.
    :class:`EnvEntryError` when the entry does not fit what ``config_init`` declares."""
    if servers is None or not servers.multi:
        if env.servers or env.policy_server:
            raise EnvEntryError(
                name,
                "declares one server: `servers` and `policy_server` are for envs whose config_init() declares two or "
                "more; set this one's fields with args (e.g. openai.timeout: 600)",
            )
        return None
    openai_args = sorted(k for k in env.args if k.startswith("openai."))
    if openai_args:
        raise EnvEntryError(
            name,
            f"declares {len(servers.servers)} servers: atroposlib refuses --openai.* flags then; move args "
            f"{', '.join(openai_args)} into `servers` (a dict per server index)",
        )
    own = env.args.get("config")  # the env's own YAML: kept, its openai list (if any) taken as the declared one
    if own and not Path(_absolute(str(own))).is_file():
        raise EnvEntryError(name, f"args.config {own} does not exist; fix the path or drop it")
    payload = (yaml.safe_load(Path(_absolute(str(own))).read_text()) or {}) if own else {}
    declared = payload.get("openai")
    if not (isinstance(declared, list) and len(declared) >= 2):
        declared = servers.servers
    payload["openai"] = server_list(name, env, declared, endpoint)
    return payload


def check_servers(name: str, env: EnvConfig, servers: EnvServers | None) -> None:
    """:class:`EnvEntryError` now (the preflight) where :func:`env_argv` would raise it at the env's start."""
    servers_config(name, env, servers, {"server_type": "vllm"})


def _write_private_yaml(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as YAML at ``path``, readable by its owner only (it holds API keys), replaced whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(payload, fh, sort_keys=False)
    os.replace(tmp, path)


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
    python: str | None = None,
    servers: EnvServers | None = None,
    config_dir: Path | None = None,
) -> list[str]:
    """``<python> (-m MODULE | SCRIPT) serve --flag value ...``: the API, the endpoint
    (``{inference_url}/env/<name>/v1``) and the model filled in, envs kept within the lag cap
    (:func:`~recipe.atropos.staleness.env_max_batches_offpolicy`); ``env.args`` win.

    ``python``: the env's interpreter (default: this one). ``servers``: what its ``config_init`` declares
    (:func:`probe_envs`; None = one server); with two or more, the endpoint goes into ``<config_dir>/<name>.yaml``
    (written here, passed as ``--config``) instead of ``--openai.*`` flags."""
    target = ["-m", env.module] if env.module else [_absolute(str(env.script))]
    base_url = f"{inference_url}/env/{name}/v1"
    if base_url.count("/v1") != 1:  # atroposlib's vllm client cuts every "/v1" out of it
        raise EnvEntryError(name, f"the endpoint URL {base_url} holds '/v1' twice; rename the env or the host")
    endpoint = {
        "server_type": "vllm",
        "base_url": base_url,
        "model_name": model,
        "tokenizer_name": model,
        "api_key": api_key or "x",  # the endpoint's token (recipe.atropos.access); "x": none needed
    }
    flags: dict[str, Any] = {
        "env.rollout_server_url": api_url,
        "env.tokenizer_name": model,
        "env.group_size": env.group_size,
        "env.inference_weight": env.weight,
        "env.max_token_length": max_token_length,
        "env.use_wandb": False,
        "env.wandb_name": name,
    }
    ahead = env_max_batches_offpolicy(max_policy_lag)
    if ahead is not None:
        flags["env.max_batches_offpolicy"] = ahead
    payload = servers_config(name, env, servers, endpoint)
    if payload is None:
        flags.update({f"openai.{key}": value for key, value in endpoint.items()})
        flags.update(env.args)
    else:
        if config_dir is None:
            raise ValueError("env_argv: a multi-server env needs config_dir for its --config YAML")
        path = Path(config_dir) / f"{name}.yaml"
        _write_private_yaml(path, payload)
        flags.update(env.args)
        flags["config"] = str(path)
    cli = []
    for key, value in flags.items():
        cli += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
    return [python or sys.executable, *target, "serve", *cli]


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


# What recipe.atropos.envs.distill reads for the launcher's teacher (atropos.launcher.teacher); named there too (that
# module runs in the envs' interpreter and imports atroposlib), a test holds the two equal.
TEACHER_URL_ENV = "ATROPOS_TEACHER_URL"
TEACHER_TOP_K_ENV = "ATROPOS_TEACHER_TOP_K"


def teacher_environ(teacher_url: str | None, top_k: int) -> dict[str, str]:
    """The variables that point an env's teacher mixin at the launcher's teacher endpoint (``{teacher_url}/v1``,
    asked for ``top_k`` entries per position); {} without a teacher."""
    if not teacher_url:
        return {}
    return {TEACHER_URL_ENV: f"{teacher_url.rstrip('/')}/v1", TEACHER_TOP_K_ENV: str(int(top_k))}


def write_env_ids(path: Path, env_ids: dict[int, str]) -> None:
    """``{"<env id>": "<env name>"}``, replaced whole (the trainer reads it while the launcher writes)."""
    write_json_atomic(path, {str(k): v for k, v in env_ids.items()})
