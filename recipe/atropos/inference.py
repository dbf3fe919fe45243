"""The inference endpoint Atropos environments call, backed by verl's rollout replicas.

It speaks the contract of atroposlib's ``vllm`` server type (``--openai.server_type vllm --openai.base_url
http://HOST:PORT/v1``): ``GET /health`` (answering the policy version served, ``paused`` while a weight update holds
requests back, ``final`` once training is over and the final policy is served for evaluations) and ``POST /generate``
with ``{"prompt": {"prompt_token_ids": [...]}, "n", "max_tokens", "temperature", "top_p", "top_k", "logprobs"}``,
answered with per-sample ``logprobs`` as ``[[{"<token id>": logprob}], ...]`` and ``finish_reasons``.

Two backends:
- :class:`RayReplicaBackend` calls verl's replicas through ``replica.server_handle.generate`` (token in, token out) —
  the interface of verl's vLLM/SGLang servers and of our CPU backend alike.
- :class:`VLLMCompletionsBackend` forwards to the replicas' vLLM HTTP servers (``/v1/completions`` with prompt token
  ids, ``logprobs`` and ``return_tokens_as_token_ids``).

Weight updates: the trainer calls :meth:`InferenceEndpoint.pause` (new requests wait, in-flight ones finish),
updates the weights, then :meth:`InferenceEndpoint.resume` with the new policy version, so no completion mixes two
policies. Each completion's policy version is kept in a :class:`CompletionLedger` the trainer reads to measure the
policy lag of every batch.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

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


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1


@dataclass(frozen=True)
class Completion:
    """One sampled continuation: ``token_ids`` [L], ``log_probs`` [L] (sampled tokens), why it stopped."""

    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str


class GenerationBackend(Protocol):
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion: ...


def finish_reason(token_ids: Sequence[int], max_tokens: int, eos_token_ids: Sequence[int]) -> str:
    """``"stop"`` when the completion ended on EOS or before its budget, else ``"length"`` (vLLM's convention)."""
    if token_ids and token_ids[-1] in eos_token_ids:
        return "stop"
    return "length" if len(token_ids) >= max_tokens else "stop"


class RayReplicaBackend:
    """Round-robin over verl rollout servers' Ray handles (``generate(prompt_ids, sampling_params, request_id)``)."""

    def __init__(self, server_handles: Sequence[Any], eos_token_ids: Sequence[int]) -> None:
        if not server_handles:
            raise ValueError("RayReplicaBackend needs at least one rollout server handle (none were created)")
        self._handles = itertools.cycle(list(server_handles))
        self._eos = list(eos_token_ids)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        sampling = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "max_tokens": params.max_tokens,
            "logprobs": True,
        }
        out = await next(self._handles).generate.remote(
            prompt_ids=prompt_ids, sampling_params=sampling, request_id=uuid.uuid4().hex
        )
        if out.log_probs is None or len(out.log_probs) != len(out.token_ids):
            raise RuntimeError(
                f"rollout server returned {len(out.token_ids)} tokens but "
                f"{None if out.log_probs is None else len(out.log_probs)} log-probs; "
                "set actor_rollout_ref.rollout.calculate_log_probs=true"
            )
        return Completion(
            list(out.token_ids), list(out.log_probs), finish_reason(out.token_ids, params.max_tokens, self._eos)
        )


class VLLMCompletionsBackend:
    """Forwards to vLLM OpenAI-compatible servers: ``POST {address}/v1/completions`` with token-id prompts.

    ``model_name=None`` (the default) asks each server for the name it serves (``GET /v1/models``) on first use:
    verl starts vLLM with ``model_config.local_path`` (which differs from ``model.path`` with ``use_shm``, a hub name
    or Prometheus' ``served_model_name``), and a wrong name gets 404.
    """

    def __init__(self, addresses: Sequence[str], model_name: str | None = None, timeout_s: float = 600.0) -> None:
        if not addresses:
            raise ValueError("VLLMCompletionsBackend needs at least one vLLM server address")
        self._urls = itertools.cycle([a if a.startswith("http") else f"http://{a}" for a in addresses])
        self._model = model_name
        self._served: dict[str, str] = {}  # server URL -> the model name it serves
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def served_model(self, session: aiohttp.ClientSession, url: str) -> str:
        """The configured name, else the first model id the server lists at ``/v1/models`` (cached per server)."""
        if self._model:
            return self._model
        if url not in self._served:
            async with session.get(f"{url}/v1/models") as r:
                body = await r.json(content_type=None)
                if r.status >= 400 or not body.get("data"):
                    raise RuntimeError(f"vLLM {url}/v1/models answered {r.status}: {body}")
                self._served[url] = str(body["data"][0]["id"])
        return self._served[url]

    def request_body(self, prompt_ids: list[int], params: SamplingParams, model: str | None = None) -> dict[str, Any]:
        return {
            "model": model or self._model,
            "prompt": prompt_ids,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "n": 1,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        }

    @staticmethod
    def parse_choice(choice: dict[str, Any]) -> Completion:
        """One ``choices[i]`` of a vLLM completions response (tokens spelled ``"token_id:<id>"``)."""
        lp = choice.get("logprobs") or {}
        tokens, token_logprobs = lp.get("tokens"), lp.get("token_logprobs")
        if tokens is None or token_logprobs is None:
            raise RuntimeError("vLLM response has no logprobs.tokens/token_logprobs: was logprobs requested?")
        ids = [int(t.split(":", 1)[1]) for t in tokens]
        return Completion(ids, [float(x) for x in token_logprobs], str(choice.get("finish_reason") or "stop"))

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        url = next(self._urls)
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            model = await self.served_model(session, url)
            async with session.post(f"{url}/v1/completions", json=self.request_body(prompt_ids, params, model)) as r:
                body = await r.json(content_type=None)
                if r.status >= 400:
                    raise RuntimeError(f"vLLM /v1/completions answered {r.status}: {body}")
        return self.parse_choice(body["choices"][0])


def _sequence_key(token_ids: Sequence[int]) -> bytes:
    return hashlib.blake2b(json.dumps(list(token_ids)).encode(), digest_size=16).digest()


class CompletionLedger:
    """Which policy version produced each full sequence (prompt + completion), bounded, thread-safe."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self._versions: OrderedDict[bytes, int] = OrderedDict()
        self._max = max_entries
        self._lock = threading.Lock()

    def record(self, prompt_ids: Sequence[int], completion_ids: Sequence[int], version: int) -> None:
        key = _sequence_key([*prompt_ids, *completion_ids])
        with self._lock:
            self._versions[key] = version
            self._versions.move_to_end(key)
            while len(self._versions) > self._max:
                self._versions.popitem(last=False)

    def version_of(self, token_ids: Sequence[int]) -> int | None:
        """The policy version that generated ``token_ids`` (a trajectory's tokens), or None if unknown."""
        with self._lock:
            return self._versions.get(_sequence_key(token_ids))

    def __len__(self) -> int:
        with self._lock:
            return len(self._versions)


class PolicyGate:
    """Lets requests through while open; ``close`` waits for in-flight ones. Lives on the endpoint's event loop."""

    def __init__(self, version: int = 0) -> None:
        self.version = version
        self._open = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._inflight = 0
        self._open.set()

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
        self._open.clear()
        await self._idle.wait()

    async def open(self, version: int) -> None:
        self.version = version
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
    ) -> None:
        self.backend = backend
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
        }
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

    def build_app(self) -> FastAPI:
        app = FastAPI(title="atropos-verl inference endpoint")

        @app.get("/health")
        async def health() -> dict[str, Any]:
            paused = self._gate is not None and not self._gate.is_open
            return {"status": "ok", "policy_version": self.policy_version, "paused": paused, "final": self.final}

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
                for out in outs:  # recorded before the gate lets a weight update start
                    self.ledger.record(prompt_ids, out.token_ids, version)
            except Exception as exc:
                self.stats["failed_requests"] += 1
                logger.exception("generation failed for a /generate request (n=%d)", req.n)
                return JSONResponse({"error": f"generation failed: {exc!r}"}, status_code=500)
            finally:
                self._gate.exit()
            self.stats["completions"] += len(outs)
            return JSONResponse(self._response(prompt_ids, outs, version))

        return app

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

    def _response(self, prompt_ids: list[int], outs: Sequence[Completion], version: int) -> dict[str, Any]:
        decode = self.tokenizer.decode if self.tokenizer is not None else (lambda ids, **_: "")
        return {
            "text": [decode(o.token_ids, skip_special_tokens=True) for o in outs],
            "prompt": decode(prompt_ids),
            "prompt_token_ids": prompt_ids,
            "token_ids": [o.token_ids for o in outs],
            "logprobs": [[[{str(t): lp}] for t, lp in zip(o.token_ids, o.log_probs, strict=True)] for o in outs],
            "finish_reasons": [o.finish_reason for o in outs],
            "policy_version": version,
        }

    # ---- lifecycle (called from the trainer's thread) ----
    def start(self, timeout: float = 60.0) -> InferenceEndpoint:
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
