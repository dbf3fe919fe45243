"""Who may call our two HTTP services once they listen beyond loopback: one home for both.

- The inference endpoint (:mod:`recipe.atropos.endpoint.server`) takes a bearer token: ``atropos.inference.api_key``,
  else the environment variable :data:`API_KEY_ENV`. Environments send it with ``--openai.api_key``; atroposlib's
  ``vllm`` server type puts it in ``Authorization: Bearer <key>`` on ``/generate`` and ``/health``. A request without
  the right token gets **401**. ``GET /health`` stays open (it tells only the policy version and whether the
  endpoint is paused or final, as vLLM's own ``--api-key`` leaves ``/health`` open): liveness probes and the launcher's
  start-up wait need no secret.
- The guarded API (:mod:`recipe.atropos.guard.app`) takes an allow-list of client networks
  (``atropos.launcher.api_allow``, CIDRs), since atroposlib's environments cannot send a token to the API. A client
  outside it gets **403**. Loopback clients are always let in (the launcher and a trainer on the API's host).

A refused request is counted (:class:`Refusals`) and logged once per client address. Starting either service on an
address other than loopback without its token / allow-list is refused (:func:`check_exposure`) with an error naming
the key to set. Lowest layer: imports nothing from the recipe.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

logger = logging.getLogger(__name__)

API_KEY_ENV = "ATROPOS_INFERENCE_API_KEY"  # read when atropos.inference.api_key is null
LOOPBACK_NETWORKS = ("127.0.0.0/8", "::1/128")
OPEN_PATHS = ("/health",)  # answered without the token (GET only)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def inference_token(configured: str | None) -> str | None:
    """The endpoint's token: ``atropos.inference.api_key`` if set, else ``$ATROPOS_INFERENCE_API_KEY``, else None."""
    return configured or os.environ.get(API_KEY_ENV) or None


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses; False for ``0.0.0.0``, ``::`` and every other address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve beyond loopback


def parse_networks(cidrs: Iterable[str], key: str = "atropos.launcher.api_allow") -> list[Network]:
    """The networks of ``cidrs`` (``10.0.0.0/8``, ``192.0.2.7``); ``ValueError`` names ``key`` and the bad entry."""
    networks = []
    for cidr in cidrs:
        try:
            networks.append(ipaddress.ip_network(str(cidr).strip(), strict=False))
        except ValueError as exc:
            raise ValueError(f"{key}: {cidr!r} is not a network ({exc}); use CIDRs like 10.0.0.0/24") from None
    return networks


def check_exposure(host: str, *, guarded: bool, what: str, key: str) -> None:
    """Refuse to serve ``what`` on a non-loopback ``host`` without its access control (``guarded``)."""
    if not guarded and not is_loopback(host):
        raise ValueError(
            f"{what} would listen on {host}, beyond loopback, and let anyone in: set {key} (or listen on 127.0.0.1)"
        )


def count_into(stats: dict[str, Any], key: str) -> Callable[[], None]:
    """An ``on_refuse`` that adds one to ``stats[key]``."""

    def bump() -> None:
        stats[key] = stats.get(key, 0) + 1

    return bump


class Refusals:
    """Refused requests by client address; the first from each client is logged with ``hint``, ``on_refuse`` (if
    given) runs for every one (the services count them in their own stats)."""

    def __init__(self, what: str, hint: str, on_refuse: Callable[[], None] | None = None) -> None:
        self.what = what
        self.hint = hint
        self.on_refuse = on_refuse
        self.by_client: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_client.values())

    def refuse(self, client: str, reason: str) -> None:
        self.by_client[client] += 1
        if self.by_client[client] == 1:
            logger.warning("%s refused a request from %s: %s (%s)", self.what, client, reason, self.hint)
        if self.on_refuse is not None:
            self.on_refuse()


def _client(scope: dict[str, Any]) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


async def _deny(send: Any, status: int, error: str, headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": error}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


class BearerTokenMiddleware:
    """ASGI: HTTP requests need ``Authorization: Bearer <token>`` (constant-time compare), except ``GET`` of
    :data:`OPEN_PATHS`; others get 401. ``token=None`` lets everything through (a loopback-only service)."""

    def __init__(self, app: Any, token: str | None, refusals: Refusals) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode() if token else None
        self.refusals = refusals

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self.expected is None or scope["type"] != "http" or self._open(scope):
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            await self.app(scope, receive, send)
            return
        reason = "wrong bearer token" if given else "no Authorization header"
        self.refusals.refuse(_client(scope), reason)
        await _deny(send, 401, f"unauthorized: {reason}", [(b"www-authenticate", b"Bearer")])

    @staticmethod
    def _open(scope: dict[str, Any]) -> bool:
        return scope["method"] == "GET" and (scope["path"].rstrip("/") or "/") in OPEN_PATHS


class NetworkAllowListMiddleware:
    """ASGI: HTTP and websocket clients whose address is outside ``networks`` (plus loopback) get 403.
    ``networks=None`` lets everything through (a loopback-only service)."""

    def __init__(self, app: Any, networks: Sequence[Network] | None, refusals: Refusals) -> None:
        self.app = app
        self.networks = None if networks is None else [*networks, *parse_networks(LOOPBACK_NETWORKS)]
        self.refusals = refusals

    def allows(self, client: str) -> bool:
        if self.networks is None:
            return True
        try:
            address = ipaddress.ip_address(client)
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or self.allows(_client(scope)):
            await self.app(scope, receive, send)
            return
        self.refusals.refuse(_client(scope), "client address outside the allow-list")
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        await _deny(send, 403, "forbidden: this client's network is not in the API's allow-list")
