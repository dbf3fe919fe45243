"""The Atropos trajectory API behind validation: atroposlib's own ``run-api`` app, imported unchanged.

    python -m recipe.atropos.guard.app --host 127.0.0.1 --port 8000 --vocab-size 49152 --batch-size 64 \
        --rejected-file RUN/rejected_groups.jsonl --stats-file RUN/api_guard_stats.json

atroposlib's API queues any ScoredData whose types parse: a NaN score makes ``GET /batch`` answer 500 after popping
the batch, a token id past the vocabulary crashes the trainer's embedding, a group whose size does not divide the
batch size stalls batch formation forever, an empty group sits in the queue. This ASGI wrapper checks every
``POST /scored_data`` and ``/scored_data_list`` before atroposlib sees it (:func:`recipe.atropos.schema.validate_group`
with the vocabulary size and the batch size); a bad group gets **422** with the field and the reason, is counted, is
appended to the rejected-groups file, and never enters the queue. Valid groups of a list are still queued.

With ``--queue-file``, whatever the API still holds when it stops cleanly (SIGTERM/SIGINT: queued groups, formed
but unfetched batches, atroposlib's per-env buffers) is written there, and a later guarded API started with the same
file puts those groups back at the front of its queue right after the trainer registers: an interrupted run loses
no posted group (a SIGKILL still loses the in-memory queue; the trainer's spool keeps what was already fetched).

It also warns when an environment registers a group size that cannot pack into the batch, and serves
``GET /guard/stats``: accepted/rejected counts (persisted in the stats file, so they survive an API restart) and the
group sizes waiting in the queue with whether a batch can form from them (the trainer's poll uses this to say why no
batch comes).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from recipe.atropos.access import NetworkAllowListMiddleware, Refusals, check_exposure, parse_networks
from recipe.atropos.guard.state import GuardState, current_batch_size, queue_report
from recipe.atropos.schema import GroupValidationError, validate_group

logger = logging.getLogger("atropos_api_guard")

GUARDED_PATHS = ("/scored_data", "/scored_data_list")


async def _read_body(receive: Any) -> bytes:
    chunks, more = [], True
    while more:
        message = await receive()
        chunks.append(message.get("body", b""))
        more = message.get("more_body", False)
    return b"".join(chunks)


def _replay(body: bytes) -> Any:
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return receive


async def _send_json(send: Any, status: int, payload: Any) -> None:
    body = json.dumps(payload, default=str).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiGuard:
    """ASGI app: validates scored data, then hands every request to atroposlib's app (``inner``)."""

    def __init__(self, inner: Any, state: GuardState) -> None:
        self.inner = inner
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await self.inner(scope, self._on_shutdown(receive), send)
            return
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if method == "GET" and path == "/guard/stats":
            report = {**self.state.counters(), **queue_report(current_batch_size(self.state))}
            await _send_json(send, 200, report)
        elif method == "GET" and path == "/batch":
            await self._batch(send)
        elif method == "POST" and path in GUARDED_PATHS:
            await self._scored(scope, receive, send, as_list=path == "/scored_data_list")
        elif method == "POST" and path == "/register":
            await self.inner(scope, receive, send)
            self.state.restore_into_queue()
        elif method == "POST" and path == "/register-env":
            body = await _read_body(receive)
            self._check_env_group_size(body)
            await self.inner(scope, _replay(body), send)
        else:
            await self.inner(scope, receive, send)

    async def _batch(self, send: Any) -> None:
        """atroposlib's ``GET /batch`` route, its answer sent with ``json.dumps`` and uncompressed: through FastAPI
        (``jsonable_encoder`` walks every token, the GZip middleware compresses at level 9) one batch cost the API
        process more CPU than posting its groups, and blocked every post meanwhile (``make bench-guard``)."""
        from atroposlib.api.server import get_batch

        await _send_json(send, 200, await get_batch())

    def _on_shutdown(self, receive: Any) -> Any:
        """``receive`` that writes the held groups when the server announces its shutdown (SIGTERM / SIGINT)."""

        async def wrapped() -> dict[str, Any]:
            message = await receive()
            if message.get("type") == "lifespan.shutdown":
                try:
                    self.state.dump_queue()
                except Exception:  # a failed dump must not hide why: log it with the traceback
                    logger.exception("could not write the API's queue to %s", self.state.queue_file)
            return message

        return wrapped

    def _check_env_group_size(self, body: bytes) -> None:
        try:
            env = json.loads(body)
            group_size = int(env["group_size"])
        except (ValueError, KeyError, TypeError):
            return  # atroposlib answers malformed registrations itself (422)
        batch_size = current_batch_size(self.state)
        if batch_size and (group_size < 1 or batch_size % group_size):
            entry = {"desired_name": env.get("desired_name"), "group_size": group_size, "batch_size": batch_size}
            self.state.unpackable_envs.append(entry)
            self.state.save()
            logger.warning(
                "environment %r registers group_size=%d, which does not divide the batch size %d: its groups will be "
                "rejected. Use a group size that divides data.train_batch_size.",
                env.get("desired_name"),
                group_size,
                batch_size,
            )

    async def _scored(self, scope: dict[str, Any], receive: Any, send: Any, *, as_list: bool) -> None:
        body = await _read_body(receive)
        headers = dict(scope.get("headers") or [])
        try:
            text = gzip.decompress(body) if b"gzip" in headers.get(b"content-encoding", b"").lower() else body
            payload = json.loads(text)  # accepts NaN/Infinity literals, which the checks below then reject
        except (OSError, ValueError) as exc:
            error = GroupValidationError("body", f"not a JSON document ({exc})")
            self.state.reject(body[:2000].decode(errors="replace"), error)
            await _send_json(send, 422, {"status": "rejected", "field": "body", "reason": str(error)})
            return
        if as_list and not isinstance(payload, list):
            error = GroupValidationError("body", f"/scored_data_list expects a JSON list, got {type(payload).__name__}")
            self.state.reject(payload, error)
            await _send_json(send, 422, {"status": "rejected", "field": "body", "reason": str(error)})
            return
        raws = payload if as_list else [payload]
        batch_size = current_batch_size(self.state)
        good, rejected = [], []
        for index, raw in enumerate(raws):
            try:
                group = validate_group(raw, vocab_size=self.state.vocab_size, batch_size=batch_size)
            except GroupValidationError as error:
                self.state.reject(raw, error)
                rejected.append({"index": index, "field": error.field, "reason": str(error)})
                continue
            good.append((raw, group.size))
        if not rejected:
            await self._forward(scope, body, headers, send, good)
            return
        if good:  # the valid groups of a list are queued; only the bad ones are refused
            forwarded = json.dumps([raw for raw, _ in good]).encode()
            plain = [(k, v) for k, v in scope["headers"] if k not in (b"content-encoding", b"content-length")]
            plain.append((b"content-length", str(len(forwarded)).encode()))
            captured: list[dict[str, Any]] = []

            async def capture(message: dict[str, Any]) -> None:
                captured.append(message)

            await self.inner({**scope, "headers": plain}, _replay(forwarded), capture)
            status = next((m["status"] for m in captured if m["type"] == "http.response.start"), 500)
            if status < 400:
                self.state.accept(len(good), sum(n for _, n in good), [raw.get("env_id") for raw, _ in good])
        first = rejected[0]
        await _send_json(
            send,
            422,
            {
                "status": "rejected",
                "field": first["field"],
                "reason": first["reason"],
                "accepted": len(good),
                "rejected": rejected,
            },
        )

    async def _forward(self, scope: dict[str, Any], body: bytes, headers: dict, send: Any, good: list) -> None:
        status = 500

        async def watch(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.inner(scope, _replay(body), watch)
        if status < 400:
            self.state.accept(len(good), sum(n for _, n in good), [raw.get("env_id") for raw, _ in good])


def build_app(state: GuardState) -> ApiGuard:
    """atroposlib's API app (the module-level FastAPI app ``run-api`` serves) behind an :class:`ApiGuard`."""
    from atroposlib.api import app

    return ApiGuard(app, state)


def guard_argv(
    port: int,
    *,
    vocab_size: int | None,
    batch_size: int | None,
    rejected_file: Path | None = None,
    stats_file: Path | None = None,
    queue_file: Path | None = None,
    host: str = "127.0.0.1",
    allow: Sequence[str] = (),
) -> list[str]:
    """The command line that serves the guarded API (same interpreter)."""
    import sys

    argv = [sys.executable, "-m", "recipe.atropos.guard.app", "--host", host, "--port", str(port)]
    if vocab_size:
        argv += ["--vocab-size", str(vocab_size)]
    if batch_size:
        argv += ["--batch-size", str(batch_size)]
    if rejected_file:
        argv += ["--rejected-file", str(rejected_file)]
    if stats_file:
        argv += ["--stats-file", str(stats_file)]
    if queue_file:
        argv += ["--queue-file", str(queue_file)]
    if allow:
        argv += ["--allow", ",".join(allow)]
    return argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--vocab-size", type=int, default=None, help="token ids must be below this")
    parser.add_argument("--batch-size", type=int, default=None, help="until the trainer registers its own")
    parser.add_argument("--rejected-file", default=None, help="append rejected groups (JSONL) here")
    parser.add_argument("--stats-file", default=None, help="counters, kept across restarts")
    parser.add_argument("--queue-file", default=None, help="groups held at a clean stop; restored on the next start")
    parser.add_argument("--allow", default="", help="client networks let in besides loopback (CIDRs, comma-separated)")
    args = parser.parse_args(argv)
    allow = [c for c in args.allow.split(",") if c.strip()]
    try:
        check_exposure(args.host, guarded=bool(allow), what="the Atropos API", key="atropos.launcher.api_allow")
        networks = parse_networks(allow) if allow else None
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvicorn

    state = GuardState(
        vocab_size=args.vocab_size,
        batch_size=args.batch_size,
        rejected_file=args.rejected_file,
        stats_file=args.stats_file,
        queue_file=args.queue_file,
    )
    refusals = Refusals("the Atropos API", "set atropos.launcher.api_allow", state.count_refused)
    app = NetworkAllowListMiddleware(build_app(state), networks, refusals)
    # The queue is written at shutdown. proxy_headers off: the allow-list judges the socket's peer, never a
    # client-supplied X-Forwarded-For.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", proxy_headers=False)


if __name__ == "__main__":
    main()
