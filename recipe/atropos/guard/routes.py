"""The guarded API's routes (:mod:`recipe.atropos.guard.app` serves them): a FastAPI app that answers the paths the
guard adds or changes and mounts atroposlib's own ``run-api`` app, unchanged, under them for every other path.

Each request is read once (:mod:`recipe.atropos.guard.wire`: gunzipped, JSON parsed by pydantic-core). A posted group
is then checked as a plain object (our invariants, then atroposlib's ``ScoredData`` model), journaled (fsynced), and
the ``ScoredData`` instance itself goes to atroposlib's queue through the function its ``/scored_data`` route calls:
no second parse, no re-serialising, no second pass through atroposlib's app. A group that waited on disk is parsed
from its journal line when it moves to the queue. The other bodies are FastAPI's typed bodies (atroposlib's own
``Registration``, ``RegisterEnv``, ``EnvIdentifier``, and :class:`AckRequest`).

Scored data are not a typed body on purpose: a list is accepted group by group (the valid groups of a list are
queued, each bad one is refused with its index), and every refusal, an unreadable body included, is counted and kept
in the rejected-groups file with the 422.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from atroposlib.api import server as atropos
from atroposlib.api.server import EnvIdentifier, RegisterEnv, Registration, ScoredData
from fastapi import FastAPI, Request
from fastapi.exception_handlers import request_validation_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.requests import ClientDisconnect

from recipe.atropos.access import Network, NetworkAllowListMiddleware, Refusals
from recipe.atropos.guard.state import GuardState, api_state, current_batch_size, queue_report
from recipe.atropos.guard.wire import BAD_GZIP, GuardRequest, GuardRoute, check_group, json_response
from recipe.atropos.schema import GroupValidationError, group_id

logger = logging.getLogger("atropos_api_guard")

ACK_REASON = 'ids: POST /ack expects {"ids": ["<group id>", ...]} (the ids of the groups the trainer spooled)'


class AckRequest(BaseModel):
    """``POST /ack``: the ids of the groups the trainer wrote to its spool."""

    ids: list[str]


def rejected(field: str, reason: str, **more: Any) -> Response:
    return json_response({"status": "rejected", "field": field, "reason": reason, **more}, 422)


class ApiGuard:
    """The guard's routes, in front of atroposlib's app (module docstring). Groups reach atroposlib's queue through
    its own ``/scored_data_list`` handler, called in-process with the ``ScoredData`` parsed from the post (or, for a
    group that waited on disk, from the journal)."""

    def __init__(self, state: GuardState) -> None:
        self.state = state

    def app(self, networks: Sequence[Network] | None = None, refusals: Refusals | None = None) -> FastAPI:
        """A FastAPI app serving the guard's routes, with atroposlib's app mounted under them for every other path."""
        app = FastAPI(title="Atropos API (guarded)", openapi_url=None)
        app.router.route_class = GuardRoute
        app.get("/guard/stats")(self.stats)
        app.post("/scored_data")(self.scored_data)
        app.post("/scored_data_list")(self.scored_data_list)
        app.post("/ack")(self.ack)
        app.post("/register")(self.register)
        app.post("/register-env")(self.register_env)
        app.get("/status-env")(self.status_env)
        app.get("/batch")(self.batch)
        app.exception_handler(RequestValidationError)(self._invalid_request)
        app.mount("/", atropos.app)
        if networks is not None:
            app.add_middleware(NetworkAllowListMiddleware, networks=networks, refusals=refusals)
        return app

    # ---- routes -------------------------------------------------------------------------------------------------
    async def stats(self) -> Response:
        return json_response({**self.state.counters(), **queue_report(current_batch_size(self.state))})

    async def scored_data(self, request: GuardRequest) -> Response:
        return await self._receive(request, as_list=False)

    async def scored_data_list(self, request: GuardRequest) -> Response:
        return await self._receive(request, as_list=True)

    async def ack(self, body: AckRequest) -> Response:
        acked, unknown = self.state.ack(body.ids)
        return json_response({"status": "ok", "acked": acked, "unknown": unknown})

    async def register(self, registration: Registration) -> Any:
        answer = await atropos.register(registration)
        self.state.requeue_out()
        await self._admit()
        return answer

    async def register_env(self, register_env: RegisterEnv) -> Any:
        self._check_env_group_size(register_env)
        return await atropos.register_env_url(register_env)

    async def status_env(self, env: EnvIdentifier) -> Response:
        """atroposlib's ``GET /status-env`` with the groups waiting on disk counted in the queue sizes."""
        answer = await atropos.get_status_env(env)
        group_size = max(1, int(api_state().envs[env.env_id]["group_size"]))
        by_env = self.state.journal.depth()["backlog_sequences_by_env"]
        answer["queue_size"] += sum(by_env.values()) // group_size
        answer["self_queue_size"] = answer.get("self_queue_size", 0) + by_env.get(env.env_id, 0) // group_size
        return json_response(answer)

    async def batch(self) -> Response:
        """atroposlib's ``GET /batch``, answered uncompressed by pydantic-core (through atroposlib's app,
        ``jsonable_encoder`` walks every token and its GZip middleware compresses at level 9). Its groups are now out,
        awaiting the trainer's ack; once the answer is sent, the queue is refilled from the backlog."""
        answer = await atropos.get_batch()
        groups = answer.get("batch") if isinstance(answer, dict) else None
        if isinstance(groups, list):
            self.state.journal.handed_out(gid for g in groups if isinstance(g, dict) and (gid := group_id(g)))
        return json_response(answer, background=BackgroundTask(self._admit))

    # ---- scored data --------------------------------------------------------------------------------------------
    async def _receive(self, request: GuardRequest, *, as_list: bool) -> Response:
        """Check every posted group; journal the valid ones (fsynced before the answer) and queue them; 422 naming the
        field of the first bad one, each bad one counted and kept in the rejected-groups file."""
        try:
            payload = await request.json()
        except ClientDisconnect:  # an env killed in the middle of its post: nothing received, nobody to answer
            logger.warning("a client disconnected before its %s body was whole; nothing kept", request.url.path)
            return Response(status_code=400)
        except (*BAD_GZIP, ValueError) as exc:
            error = GroupValidationError("body", f"not a JSON document ({exc})")
            self.state.reject(request.raw_body[:2000].decode(errors="replace"), error)
            return rejected("body", str(error))
        if as_list and not isinstance(payload, list):
            error = GroupValidationError("body", f"/scored_data_list expects a JSON list, got {type(payload).__name__}")
            self.state.reject(payload, error)
            return rejected("body", str(error))
        batch_size = current_batch_size(self.state)
        good, bad = [], []
        for index, raw in enumerate(payload if as_list else [payload]):
            try:
                good.append((raw, check_group(raw, vocab_size=self.state.vocab_size, batch_size=batch_size)))
            except GroupValidationError as error:
                self.state.reject(raw, error)
                bad.append({"index": index, "field": error.field, "reason": str(error)})
        posted = None if as_list else [await request.body()]  # journaled as it came: one group, one document
        ids = await self.state.accept([raw for raw, _ in good], posted) if good else []  # fsynced before any answer
        fresh: dict[str, ScoredData] = {}
        for gid, (raw, group) in zip(ids, good, strict=True):
            group.group_overrides = raw["group_overrides"]  # the journal's id, as the journaled copy carries it
            fresh[gid] = group
        await self._admit(fresh)
        if bad:
            return rejected(bad[0]["field"], bad[0]["reason"], accepted=len(good), ids=ids, rejected=bad)
        if as_list:
            return json_response({"status": "received", "groups_processed": len(ids), "ids": ids})
        return json_response({"status": "received", "id": ids[0]})

    # ---- atroposlib's memory ------------------------------------------------------------------------------------
    async def _admit(self, fresh: dict[str, ScoredData] | None = None) -> None:
        """Move groups from the journal's backlog into atroposlib's queue, up to the memory bound (only once the
        trainer registered: atroposlib's queue does not exist before). Past the bound only while no batch can form
        from what memory holds (group sizes that do not pack, e.g. 4 + 2 of 8): the bound never stalls a run.
        ``fresh``: groups just posted, by id, queued as parsed instead of read back from disk."""
        if not hasattr(api_state(), "started"):
            return
        journal = self.state.journal
        batch_size = current_batch_size(self.state)
        bound = self.state.bound(batch_size)
        if bound is None:
            return
        fresh = fresh or {}
        room = bound - journal.memory_sequences
        await self._enqueue(journal.take_seqs(room, at_least_one=journal.memory_sequences == 0), fresh)
        while journal.backlog and not api_state().curr_batch and not queue_report(batch_size)["can_form_batch"]:
            await self._enqueue(journal.take_seqs(0, at_least_one=True), fresh)

    async def _enqueue(self, seqs: list[int], fresh: dict[str, ScoredData]) -> None:
        """Hand the groups of ``seqs`` to atroposlib's ``/scored_data_list`` route function (its queueing and
        buffering rules): those in ``fresh`` as they are, the others parsed from their journal lines."""
        journal, groups = self.state.journal, []
        for seq in seqs:
            group = fresh.get(journal.group_id(seq))
            if group is None:
                try:
                    group = ScoredData.model_validate(journal.read(seq))
                except ValidationError as exc:  # cannot happen for groups that passed check_group; say so loudly
                    logger.error(
                        "atroposlib refuses journaled group %s (%s); it is served again after an API restart",
                        journal.group_id(seq),
                        exc,
                    )
                    continue
            groups.append(group)
        if groups:
            await atropos.scored_data_list(groups)

    def _check_env_group_size(self, env: RegisterEnv) -> None:
        batch_size = current_batch_size(self.state)
        if batch_size and (env.group_size < 1 or batch_size % env.group_size):
            entry = {"desired_name": env.desired_name, "group_size": env.group_size, "batch_size": batch_size}
            self.state.unpackable_envs.append(entry)
            self.state.save()
            logger.warning(
                "environment %r registers group_size=%d, which does not divide the batch size %d: its groups will be "
                "rejected. Use a group size that divides data.train_batch_size.",
                env.desired_name,
                env.group_size,
                batch_size,
            )

    async def _invalid_request(self, request: Request, exc: RequestValidationError) -> Response:
        """``POST /ack`` answers a bad body in the guard's shape; other routes as FastAPI (and atroposlib) do."""
        if request.url.path.rstrip("/") == "/ack":
            return rejected("ids", ACK_REASON)
        return await request_validation_exception_handler(request, exc)


def build_app(
    state: GuardState, networks: Sequence[Network] | None = None, refusals: Refusals | None = None
) -> FastAPI:
    """The guard's routes in front of atroposlib's API app (the module-level FastAPI app ``run-api`` serves)."""
    return ApiGuard(state).app(networks, refusals)
