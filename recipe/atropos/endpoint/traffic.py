"""Who called the inference endpoint, where, and with what answer: the per-route and per-env counters of ``/health``.

The launcher gives each environment the base URL ``{endpoint}/env/<env name>/v1``, so atroposlib calls
``/env/<name>/v1/chat/completions``, ``/env/<name>/generate`` and ``/env/<name>/health``. :class:`EnvRouteMiddleware`
(the endpoint's outermost ASGI middleware) strips the leading ``/env/<name>`` from ``scope["path"]`` and
``scope["raw_path"]``, puts the env name in ``scope["state"]["env"]`` and ``scope[ENV_SCOPE_KEY]``, and once the
answer has gone out counts ``(path, status)`` in :class:`Traffic`: every request (the bearer token's 401s, unknown
paths' 404s included) except ``/health``, which clients poll every second.

``Traffic.snapshot()`` is what ``/health`` adds inside ``stats``::

    "routes": {"/v1/chat/completions": {"200": 12, "404": 1}, ...}
    "envs": {"<env name>": {"routes": {path: {status: n}}, "completions": n}}

Paths are counted after stripping, statuses as strings. At most :data:`MAX_KEYS` distinct paths (and as many env
names) are kept; the rest are counted under ``"other"``. ``envs`` holds only requests that came with the prefix;
``completions`` there are the sequences generated for that env.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

ENV_SCOPE_KEY = "atropos.env"  # the env name of a request that came as /env/<name>/..., else absent
OTHER = "other"
MAX_KEYS = 64
UNCOUNTED_PATHS = ("/health",)
_PREFIX = re.compile(r"^/env/([^/]+)(/.*)?$", re.DOTALL)
_RAW_PREFIX = re.compile(rb"^/env/[^/]+(/.*)?$", re.DOTALL)


def _bounded(table: dict[str, Any], key: str) -> str:
    return key if key in table or len(table) < MAX_KEYS else OTHER


class Traffic:
    """Requests by ``(path, status)``, overall and per env, and completions per env. Lives on the endpoint's event
    loop (no lock: only that thread writes or reads it)."""

    def __init__(self) -> None:
        self.routes: dict[str, Counter[str]] = {}
        self.envs: dict[str, dict[str, Any]] = {}

    @staticmethod
    def _count(routes: dict[str, Counter[str]], path: str, status: int) -> None:
        routes.setdefault(_bounded(routes, path), Counter())[str(status)] += 1

    def _env(self, env: str) -> dict[str, Any]:
        return self.envs.setdefault(_bounded(self.envs, env), {"routes": {}, "completions": 0})

    def request(self, path: str, status: int, env: str | None) -> None:
        if path in UNCOUNTED_PATHS:
            return
        self._count(self.routes, path, status)
        if env is not None:
            self._count(self._env(env)["routes"], path, status)

    def completions(self, env: str | None, n: int) -> None:
        if env is not None:
            self._env(env)["completions"] += n

    def snapshot(self) -> dict[str, Any]:
        """``{"routes": ..., "envs": ...}`` as plain dicts (a copy)."""
        return {
            "routes": {path: dict(by_status) for path, by_status in self.routes.items()},
            "envs": {
                name: {"routes": {p: dict(s) for p, s in env["routes"].items()}, "completions": env["completions"]}
                for name, env in self.envs.items()
            },
        }


class EnvRouteMiddleware:
    """ASGI: strips ``/env/<name>`` off the path (the env name goes to the scope, see the module docstring) and counts
    every HTTP request's path and status in ``traffic`` once answered (500 when the app raised before answering)."""

    def __init__(self, app: Any, traffic: Traffic) -> None:
        self.app = app
        self.traffic = traffic

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        env = None
        match = _PREFIX.match(scope["path"])
        if match:
            env = match.group(1)
            raw = _RAW_PREFIX.match(scope.get("raw_path") or b"")
            path = match.group(2) or "/"
            raw_path = (raw.group(1) or b"/") if raw else path.encode()
            scope = {**scope, "path": path, "raw_path": raw_path, ENV_SCOPE_KEY: env}
            scope["state"] = {**(scope.get("state") or {}), "env": env}
        status = 500

        async def counting_send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.traffic.request(scope["path"], status, env)
