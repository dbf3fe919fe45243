"""ASGI plumbing of the guarded API: read a request body, replay it to the wrapped app, send a JSON or raw answer."""

from __future__ import annotations

import json
from typing import Any


async def read_body(receive: Any) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def send_raw(send: Any, status: int, headers: dict, body: bytes) -> None:
    """``body`` (already decompressed) with atroposlib's headers minus its encoding and length."""
    keep = [(k, v) for k, v in headers.items() if k not in (b"content-encoding", b"content-length")]
    keep.append((b"content-length", str(len(body)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": keep})
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Any, status: int, payload: Any) -> None:
    body = json.dumps(payload, default=str).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
