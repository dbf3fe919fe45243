"""The inference endpoint Atropos environments call, backed by verl's rollout replicas.

It speaks the contract of atroposlib's ``vllm`` server type (``--openai.server_type vllm --openai.base_url
http://HOST:PORT/v1``):

- ``POST /generate`` with ``{"prompt": {"prompt_token_ids": [...]}, "n", "max_tokens", "temperature", "top_p",
  "top_k", "logprobs"}``, answered with per-sample ``logprobs`` as ``[[{"<token id>": logprob}], ...]`` and
  ``finish_reasons`` (atroposlib's ``tokens_and_logprobs_completion`` and ``managed_server``); with
  ``"prompt_logprobs": k`` also the prompt's ``prompt_logprobs`` as vLLM gives them (``[null, {"<id>": logprob, ...},
  ...]``: at each position the k most likely tokens and the prompt's own), which atroposlib's
  ``server.get_logprobs(input_ids=..., top_k=k)`` reads: an endpoint serving a frozen model is a distillation teacher;
- ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models``, OpenAI's API as vLLM serves it
  (``chat_completion`` / ``completion`` of stock environments): :mod:`recipe.atropos.endpoint.openai_routes`;
- ``GET /health``: the policy version served, ``paused`` while a weight update holds requests back, ``final`` once
  training is over and the final policy is served for evaluations, ``stats``: requests and completions served so
  far, with per-route and per-env counters (:mod:`recipe.atropos.endpoint.traffic`).

Every route also answers under ``/env/<env name>/`` (the launcher gives each env ``{endpoint}/env/<name>/v1``): the
prefix is stripped and the request counted for that env. The three generating routes share one path (the policy
gate, ``n`` samples, the ledger, the counters): :meth:`InferenceEndpoint._generate`.

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recipe.atropos.access import API_KEY_ENV, BearerTokenMiddleware, Refusals, check_exposure, count_into
from recipe.atropos.endpoint.backends import Completion, GenerationBackend, SamplingParams
from recipe.atropos.endpoint.ledger import CompletionLedger
from recipe.atropos.endpoint.openai_routes import Job, OpenAIRoutes, RouteError, error_body
from recipe.atropos.endpoint.policy_gate import PolicyGate
from recipe.atropos.endpoint.traffic import ENV_SCOPE_KEY, EnvRouteMiddleware, Traffic
from recipe.atropos.polling import poll_until

logger = logging.getLogger(__name__)


MAX_PROMPT_LOGPROBS = 1024  # a teacher's top-k per position (vLLM's own cap is its max_logprobs, 20 by default)


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
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_PROMPT_LOGPROBS)


class PhaseLaps:
    """Per-request phase timer of the endpoint's opt-in profile (:attr:`InferenceEndpoint.phase_seconds`): counts the
    request in ``totals["requests"]``; each ``lap(phase)`` adds the seconds since the previous lap (or since creation)
    to ``totals[phase]``."""

    __slots__ = ("totals", "last")

    def __init__(self, totals: dict[str, float]) -> None:
        totals["requests"] = totals.get("requests", 0) + 1
        self.totals = totals
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.totals[phase] = self.totals.get(phase, 0.0) + now - self.last
        self.last = now


class _NoLaps:
    """The profile switched off (the default): ``lap`` does nothing."""

    __slots__ = ()

    def lap(self, phase: str) -> None:
        return None


NO_LAPS = _NoLaps()


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
        served_model_name: str = "policy",
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
        self.traffic = Traffic()  # requests by route and status, per env (GET /health: stats.routes, stats.envs)
        self.served_model_name = served_model_name  # the `model` of OpenAI requests (launcher: the model path)
        # Opt-in profile (bench/bench_endpoint.py): a dict here gets the seconds generating requests spent in each phase
        # (PhaseLaps' names), summed over requests, and "requests" their count. None (the default): nothing is timed.
        self.phase_seconds: dict[str, float] | None = None
        self._refusals_logged: set[str] = set()
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

    def env_counters(self) -> dict[str, float]:
        """Per env (its ``/env/<name>`` prefix), cumulative: ``atropos/endpoint/env/<name>/completions`` generated for
        it and ``.../failed_calls`` (answers >= 400); the launcher's closing summary reads them."""

        async def snapshot() -> dict[str, Any]:  # on the endpoint's loop, which updates the counters
            return self.traffic.snapshot()

        out: dict[str, float] = {}
        for name, env in self._call(snapshot(), 30)["envs"].items():
            by_status = [(status, n) for statuses in env["routes"].values() for status, n in statuses.items()]
            failed = sum(n for status, n in by_status if status.isdigit() and int(status) >= 400)
            out[f"atropos/endpoint/env/{name}/completions"] = float(env["completions"])
            out[f"atropos/endpoint/env/{name}/failed_calls"] = float(failed)
        return out

    def build_app(self) -> FastAPI:
        app = FastAPI(title="atropos-verl inference endpoint")
        app.add_middleware(BearerTokenMiddleware, token=self.api_key, refusals=self.refusals)
        app.add_middleware(EnvRouteMiddleware, traffic=self.traffic)  # added last: outermost, so 401s are counted
        openai = OpenAIRoutes(self.tokenizer, self.served_model_name, self._max_tokens)

        @app.get("/health")
        async def health() -> dict[str, Any]:
            paused = self._gate is not None and not self._gate.is_open
            # stats: requests/completions served so far (the launcher's waiting line reports the completions)
            state = {"status": "ok", "policy_version": self.policy_version, "paused": paused, "final": self.final}
            return {**state, "stats": {**self.stats, **self.traffic.snapshot()}}

        @app.post("/generate")
        async def generate(request: Request) -> JSONResponse:
            return await self._serve(request, self._generate_job, lambda status, msg, param: {"error": msg})

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request) -> JSONResponse:
            return await self._serve(request, openai.chat, error_body)

        @app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            return await self._serve(request, openai.completion, error_body)

        @app.get("/v1/models")
        async def models() -> dict[str, Any]:
            return openai.models()

        return app

    async def _serve(
        self, request: Request, parse: Callable[[Any], Job], error: Callable[[int, str, str | None], dict]
    ) -> JSONResponse:
        """A generating route: the body parsed into a :class:`Job` (422 when invalid), generated
        (:meth:`_generate`), answered by the job; errors answered in the route's shape by ``error``."""
        self.stats["requests"] += 1
        laps = NO_LAPS if self.phase_seconds is None else PhaseLaps(self.phase_seconds)

        def refuse(exc: RouteError) -> JSONResponse:
            return JSONResponse(error(exc.status, exc.message, exc.param), status_code=exc.status)

        try:
            body = await request.json()
            laps.lap("read body + JSON parse")
            job = parse(body)
            laps.lap("request parsing + chat template + tokenize")
        except (RouteError, ValidationError, ValueError) as exc:
            self.stats["failed_requests"] += 1
            path = request.scope["path"]
            refused = exc if isinstance(exc, RouteError) else RouteError(422, f"invalid {path} request: {exc}")
            self._log_refusal(path, refused)
            return refuse(refused)
        try:
            outs, versions = await self._generate(request, job, laps)
        except RouteError as exc:
            return refuse(exc)
        answer = job.respond(outs, versions)
        laps.lap("response building (decode, logprobs)")
        response = JSONResponse(answer)
        laps.lap("JSON encode")
        return response

    def _log_refusal(self, path: str, refused: RouteError) -> None:
        """Each distinct reason a request was refused, logged once (the console's 422 hint points here)."""
        reason = refused.message if refused.message.startswith(f"invalid {path}") else f"{path}: {refused.message}"
        if reason not in self._refusals_logged and len(self._refusals_logged) < 100:
            self._refusals_logged.add(reason)
            logger.warning("inference endpoint refused a request (%d) %s (logged once)", refused.status, reason)

    async def _generate(
        self, request: Request, job: Job, laps: PhaseLaps | _NoLaps = NO_LAPS
    ) -> tuple[list[Completion], list[int]]:
        """Enter the policy gate, generate ``job.n`` samples, record each in the ledger, leave the gate: the one path
        of every generating route. Returns the completions (after ``job.finish``) and the policy version of each;
        :class:`RouteError` 499 when the client left while the gate held it, 500 when generation failed."""
        version = await self._gate.enter()
        if await request.is_disconnected():  # the env gave up while a weight update held it (cancelled worker)
            self._gate.exit()
            self.stats["abandoned_requests"] += 1
            raise RouteError(499, "client disconnected before generation")
        laps.lap("gate wait")
        try:
            if job.prepare is not None:  # under the same policy version as the samples
                await job.prepare()
            samples = [self.backend.generate(job.prompt_ids, job.sample_params(i)) for i in range(job.n)]
            generated = await asyncio.gather(*samples)
            laps.lap("backend generate")
            outs = [job.finish(out) for out in generated]
            # The version that produced each completion: the gate's (no swap happens while it is open), or with
            # swaps under running requests the rollout's tag.
            versions = [self._produced_by(out, version) for out in outs]
            for out, produced_by in zip(outs, versions, strict=True):  # recorded before the gate reopens
                self.ledger.record(job.prompt_ids, job.ledger_ids(out), produced_by)
            laps.lap("stop-string cut + ledger record")
        except Exception as exc:
            self.stats["failed_requests"] += 1
            logger.exception("generation failed for a %s request (n=%d)", request.scope["path"], job.n)
            raise RouteError(500, f"generation failed: {exc!r}") from exc
        finally:
            self._gate.exit()
        self.stats["completions"] += len(outs)
        self.traffic.completions(request.scope.get(ENV_SCOPE_KEY), len(outs))
        return outs, versions

    def _produced_by(self, out: Completion, gate_version: int) -> int:
        if not self.versions_from_rollout:
            return gate_version
        if out.policy_version is None:
            raise RuntimeError("the rollout did not tag a completion with its policy version (versions_from_rollout)")
        return int(out.policy_version)

    def _generate_job(self, body: Any) -> Job:
        req = GenerateRequest.model_validate(body)
        prompt_ids = self._prompt_ids(req)
        params = SamplingParams(
            max_tokens=self._max_tokens(req.max_tokens), temperature=req.temperature, top_p=req.top_p, top_k=req.top_k
        )
        if req.prompt_logprobs is None:
            return Job(prompt_ids, params, req.n, lambda outs, versions: self._response(prompt_ids, outs, versions))
        if not hasattr(self.backend, "prompt_logprobs"):
            raise RouteError(422, f"prompt_logprobs: this endpoint's backend ({type(self.backend).__name__}) has none")
        k, answer = req.prompt_logprobs, {}  # answer: {"prompt_logprobs": PromptLogprobs} once prepared

        async def prepare() -> None:
            answer["prompt_logprobs"] = await self.backend.prompt_logprobs(prompt_ids, k)

        def respond(outs: list[Completion], versions: list[int]) -> dict[str, Any]:
            rows = [None if e is None else {str(t): lp for t, lp in e.items()} for e in answer["prompt_logprobs"]]
            return {**self._response(prompt_ids, outs, versions), "prompt_logprobs": rows}

        return Job(prompt_ids, params, req.n, respond, prepare=prepare)

    def _prompt_ids(self, req: GenerateRequest) -> list[int]:
        if isinstance(req.prompt, PromptTokens):
            return list(req.prompt.prompt_token_ids)
        if self.tokenizer is None:
            raise ValueError("prompt: send {'prompt_token_ids': [...]} (this endpoint has no tokenizer for text)")
        return list(self.tokenizer.encode(req.prompt, add_special_tokens=False))

    def _max_tokens(self, requested: int | None) -> int:
        """``requested`` (None: the cap) capped at ``max_tokens_cap``; a capped request is counted."""
        max_tokens = requested or self.max_tokens_cap
        if max_tokens > self.max_tokens_cap:
            # The trainer cannot hold longer responses (data.max_response_length): cap, and count it.
            self.stats["capped_max_tokens"] += 1
            max_tokens = self.max_tokens_cap
        return max_tokens

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
        def serving() -> bool:
            if not self._server.started and not self._thread.is_alive():
                raise RuntimeError(f"inference endpoint failed to start on {self.host}:{self.port} (port in use?)")
            return bool(self._server.started)

        if poll_until(serving, timeout, 0.05):
            return
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
