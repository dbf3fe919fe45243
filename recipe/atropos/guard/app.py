"""The Atropos trajectory API behind validation: atroposlib's own ``run-api`` app, imported unchanged.

    python -m recipe.atropos.guard.app --host 127.0.0.1 --port 8000 --vocab-size 49152 --batch-size 64 \
        --rejected-file RUN/rejected_groups.jsonl --stats-file RUN/api_guard_stats.json

atroposlib's API queues any ScoredData whose types parse: a NaN score makes ``GET /batch`` answer 500 after popping
the batch, a token id past the vocabulary crashes the trainer's embedding, a group whose size does not divide the
batch size stalls batch formation forever, an empty group sits in the queue. This ASGI wrapper checks every
``POST /scored_data`` and ``/scored_data_list`` before atroposlib sees it (:func:`recipe.atropos.schema.validate_group`
with the vocabulary size and the batch size); a bad group gets **422** with the field and the reason, is counted, is
appended to the rejected-groups file, and never enters the queue. Valid groups of a list are still queued.

Delivery (``--journal-dir``, :mod:`recipe.atropos.guard.journal`): every valid group is appended to the journal and
fsynced before the API answers 200, with an id carried in its ``group_overrides``
(:data:`recipe.atropos.schema.GROUP_ID_KEY`). It leaves the journal only when the trainer acknowledges it
(``POST /ack {"ids": [...]}`` → ``{"acked", "unknown"}``) after writing it to its own spool. A restarted API (after a
SIGKILL too) serves every unacknowledged group again; groups answered in a ``GET /batch`` and never acknowledged go
back to the queue when a trainer registers. So a group is delivered at least once; the trainer de-duplicates by id.

Bounded memory (``--max-queued-sequences``): atroposlib's in-memory queue holds at most that many sequences; further
groups stay on disk (the journal's backlog) and move into the queue as ``GET /batch`` drains it. A valid group is never
refused for capacity: ``GET /status-env`` reports the backlog in ``queue_size`` / ``self_queue_size`` too, so the
environments' own throttle (``max_batches_offpolicy``) holds them back.

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
from recipe.atropos.guard.asgi import read_body, replay, send_json, send_raw
from recipe.atropos.guard.state import GuardState, api_state, check_atroposlib_fields, current_batch_size, queue_report
from recipe.atropos.schema import GroupValidationError, group_id, validate_group

logger = logging.getLogger("atropos_api_guard")

GUARDED_PATHS = ("/scored_data", "/scored_data_list")


class ApiGuard:
    """ASGI app: validates scored data, then hands every request to atroposlib's app (``inner``)."""

    def __init__(self, inner: Any, state: GuardState) -> None:
        self.inner = inner
        self.state = state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        method, path = scope["method"], scope["path"].rstrip("/") or "/"
        if method == "GET" and path == "/guard/stats":
            report = {**self.state.counters(), **queue_report(current_batch_size(self.state))}
            await send_json(send, 200, report)
        elif method == "POST" and path in GUARDED_PATHS:
            await self._scored(scope, receive, send, as_list=path == "/scored_data_list")
        elif method == "POST" and path == "/ack":
            await self._ack(receive, send)
        elif method == "POST" and path == "/register":
            await self.inner(scope, receive, send)
            self.state.requeue_out()
            await self._admit(scope)
        elif method == "GET" and path == "/batch":
            await self._batch(scope, send)
        elif method == "GET" and path == "/status-env":
            await self._status_env(scope, receive, send)
        elif method == "POST" and path == "/register-env":
            body = await read_body(receive)
            self._check_env_group_size(body)
            await self.inner(scope, replay(body), send)
        else:
            await self.inner(scope, receive, send)

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
        body = await read_body(receive)
        headers = dict(scope.get("headers") or [])
        try:
            text = gzip.decompress(body) if b"gzip" in headers.get(b"content-encoding", b"").lower() else body
            payload = json.loads(text)  # accepts NaN/Infinity literals, which the checks below then reject
        except (OSError, ValueError) as exc:
            error = GroupValidationError("body", f"not a JSON document ({exc})")
            self.state.reject(body[:2000].decode(errors="replace"), error)
            await send_json(send, 422, {"status": "rejected", "field": "body", "reason": str(error)})
            return
        if as_list and not isinstance(payload, list):
            error = GroupValidationError("body", f"/scored_data_list expects a JSON list, got {type(payload).__name__}")
            self.state.reject(payload, error)
            await send_json(send, 422, {"status": "rejected", "field": "body", "reason": str(error)})
            return
        raws = payload if as_list else [payload]
        batch_size = current_batch_size(self.state)
        good, rejected = [], []
        for index, raw in enumerate(raws):
            try:
                validate_group(raw, vocab_size=self.state.vocab_size, batch_size=batch_size)
                check_atroposlib_fields(raw)
            except GroupValidationError as error:
                self.state.reject(raw, error)
                rejected.append({"index": index, "field": error.field, "reason": str(error)})
                continue
            good.append(raw)
        ids = self.state.accept(good) if good else []  # on disk (fsynced) before any answer
        await self._admit(scope)
        if not rejected:
            answer = {"status": "received", "groups_processed": len(ids), "ids": ids}
            await send_json(send, 200, answer if as_list else {"status": "received", "id": ids[0]})
            return
        first = rejected[0]
        await send_json(
            send,
            422,
            {
                "status": "rejected",
                "field": first["field"],
                "reason": first["reason"],
                "accepted": len(good),
                "ids": ids,
                "rejected": rejected,
            },
        )

    async def _call_inner(self, scope: dict[str, Any], body: bytes, **changes: Any) -> tuple[int, dict, bytes]:
        """Call atroposlib's app in-process; (status, response headers, plain body)."""
        captured: list[dict[str, Any]] = []

        async def capture(message: dict[str, Any]) -> None:
            captured.append(message)

        await self.inner({**scope, **changes}, replay(body), capture)
        start = next((m for m in captured if m["type"] == "http.response.start"), {"status": 500, "headers": []})
        headers = {k.lower(): v for k, v in start.get("headers", [])}
        payload = b"".join(m.get("body", b"") for m in captured if m["type"] == "http.response.body")
        if b"gzip" in headers.get(b"content-encoding", b""):
            payload = gzip.decompress(payload)
        return int(start["status"]), headers, payload

    async def _admit(self, scope: dict[str, Any]) -> None:
        """Move groups from the journal's backlog into atroposlib's queue, up to the memory bound (only once the
        trainer registered: atroposlib's queue does not exist before). Past the bound only while no batch can form
        from what memory holds (group sizes that do not pack, e.g. 4 + 2 of 8): the bound never stalls a run."""
        if not hasattr(api_state(), "started"):
            return
        journal = self.state.journal
        batch_size = current_batch_size(self.state)
        bound = self.state.bound(batch_size)
        if bound is None:
            return
        groups = journal.take(bound - journal.memory_sequences, at_least_one=journal.memory_sequences == 0)
        await self._enqueue(scope, groups)
        while journal.backlog and not api_state().curr_batch and not queue_report(batch_size)["can_form_batch"]:
            await self._enqueue(scope, journal.take(0, at_least_one=True))

    async def _enqueue(self, scope: dict[str, Any], groups: list[dict[str, Any]]) -> None:
        """Hand ``groups`` to atroposlib's ``POST /scored_data_list`` in-process (its queueing and buffering rules)."""
        if not groups:
            return
        body = json.dumps(groups).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        status, _, answer = await self._call_inner(
            scope,
            body,
            method="POST",
            path="/scored_data_list",
            raw_path=b"/scored_data_list",
            query_string=b"",
            headers=headers,
        )
        if status >= 400:  # cannot happen for groups that passed atroposlib's own model above; say so loudly
            logger.error(
                "atroposlib refused %d journaled groups (%d): %s; they are served again after an API restart",
                len(groups),
                status,
                answer[:300],
            )

    async def _batch(self, scope: dict[str, Any], send: Any) -> None:
        """atroposlib's ``GET /batch`` route, called directly and answered with ``json.dumps``, uncompressed (through
        FastAPI, ``jsonable_encoder`` walks every token and the GZip middleware compresses at level 9: one batch cost
        the API process more CPU than posting its groups, ``make bench-guard``). Its groups are now out, awaiting the
        trainer's ack; the queue is refilled from the backlog."""
        from atroposlib.api.server import get_batch

        answer = await get_batch()
        batch = answer.get("batch") if isinstance(answer, dict) else None
        if isinstance(batch, list):
            self.state.journal.handed_out(gid for g in batch if isinstance(g, dict) and (gid := group_id(g)))
        await send_json(send, 200, answer)
        await self._admit(scope)

    async def _status_env(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """atroposlib's ``GET /status-env`` with the groups waiting on disk counted in the queue sizes."""
        request = await read_body(receive)
        status, headers, body = await self._call_inner(scope, request)
        try:
            answer, env_id = json.loads(body), int(json.loads(request)["env_id"])
            group_size = max(1, int(api_state().envs[env_id]["group_size"]))
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            await send_raw(send, status, headers, body)
            return
        by_env = self.state.journal.depth()["backlog_sequences_by_env"]
        if status < 400 and isinstance(answer, dict) and "queue_size" in answer:
            answer["queue_size"] += sum(by_env.values()) // group_size
            answer["self_queue_size"] = answer.get("self_queue_size", 0) + by_env.get(env_id, 0) // group_size
        await send_json(send, status, answer)

    async def _ack(self, receive: Any, send: Any) -> None:
        try:
            ids = json.loads(await read_body(receive))["ids"]
            if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            reason = 'ids: POST /ack expects {"ids": ["<group id>", ...]} (the ids of the groups the trainer spooled)'
            await send_json(send, 422, {"status": "rejected", "field": "ids", "reason": reason})
            return
        acked, unknown = self.state.ack(ids)
        await send_json(send, 200, {"status": "ok", "acked": acked, "unknown": unknown})


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
    journal_dir: Path | None = None,
    max_queued_sequences: int | None = None,
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
    if journal_dir:
        argv += ["--journal-dir", str(journal_dir)]
    if max_queued_sequences:
        argv += ["--max-queued-sequences", str(max_queued_sequences)]
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
    parser.add_argument("--journal-dir", default=None, help="accepted groups until acknowledged (default: a temp dir)")
    parser.add_argument(
        "--max-queued-sequences", type=int, default=None, help="most sequences in memory (default: 4 batches)"
    )
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
        journal_dir=args.journal_dir,
        max_queued_sequences=args.max_queued_sequences,
    )
    refusals = Refusals("the Atropos API", "set atropos.launcher.api_allow", state.count_refused)
    app = NetworkAllowListMiddleware(build_app(state), networks, refusals)
    # proxy_headers off: the allow-list judges the socket's peer, never a
    # client-supplied X-Forwarded-For.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", proxy_headers=False)


if __name__ == "__main__":
    main()
