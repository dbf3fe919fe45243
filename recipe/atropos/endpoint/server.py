"""The inference endpoint Atropos environments call, backed by verl's rollout replicas.

It speaks the contract of atroposlib's ``vllm`` server type (``--openai.server_type vllm --openai.base_url
http://HOST:PORT/v1``): ``GET /health`` (answering the policy version served, ``paused`` while a weight update holds
requests back, ``final`` once training is over and the final policy is served for evaluations, ``stats``: requests and
completions served so far) and ``POST /generate``
with ``{"prompt": {"prompt_token_ids": [...]}, "n", "max_tokens", "temperature", "top_p", "top_k", "logprobs"}``,
answered with per-sample ``logprobs`` as ``[[{"<token id>": logprob}], ...]`` and ``finish_reasons``.

Generation goes to a backend (:mod:`recipe.atropos.endpoint.backends`).

Weight updates: the trainer calls :meth:`InferenceEndpoint.pause` (new requests wait, in-flight ones finish),
updates the weights, then :meth:`InferenceEndpoint.resume` with the new policy version, so no completion mixes two
policies. Each completion's policy version is kept in a :class:`CompletionLedger` the trainer reads to measure the
policy lag of every batch.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recipe.atropos.access import API_KEY_ENV, BearerTokenMiddleware, Refusals, check_exposure, count_into
from recipe.atropos.endpoint.backends import Completion, GenerationBackend, SamplingParams
from recipe.atropos.endpoint.ledger import CompletionLedger

logger = logging.getLogger(__name__)


class PromptTokens(BaseModel):
    prompt_token_ids: list[int] = Field(min_length=1)


class GenerateRequest(BaseModel):
    """Body of ``POST /generate`` as atroposlib's ``VLLMServer`` sends it (unknown sampling keys are ignored)."""

    model_config = ConfigDict(extra="allow")

    prompt: PromptTokens | str
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1
    logprobs: int | None = None


class PolicyGate:
    """Lets requests through while open; ``close`` waits for in-flight ones. Lives on the endpoint's event loop.
    ``closed_s``: seconds it has held new requests back, summed over closures (the current one included)."""

    def __init__(self, version: int = 0) -> None:
        self.version = version
        self._open = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = 0
        self._open.set()
        self._closed_total = 0.0
        self._closed_at: float | None = None

    @property
    def closed_s(self) -> float:
        current = time.monotonic() - self._closed_at if self._closed_at is not None else 0.0
        return self._closed_total + current

    async def enter(self) -> int:
        await self._open.wait()
        self._inflight += 1
        self._idle.clear()
        return self.version

    def exit(self) -> None:
        self._inflight -= 1
        if self._inflight == 0:
            self._idle.set()

    async def close(self) -> None:
        if self._closed_at is None:
            self._closed_at = time.monotonic()
        self._open.clear()
        await self._idle.wait()

    async def open(self, version: int) -> None:
        self.version = version
        if self._closed_at is not None:
            self._closed_total += time.monotonic() - self._closed_at
            self._closed_at = None
        self._open.set()

    @property
    def is_open(self) -> bool:
        """False while a weight update holds new requests back."""
        return self._open.is_set()


class InferenceEndpoint:
    """A FastAPI app on its own thread and event loop; the trainer drives it with thread-safe calls."""

    def __init__(
        self,
        backend: GenerationBackend,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        max_tokens_cap: int,
        eos_token_ids: Sequence[int] = (),
        tokenizer: Any = None,
        policy_version: int = 0,
        ledger: CompletionLedger | None = None,
        ready_file: str | None = None,
        versions_from_rollout: bool = False,
        api_key: str | None = None,
    ) -> None:
        self.backend = backend
        # True when weights are swapped under running requests (split placement, a rollout that tags completions):
        # each completion is then attributed to the version the rollout says produced it, not the gate's.
        self.versions_from_rollout = versions_from_rollout
        self.host = host
        self.port = port
        self.max_tokens_cap = max_tokens_cap
        self.eos_token_ids = list(eos_token_ids)
        self.tokenizer = tokenizer
        self.ledger = ledger if ledger is not None else CompletionLedger()  # an empty ledger is falsy
        self.ready_file = ready_file
        self.stats = {
            "requests": 0,
            "completions": 0,
            "failed_requests": 0,
            "capped_max_tokens": 0,
            "abandoned_requests": 0,  # their client disconnected while waiting: nothing generated for them
            "unauthorized_requests": 0,  # 401: no or a wrong bearer token (recipe.atropos.access)
        }
        self.api_key = api_key  # None: no token asked (loopback only)
        hint = f"environments send it with --openai.api_key; set atropos.inference.api_key or ${API_KEY_ENV}"
        self.refusals = Refusals("inference endpoint", hint, count_into(self.stats, "unauthorized_requests"))
        # True once training is over and the final policy is served only for evaluations (``/health`` says so).
        self.final = False
        self._initial_version = policy_version
        self._gate: PolicyGate | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def policy_version(self) -> int:
        return self._gate.version if self._gate else self._initial_version

    def counters(self) -> dict[str, float]:
        """:attr:`stats` and ``paused_s`` (seconds the gate held requests, cumulative): per-step metrics."""
        return {**self.stats, "paused_s": self._gate.closed_s if self._gate else 0.0}

    def build_app(self) -> FastAPI:
        app = FastAPI(title="atropos-verl inference endpoint")
        app.add_middleware(BearerTokenMiddleware, token=self.api_key, refusals=self.refusals)

        @app.get("/health")
        async def health() -> dict[str, Any]:
            paused = self._gate is not None and not self._gate.is_open
            # stats: requests/completions served so far (the launcher's waiting line reports the completions)
            state = {"status": "ok", "policy_version": self.policy_version, "paused": paused, "final": self.final}
            return {**state, "stats": dict(self.stats)}

        @app.post("/generate")
        async def generate(request: Request) -> JSONResponse:
            self.stats["requests"] += 1
            try:
                req = GenerateRequest.model_validate(await request.json())
                prompt_ids = self._prompt_ids(req)
            except (ValidationError, ValueError) as exc:
                self.stats["failed_requests"] += 1
                return JSONResponse({"error": f"invalid /generate request: {exc}"}, status_code=422)
            params = self._sampling(req)
            version = await self._gate.enter()
            if await request.is_disconnected():  # the env gave up while a weight update held it (cancelled worker)
                self._gate.exit()
                self.stats["abandoned_requests"] += 1
                return JSONResponse({"error": "client disconnected before generation"}, status_code=499)
            try:
                outs = await asyncio.gather(*[self.backend.generate(prompt_ids, params) for _ in range(req.n)])
                # The version that produced each completion: the gate's (no swap happens while it is open), or with
                # swaps under running requests the rollout's tag.
                versions = [self._produced_by(out, version) for out in outs]
                for out, produced_by in zip(outs, versions, strict=True):  # recorded before the gate reopens
                    self.ledger.record(prompt_ids, out.token_ids, produced_by)
            except Exception as exc:
                self.stats["failed_requests"] += 1
                logger.exception("generation failed for a /generate request (n=%d)", req.n)
                return JSONResponse({"error": f"generation failed: {exc!r}"}, status_code=500)
            finally:
                self._gate.exit()
            self.stats["completions"] += len(outs)
            return JSONResponse(self._response(prompt_ids, outs, versions))

        return app

    def _produced_by(self, out: Completion, gate_version: int) -> int:
        if not self.versions_from_rollout:
            return gate_version
        if out.policy_version is None:
            raise RuntimeError("the rollout did not tag a completion with its policy version (versions_from_rollout)")
        return int(out.policy_version)

    def _prompt_ids(self, req: GenerateRequest) -> list[int]:
        if isinstance(req.prompt, PromptTokens):
            return list(req.prompt.prompt_token_ids)
        if self.tokenizer is None:
            raise ValueError("prompt: send {'prompt_token_ids': [...]} (this endpoint has no tokenizer for text)")
        return list(self.tokenizer.encode(req.prompt, add_special_tokens=False))

    def _sampling(self, req: GenerateRequest) -> SamplingParams:
        max_tokens = req.max_tokens or self.max_tokens_cap
        if max_tokens > self.max_tokens_cap:
            # The trainer cannot hold longer responses (data.max_response_length): cap, and count it.
            self.stats["capped_max_tokens"] += 1
            max_tokens = self.max_tokens_cap
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k)

    def _response(self, prompt_ids: list[int], outs: Sequence[Completion], versions: list[int]) -> dict[str, Any]:
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda ids, **_: "")
        return {
            "text": [decode(o.token_ids, skip_special_tokens=True) for o in outs],
            "prompt": decode(prompt_ids),
            "prompt_token_ids": prompt_ids,
            "token_ids": [o.token_ids for o in outs],
            "logprobs": [[[{str(t): lp}] for t, lp in zip(o.token_ids, o.log_probs, strict=True)] for o in outs],
            "finish_reasons": [o.finish_reason for o in outs],
            "policy_version": min(versions),  # the oldest policy in this answer
            "policy_versions": versions,
        }

    # ---- lifecycle (called from the trainer's thread) ----
    def start(self, timeout: float = 60.0) -> InferenceEndpoint:
        key = f"atropos.inference.api_key (or ${API_KEY_ENV})"
        check_exposure(self.host, guarded=bool(self.api_key), what="the inference endpoint", key=key)
        config = uvicorn.Config(self.build_app(), host=self.host, port=self.port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        started = threading.Event()

        def serve() -> None:
            self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(self._loop)
            self._gate = PolicyGate(self._initial_version)
            started.set()
            self._loop.run_until_complete(self._server.serve())

        self._thread = threading.Thread(target=serve, name="atropos-inference-endpoint", daemon=True)
        self._thread.start()
        started.wait(timeout)
        self._wait_started(timeout)
        if self.port == 0:
            self.port = self._server.servers[0].sockets[0].getsockname()[1]
        if self.ready_file:
            Path(self.ready_file).write_text(json.dumps({"url": self.url, "policy_version": self.policy_version}))
        logger.info("inference endpoint serving at %s (policy version %d)", self.url, self.policy_version)
        return self

    def _wait_started(self, timeout: float) -> None:
        deadline = threading.Event()
        for _ in range(int(timeout / 0.05)):
            if self._server.started:
                return
            if not self._thread.is_alive():
                raise RuntimeError(f"inference endpoint failed to start on {self.host}:{self.port} (port in use?)")
            deadline.wait(0.05)
        raise TimeoutError(f"inference endpoint did not start within {timeout} s on {self.host}:{self.port}")

    def _call(self, coro: Any, timeout: float | None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def pause(self, timeout: float = 600.0) -> None:
        """Hold new requests and wait until in-flight ones finish (before a weight update)."""
        self._call(self._gate.close(), timeout)

    def resume(self, policy_version: int) -> None:
        """Serve again, now on policy ``policy_version``."""
        self._call(self._gate.open(policy_version), 30)

    def stop(self) -> None:
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=10)
