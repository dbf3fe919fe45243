"""What an environment's ``config_init`` declares, read in the environment's own interpreter.

Run by the launcher, by file path, with the env's interpreter and the env's ``PYTHONPATH`` (its entry's
``pythonpath``), so the env is imported exactly as ``serve`` will import it::

    <env python> .../recipe/atropos/launcher/env_probe.py (--script FILE | --module NAME)

It imports the env without running it (a script is loaded as a module of another name, so its
``if __name__ == "__main__": X.cli()`` does not fire), finds the ``BaseEnv`` subclass the file starts (the class whose
``cli()`` the file calls; else the last ``BaseEnv`` subclass defined in that file), calls its ``config_init()`` and
prints one line ``ATROPOS_ENV_PROBE {json}``: ``class``, ``kind`` (``list``: a list of servers; ``single``: one
``APIServerConfig``; ``baseline``: a ``ServerBaseline``) and ``servers`` (each server's fields, JSON). Failures print
``ATROPOS_ENV_PROBE_ERROR <one line>`` and exit 1. Anything the env prints while imported goes to stderr.

Stdlib and atroposlib only: this file runs in any interpreter that runs environments (not only this project's).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

RESULT = "ATROPOS_ENV_PROBE "
ERROR = "ATROPOS_ENV_PROBE_ERROR "
SCRIPT_MODULE = "__atropos_env_probe_target__"


class ProbeError(Exception):
    """The env cannot be probed; the message is one line."""


def cli_class_names(source: str) -> list[str]:
    """Names ``X`` of the calls ``X.cli()`` in ``source``, in source order."""
    calls = [
        node
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "cli"
        and isinstance(node.func.value, ast.Name)
    ]
    return [call.func.value.id for call in sorted(calls, key=lambda c: (c.lineno, c.col_offset))]


def load_script(path: str) -> tuple[ModuleType, Path]:
    """``path`` imported as ``python path`` would see it (its folder first on sys.path), without running its
    ``__main__`` block."""
    file = Path(path).expanduser().absolute()
    if not file.is_file():
        raise ProbeError(f"script {path} does not exist")
    sys.path.insert(0, str(file.parent))
    spec = importlib.util.spec_from_file_location(SCRIPT_MODULE, file)
    if spec is None or spec.loader is None:
        raise ProbeError(f"script {path} cannot be loaded as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[SCRIPT_MODULE] = module  # pydantic resolves the env config's annotations through sys.modules
    spec.loader.exec_module(module)
    return module, file


def load_module(name: str) -> tuple[ModuleType, Path]:
    """``name`` imported as ``python -m name`` would find it (the working directory first on sys.path)."""
    sys.path.insert(0, os.getcwd())
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as exc:
        raise ProbeError(f"module {name!r} is not importable ({type(exc).__name__}: {exc})") from None
    if spec is None:
        raise ProbeError(f"module {name!r} is not importable (not found on sys.path)")
    if spec.submodule_search_locations is not None:
        raise ProbeError(f"module {name!r} is a package: name the module that calls cli() (e.g. {name}.env)")
    if not spec.origin or not Path(spec.origin).is_file():
        raise ProbeError(f"module {name!r} has no source file")
    return importlib.import_module(name), Path(spec.origin)


def env_class(module: ModuleType, source: Path) -> type:
    """The ``BaseEnv`` subclass whose ``cli()`` the file calls (the last call), else the last one it defines."""
    from atroposlib.envs.base import BaseEnv

    def is_env(obj: Any) -> bool:
        return isinstance(obj, type) and issubclass(obj, BaseEnv) and obj is not BaseEnv

    for name in reversed(cli_class_names(source.read_text(errors="replace"))):
        if is_env(getattr(module, name, None)):
            return getattr(module, name)
    defined = [obj for obj in vars(module).values() if is_env(obj) and obj.__module__ == module.__name__]
    if not defined:
        raise ProbeError(f"{source} defines no atroposlib BaseEnv subclass and calls no BaseEnv's cli()")
    return defined[-1]


def describe_servers(servers: Any) -> dict[str, Any]:
    """``{"kind", "servers"}`` of what ``config_init`` returned as its servers."""
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig, ServerBaseline

    if isinstance(servers, list | tuple):
        return {"kind": "list", "servers": [s.model_dump(mode="json") for s in servers]}
    if isinstance(servers, APIServerConfig):  # before ServerBaseline: APIServerConfig is one
        return {"kind": "single", "servers": [servers.model_dump(mode="json")]}
    if isinstance(servers, ServerBaseline):
        return {"kind": "baseline", "servers": [servers.model_dump(mode="json")]}
    raise ProbeError(f"config_init() returned servers of type {type(servers).__name__}, not a list or config")


def probe(script: str | None, module: str | None) -> dict[str, Any]:
    with contextlib.redirect_stdout(sys.stderr):  # what the env prints must not mix with the result line
        try:
            loaded, source = load_script(script) if script else load_module(str(module))
        except ProbeError:
            raise
        except BaseException as exc:  # noqa: BLE001 - any import failure of the env is reported in one line
            raise ProbeError(f"importing it failed: {type(exc).__name__}: {exc}".replace("\n", " ")) from None
        cls = env_class(loaded, source)
        try:
            _, servers = cls.config_init()
        except BaseException as exc:  # noqa: BLE001
            raise ProbeError(f"{cls.__name__}.config_init() failed: {type(exc).__name__}: {exc}") from None
        return {"class": cls.__name__, "file": str(source), **describe_servers(servers)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print what an Atropos env's config_init() declares (JSON).")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--script")
    target.add_argument("--module")
    args = parser.parse_args(argv)
    try:
        result = probe(args.script, args.module)
    except ProbeError as exc:
        print(ERROR + str(exc).replace("\n", " "), flush=True)
        return 1
    print(RESULT + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    # Run by path: this file's folder (config.py, env_entries.py, ...) must not shadow the env's own modules.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    sys.exit(main())
