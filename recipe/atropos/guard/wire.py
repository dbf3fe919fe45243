"""The guarded API's wire: how a request body is read (gunzipped, JSON parsed once by pydantic-core) and how one posted
group is checked (our schema's invariants, then atroposlib's own ``ScoredData`` model).

Every route of the guard uses :class:`GuardRoute`, FastAPI's documented way to change how a route reads its request
(a custom ``APIRoute`` with its own ``Request`` class): the body is gunzipped when ``Content-Encoding: gzip``
(atroposlib's ``BaseEnv`` compresses bodies over 1 KB) and parsed by pydantic-core's Rust JSON parser, about five times
faster than ``json.loads`` on a group of token ids and log-probs. NaN and Infinity literals parse (Python envs send
them), so a non-finite score is refused naming ``scores``, not as an unreadable body.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Coroutine
from typing import Any

import pydantic_core
from atroposlib.api.server import ScoredData
from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.background import BackgroundTask

from recipe.atropos.schema import GroupValidationError, validate_group

BAD_GZIP = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError; a cut body raises EOFError


class GuardRequest(Request):
    """A request whose ``body()`` is gunzipped and whose ``json()`` is parsed by pydantic-core (NaN allowed); a bad
    gzip body raises one of :data:`BAD_GZIP`, bad JSON ``json.JSONDecodeError`` (FastAPI answers that with 422)."""

    raw_body = b""  # as received (gzip or not), once read

    async def body(self) -> bytes:
        if not hasattr(self, "_plain_body"):
            self.raw_body = body = await super().body()
            if "gzip" in self.headers.get("content-encoding", "").lower():
                body = gzip.decompress(body)
            self._plain_body = body
        return self._plain_body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = pydantic_core.from_json(body, allow_inf_nan=True)
            except ValueError as exc:
                raise json.JSONDecodeError(str(exc), body.decode(errors="replace"), 0) from None
        return self._json


class GuardRoute(APIRoute):
    """An ``APIRoute`` whose endpoint and typed bodies see a :class:`GuardRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def guarded(request: Request) -> Response:
            return await handler(GuardRequest(request.scope, request.receive))

        return guarded


def json_response(payload: Any, status_code: int = 200, background: BackgroundTask | None = None) -> Response:
    """``payload`` serialised by pydantic-core (FastAPI's ``jsonable_encoder`` walks every token of a batch)."""
    body = pydantic_core.to_json(payload, fallback=str)  # as json.dumps(default=str) did
    return Response(body, status_code=status_code, media_type="application/json", background=background)


def check_group(raw: Any, *, vocab_size: int | None, batch_size: int | None) -> ScoredData:
    """``raw`` (one posted group, parsed from JSON) as atroposlib's ``ScoredData``, or :class:`GroupValidationError`
    naming the field: our invariants first (:func:`recipe.atropos.schema.validate_group`), then atroposlib's model,
    which must take it too (a journaled group must always enter its queue)."""
    validate_group(raw, vocab_size=vocab_size, batch_size=batch_size)
    try:
        return ScoredData.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise GroupValidationError(str(err["loc"][0]) if err.get("loc") else "group", err["msg"]) from None
