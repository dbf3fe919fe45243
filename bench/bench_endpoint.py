"""Benchmark: the inference endpoint's overhead over the backend it serves, per route, in one run.

The same prompts, sampling and concurrency two ways, interleaved (A B, then B A, ...), after a warm-up of each:

- endpoint: our :class:`~recipe.atropos.endpoint.server.InferenceEndpoint` over HTTP (uvicorn, the route's parsing,
  the chat template, the policy gate, the ledger, the counters), called with atroposlib's own client
  (``VLLMServer.chat_completion`` / ``.completion`` / ``.tokens_and_logprobs_completion``, as a stock environment with
  ``--openai.server_type vllm`` calls it: the ``openai`` client for the two OpenAI routes, aiohttp for ``/generate``);
- backend: what the endpoint calls, called directly with the prompt ids the endpoint computes:
  - ``hf_cpu`` (default): the same :class:`~recipe.atropos.endpoint.backends.RayReplicaBackend` object in front of
    the same hf_cpu rollout server (a Ray actor, as in training), ``generate(prompt_ids, SamplingParams)`` for each of
    the ``n`` samples of each request, all at once, in this process;
  - ``vllm``: our endpoint on the ``vllm_http`` backend (:class:`~recipe.atropos.endpoint.backends
    .VLLMCompletionsBackend`) in front of vLLM's own OpenAI server (its CPU build, ``.venv-vllm``), against that vLLM
    server called directly by the same ``VLLMServer`` client with the same requests (``/v1/chat/completions``,
    ``/v1/completions``; vLLM's server has no ``/generate``).

Each round sends ``--prompts`` requests at once, each for ``n`` samples of ``--max-tokens`` tokens: greedy on hf_cpu
(which has no per-request seed), temperature 1 with a seed per request on vLLM (which refuses greedy with n > 1; the
endpoint gives the j-th sample seed + j, as vLLM does). Both sides generate the same tokens; the backends cannot
ignore EOS, so the tokens generated per round and whether the answers are the same are printed. Chat and completion
requests ask for log-probs (``--no-logprobs``: not), ``/generate`` always answers them. vLLM's engine runs one OpenMP
thread on CPU 0 (``--vllm-omp-bind``), so the HTTP layers on the other core do not stall it.

Per route: the median round wall time of each side (and min-max), tokens generated per round, time per generated
token, and where a request's time goes on the endpoint side, from the endpoint's opt-in phase profile
(``InferenceEndpoint.phase_seconds``: a ``time.perf_counter()`` per phase, ~1.5 us a request; off it costs ~0.3 us)
and a timer around its ASGI app: "client + socket + uvicorn's HTTP" (atroposlib's client and its ``openai``/aiohttp
stack, the loopback socket, uvicorn's parsing: the client's latency less the ASGI app's time), "ASGI: middleware +
routing" (the bearer-token and env-prefix middleware, FastAPI), reading + JSON parsing of the body, request parsing +
chat template + tokenizing, gate wait (with other requests' work on the loop), backend generate, the stop-string cut +
ledger record, response building (decode, log-probs), JSON encoding. Means per request over the measured rounds.

Ends with one line per route::

    ratio endpoint/backend /v1/chat/completions: time 1.01x | per generated token 1.01x | ratio of the median
    rounds 1.03x | from the phase profile 1.004x | hf_cpu

``time`` (and ``per generated token``): the median over the repeats of the ratio of the route's two rounds, which run
back to back (the drift of a shared machine's load cancels); ``ratio of the median rounds``: median endpoint round /
median backend round; ``from the phase profile``: (backend's median round + the endpoint's own time per request, its
request latency less backend generate) / backend's median round, the overhead as if none of it overlapped, free of
the round-to-round noise (on vLLM it counts the client's time too, which the direct side also pays: an upper bound).

    python bench/bench_endpoint.py [--backend hf_cpu|vllm|both] [--model embedded:SmolLM2-135M-Instruct|tiny|DIR]
        [--prompts 4] [--n 2] [--max-tokens 16] [--repeats 6] [--no-logprobs] [--vllm-omp-bind 0]

``--backend vllm``/``both`` from an interpreter without vLLM runs the vLLM part with ``.venv-vllm/bin/python``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipe.atropos.setup.assets import build_tiny_model, resolve_model_path  # noqa: E402

QUESTIONS = [
    "Write a long story about a dragon who learns to bake bread.",
    "Explain in detail how a steam engine works, step by step.",
    "Describe a walk through a busy market on a summer morning.",
    "List twenty animals and say one interesting thing about each.",
    "Write a letter to a friend about your trip to the mountains.",
    "Explain how to plant and care for a vegetable garden.",
    "Tell me the history of the bicycle in as much detail as you can.",
    "Describe how a city changes from night to day.",
]
SEED = 1000
CHAT, COMPLETIONS, GENERATE = "/v1/chat/completions", "/v1/completions", "/generate"
SERVER_TOTAL = "server total (ASGI app)"  # timed around the endpoint's ASGI app by TimedEndpoint
HANDLER_PHASES = [
    "read body + JSON parse",
    "request parsing + chat template + tokenize",
    "gate wait",
    "backend generate",
    "stop-string cut + ledger record",
    "response building (decode, logprobs)",
    "JSON encode",
]


@dataclass
class Side:
    """The measured rounds of one side of one route."""

    walls: list[float] = field(default_factory=list)  # seconds per round
    tokens: list[int] = field(default_factory=list)  # tokens generated per round
    latencies: list[float] = field(default_factory=list)  # seconds per request, all rounds
    batches: list[int] = field(default_factory=list)  # hf_cpu: batched generates per round
    cpu_here: list[float] = field(default_factory=list)  # CPU seconds of this process per round (endpoint, client)
    cpu_backend: list[float] = field(default_factory=list)  # CPU seconds of the backend's processes per round
    phases: dict[str, float] = field(default_factory=dict)  # endpoint: seconds per phase, summed over rounds
    texts: list[list[str]] = field(default_factory=list)  # the last round's answered texts (request order)

    def per_token(self) -> list[float]:
        return [w / max(t, 1) for w, t in zip(self.walls, self.tokens, strict=True)]


@dataclass
class Route:
    """One route: ``endpoint(i)`` sends request ``i`` through the client (-> tokens, texts), ``direct(i)`` serves it
    without the endpoint (-> tokens, texts)."""

    path: str
    endpoint: Callable[[int], Awaitable[tuple[int, list[str]]]]
    direct: Callable[[int], Awaitable[tuple[int, list[str]]]]
    sides: dict[str, Side] = field(default_factory=lambda: {"endpoint": Side(), "backend": Side()})


def timed_endpoint_class() -> type:
    """:class:`InferenceEndpoint` whose ASGI app is timed from its call to its last ``send`` of the answer, into
    ``phase_seconds[SERVER_TOTAL]`` while the profile is on (the endpoint's own code is unchanged)."""
    from recipe.atropos.endpoint.server import InferenceEndpoint

    class TimedEndpoint(InferenceEndpoint):
        def build_app(self) -> Any:
            app = super().build_app()

            async def timed(scope: dict[str, Any], receive: Any, send: Any) -> None:
                totals = self.phase_seconds
                if scope["type"] != "http" or totals is None:
                    await app(scope, receive, send)
                    return
                start = time.perf_counter()

                async def timed_send(message: dict[str, Any]) -> None:
                    if message["type"] == "http.response.body" and not message.get("more_body"):  # before the
                        # client can have it (the bench reads the totals once the answers are in)
                        totals[SERVER_TOTAL] = totals.get(SERVER_TOTAL, 0.0) + time.perf_counter() - start
                    await send(message)

                await app(scope, receive, timed_send)

            return timed

    return TimedEndpoint


def chat_messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def chat_prompt_ids(tok: Any, i: int) -> list[int]:
    """The ids the endpoint's chat route computes: the template rendered, encoded without special tokens."""
    rendered = tok.apply_chat_template(chat_messages(i), add_generation_prompt=True, tokenize=False)
    return list(tok.encode(rendered, add_special_tokens=False))


def completion_prompt(tok: Any, i: int) -> str:
    """A text prompt for /v1/completions: the rendered chat prompt, so the model answers at length."""
    return tok.apply_chat_template(chat_messages(i), add_generation_prompt=True, tokenize=False)


def atropos_client(base_url: str, model: str, tokenizer_dir: str) -> Any:
    """atroposlib's ``vllm`` server type, as the launcher configures an env for it (no health-check task)."""
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    config = APIServerConfig(
        server_type="vllm", base_url=base_url, model_name=model, tokenizer_name=tokenizer_dir, api_key="x",
        health_check=False, timeout=600,
    )  # fmt: skip
    return VLLMServer(config)


class Bench:
    def __init__(self, args: argparse.Namespace, model: str, tok: Any, endpoint: Any, backend_label: str) -> None:
        self.args = args
        self.model = model
        self.tok = tok
        self.endpoint = endpoint
        self.label = backend_label
        self.batches: Callable[[], Awaitable[int]] | None = None  # hf_cpu: the server's batch counter
        self.seeded = False  # vLLM: seeded sampling (greedy with n > 1 is refused); hf_cpu has no per-request seed
        self.backend_pids: list[int] = []  # the processes serving generation (hf_cpu's actor; vLLM's server, engine)

    def cpu(self) -> tuple[float, float]:
        """CPU seconds (user + system) so far of this process (the endpoint's thread, the client) and of the backend's
        processes: less noisy than wall time on a shared machine."""
        import psutil

        def used(pid: int) -> float:
            try:
                times = psutil.Process(pid).cpu_times()
            except psutil.Error:
                return 0.0
            return times.user + times.system

        return used(os.getpid()), sum(used(pid) for pid in self.backend_pids)

    def logprob_kwargs(self, path: str) -> dict[str, Any]:
        if self.args.no_logprobs:
            return {}
        return {"logprobs": True} if path == CHAT else {"logprobs": 1}

    def sampling(self, i: int) -> dict[str, Any]:
        """Greedy, or with ``seeded`` temperature 1 and seed 1000 + i (vLLM refuses greedy with n > 1; the endpoint
        gives the j-th of n samples seed + j, as vLLM does, so both sides sample the same tokens)."""
        kw = {"n": self.args.n, "max_tokens": self.args.max_tokens}
        return {**kw, "temperature": 1.0, "seed": SEED + i} if self.seeded else {**kw, "temperature": 0.0}

    # ---- the endpoint side (atroposlib's client over HTTP) ----
    def client_route(self, client: Any, path: str) -> Callable[[int], Awaitable[tuple[int, list[str]]]]:
        tok, kw, count = self.tok, self.sampling, range(self.args.prompts)
        texts, ids = [completion_prompt(tok, i) for i in count], [chat_prompt_ids(tok, i) for i in count]

        async def chat(i: int) -> tuple[int, list[str]]:
            answer = await client.chat_completion(messages=chat_messages(i), **kw(i), **self.logprob_kwargs(CHAT))
            return answer.usage.completion_tokens, [c.message.content for c in answer.choices]

        async def completion(i: int) -> tuple[int, list[str]]:
            answer = await client.completion(prompt=texts[i], **kw(i), **self.logprob_kwargs(COMPLETIONS))
            return answer.usage.completion_tokens, [c.text for c in answer.choices]

        async def generate(i: int) -> tuple[int, list[str]]:
            _, tokens, _, _ = await client.tokens_and_logprobs_completion(input_ids=list(ids[i]), **kw(i))
            return sum(len(t) for t in tokens), [tok.decode(t, skip_special_tokens=True) for t in tokens]

        return {CHAT: chat, COMPLETIONS: completion, GENERATE: generate}[path]

    # ---- the backend called directly (hf_cpu) ----
    def backend_route(self, backend: Any, path: str) -> Callable[[int], Awaitable[tuple[int, list[str]]]]:
        from recipe.atropos.endpoint.backends import SamplingParams

        tok = self.tok
        params = SamplingParams(max_tokens=self.args.max_tokens, temperature=0.0)

        def prompt_ids(i: int) -> list[int]:
            if path == COMPLETIONS:  # the completions route encodes a text prompt with special tokens
                return list(tok.encode(completion_prompt(tok, i), add_special_tokens=True))
            return chat_prompt_ids(tok, i)

        prompts = [prompt_ids(i) for i in range(self.args.prompts)]  # computed once, outside the timed rounds

        async def direct(i: int) -> tuple[int, list[str]]:
            outs = await asyncio.gather(*(backend.generate(prompts[i], params) for _ in range(self.args.n)))
            texts = [tok.decode(o.token_ids, skip_special_tokens=True) for o in outs]
            return sum(len(o.token_ids) for o in outs), texts

        return direct

    async def round(self, route: Route, side: str, record: bool = True) -> None:
        """``--prompts`` requests at once through ``side``; recorded unless a warm-up (then one request)."""
        call = route.endpoint if side == "endpoint" else route.direct
        count = self.args.prompts if record else 1
        if side == "endpoint":
            self.endpoint.phase_seconds = {}
        latencies: list[float] = [0.0] * count

        async def timed(i: int) -> tuple[int, list[str]]:
            start = time.perf_counter()
            out = await call(i)
            latencies[i] = time.perf_counter() - start
            return out

        batches0 = await self.batches() if self.batches else 0
        cpu0 = self.cpu()
        start = time.perf_counter()
        outs = await asyncio.gather(*(timed(i) for i in range(count)))
        wall = time.perf_counter() - start
        cpu1 = self.cpu()
        batches = (await self.batches() - batches0) if self.batches else 0
        phases, self.endpoint.phase_seconds = self.endpoint.phase_seconds or {}, None
        if not record:
            return
        s = route.sides[side]
        s.walls.append(wall)
        s.tokens.append(sum(n for n, _ in outs))
        s.latencies.extend(latencies)
        s.batches.append(batches)
        s.cpu_here.append(cpu1[0] - cpu0[0])
        s.cpu_backend.append(cpu1[1] - cpu0[1])
        for phase, seconds in phases.items():
            s.phases[phase] = s.phases.get(phase, 0.0) + seconds
        s.texts = [texts for _, texts in outs]

    async def run(self, routes: list[Route]) -> None:
        for route in routes:  # warm-up: connections, the chat template's compiled jinja, the model's first batches
            for side in ("endpoint", "backend"):
                await self.round(route, side, record=False)
        for rep in range(self.args.repeats):
            order = ("endpoint", "backend") if rep % 2 == 0 else ("backend", "endpoint")
            for route in routes:
                for side in order:
                    await self.round(route, side)
            print(f"  repeat {rep + 1}/{self.args.repeats} done; load {os.getloadavg()[0]:.1f}", flush=True)

    def report(self, routes: list[Route]) -> list[str]:
        a = self.args
        sampling = f"temperature 1, seed {SEED}+request" if self.seeded else "greedy"
        head = f"{a.prompts} requests x n={a.n} at once, max_tokens {a.max_tokens}, {sampling}"
        head += "" if a.no_logprobs else ", logprobs"
        print(f"\n{self.label}: {head}; {a.repeats} interleaved rounds per side (A B, B A, ...); per-request ms: means")
        ratios = []
        for route in routes:
            ep, be = route.sides["endpoint"], route.sides["backend"]
            n_req = max(len(ep.latencies), 1)
            rows: list[tuple[str, str, str]] = [
                ("round wall (s, median)", f"{statistics.median(ep.walls):.3f}", f"{statistics.median(be.walls):.3f}"),
                ("round wall (s, min-max)", _spread(ep.walls), _spread(be.walls)),
                ("tokens generated per round", _same(ep.tokens), _same(be.tokens)),
                (
                    "ms per generated token (median)",
                    f"{1000 * statistics.median(ep.per_token()):.2f}",
                    f"{1000 * statistics.median(be.per_token()):.2f}",
                ),
            ]
            answers = [t for texts in ep.texts for t in texts], [t for texts in be.texts for t in texts]
            differ = sum(a != b for a, b in zip(*answers, strict=True))
            same = "yes" if not differ else f"{differ} of {len(answers[0])} differ"
            rows.append(("same answers (last round)", same, same))
            rows.append(("CPU s per round: this process (median)", _median(ep.cpu_here), _median(be.cpu_here)))
            rows.append(("CPU s per round: backend's processes", _median(ep.cpu_backend), _median(be.cpu_backend)))
            if any(ep.batches) or any(be.batches):
                rows.append(("hf_cpu batched generates per round", _same(ep.batches), _same(be.batches)))
            rows.append(("per request (mean ms):", "", ""))
            latency = 1000 * statistics.fmean(ep.latencies)
            handler = {p: 1000 * ep.phases.get(p, 0.0) / n_req for p in HANDLER_PHASES}
            server = 1000 * ep.phases.get(SERVER_TOTAL, 0.0) / n_req
            rows.append(("  client + socket + uvicorn's HTTP (rest)", f"{latency - server:.2f}", "-"))
            rows.append(("  ASGI: middleware + routing", f"{server - sum(handler.values()):.2f}", "-"))
            direct = 1000 * statistics.fmean(be.latencies)
            for phase in HANDLER_PHASES:
                other = f"{direct:.2f}" if phase == "backend generate" else "-"
                rows.append((f"  {phase}", f"{handler[phase]:.2f}", other))
            rows.append(("  = request latency", f"{latency:.2f}", f"{direct:.2f}"))
            overhead = latency - handler["backend generate"]
            rows.append(("  endpoint's own time (latency - generate)", f"{overhead:.2f}", "-"))
            print(f"\n{route.path:44s} {'endpoint':>16s} {'backend':>16s}")
            for label, x, y in rows:
                print(f"{label:44s} {x:>16s} {y:>16s}")
            for name, side in (("endpoint", ep), ("backend", be)):
                print(f"  {name} rounds (s, in order): {' '.join(f'{w:.2f}' for w in side.walls)}")
            # A repeat's two rounds of a route run back to back: the ratio of each pair cancels the machine's drift.
            paired = statistics.median(a / b for a, b in zip(ep.walls, be.walls, strict=True))
            token_ratio = statistics.median(a / b for a, b in zip(ep.per_token(), be.per_token(), strict=True))
            of_medians = statistics.median(ep.walls) / statistics.median(be.walls)
            # Noise-free estimate: the backend's median round plus the endpoint's own time per request (its requests
            # run at once, so this counts the overhead as if none of it overlapped).
            base = statistics.median(be.walls)
            profile = (base + overhead / 1000) / base
            ratios.append(
                f"ratio endpoint/backend {route.path}: time {paired:.2f}x | per generated token {token_ratio:.2f}x | "
                f"ratio of the median rounds {of_medians:.2f}x | from the phase profile {profile:.3f}x | {self.label}"
            )
        return ratios


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}"


def _spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def _same(values: list[int]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "/".join(map(str, values))


def routes_for(bench: Bench, client: Any, direct: Callable[[str], Callable], paths: list[str]) -> list[Route]:
    return [Route(p, bench.client_route(client, p), direct(p)) for p in paths]


def process_tree(pid: int, named: str = "") -> list[int]:
    """The descendants of ``pid`` whose command line holds ``named`` (Ray's actor processes are titled
    ``ray::<class>``)."""
    import psutil

    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if named in " ".join(child.cmdline()):
                found.append(child.pid)
        except psutil.Error:
            continue
    return found


# ---- hf_cpu -------------------------------------------------------------------------------------------------------
def run_hf_cpu(args: argparse.Namespace, model: str) -> list[str]:
    import ray
    from transformers import AutoTokenizer

    from recipe.atropos.cpu.hf_cpu import HFCPURolloutServer
    from recipe.atropos.endpoint.backends import RayReplicaBackend

    tok = AutoTokenizer.from_pretrained(model)
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    endpoint = None
    try:
        server = HFCPURolloutServer.remote(model, args.max_tokens)
        ray.get(server.stats.remote())
        eos = [tok.eos_token_id]
        backend = RayReplicaBackend([server], eos)
        endpoint = timed_endpoint_class()(
            backend, max_tokens_cap=args.max_tokens, eos_token_ids=eos, tokenizer=tok, served_model_name=model
        ).start()
        bench = Bench(args, model, tok, endpoint, "hf_cpu")

        async def batches() -> int:
            return int((await server.stats.remote())["n_batches"])

        bench.batches = batches
        bench.backend_pids = process_tree(os.getpid(), "HFCPURolloutServer")

        async def main() -> list[str]:
            client = atropos_client(f"{endpoint.url}/v1", model, model)
            routes = routes_for(bench, client, lambda p: bench.backend_route(backend, p), args.routes)
            await bench.run(routes)
            return bench.report(routes)

        return asyncio.run(main())
    finally:
        if endpoint is not None:
            endpoint.stop()
        ray.shutdown()


# ---- vLLM ---------------------------------------------------------------------------------------------------------
def run_vllm(args: argparse.Namespace, model: str, out: Path) -> list[str]:
    from transformers import AutoTokenizer

    from recipe.atropos.endpoint.backends import VLLMCompletionsBackend
    from recipe.atropos.launcher.processes import ManagedProcess, free_port

    port = free_port()
    argv = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
        "--port", str(port), "--dtype", "float32", "--max-model-len", "1024", "--enforce-eager", "--seed", "0",
    ]  # fmt: skip
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": args.vllm_omp_bind, "HF_HUB_OFFLINE": "1"}
    vllm = ManagedProcess("vllm", argv, out / "vllm.log", env=env).start()
    endpoint = None
    try:
        start = time.monotonic()
        vllm.wait_http(f"http://127.0.0.1:{port}/health", timeout=600)
        print(f"vLLM's OpenAI server up in {time.monotonic() - start:.0f} s (log {out / 'vllm.log'})", flush=True)
        tok = AutoTokenizer.from_pretrained(model)
        backend = VLLMCompletionsBackend([f"127.0.0.1:{port}"])
        endpoint = timed_endpoint_class()(
            backend, max_tokens_cap=args.max_tokens, eos_token_ids=[tok.eos_token_id], tokenizer=tok,
            served_model_name=model,
        ).start()  # fmt: skip
        bench = Bench(args, model, tok, endpoint, "vllm")
        bench.seeded = True
        bench.backend_pids = [vllm.pid, *process_tree(vllm.pid)]
        paths = [p for p in args.routes if p != GENERATE]

        async def main() -> list[str]:
            ours = atropos_client(f"{endpoint.url}/v1", model, model)
            theirs = atropos_client(f"http://127.0.0.1:{port}/v1", model, model)
            routes = routes_for(bench, ours, lambda p: bench.client_route(theirs, p), paths)
            await bench.run(routes)
            return bench.report(routes)

        return asyncio.run(main())
    finally:
        if endpoint is not None:
            endpoint.stop()
        vllm.stop()


def vllm_python() -> str | None:
    """This interpreter when it has vLLM, else ``.venv-vllm``'s, else None."""
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    venv = ROOT / ".venv-vllm" / "bin" / "python"
    return str(venv) if (ROOT / ".venv-vllm" / ".installed").exists() else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", choices=["hf_cpu", "vllm", "both"], default="hf_cpu")
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct", help="a model dir, embedded:..., or tiny")
    parser.add_argument("--prompts", type=int, default=4, help="requests sent at once per round")
    parser.add_argument("--n", type=int, default=2, help="samples per request")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=6, help="rounds per side and route (even: as many A B as B A)")
    paths = [CHAT, COMPLETIONS, GENERATE]
    parser.add_argument("--routes", nargs="+", default=paths, choices=paths, help="vllm: the first two only")
    parser.add_argument("--no-logprobs", action="store_true", help="chat/completion requests without logprobs")
    parser.add_argument(
        "--vllm-omp-bind",
        default="0",
        help="vLLM's VLLM_CPU_OMP_THREADS_BIND: its engine's OpenMP threads (default 0: one thread on CPU 0, the HTTP "
        "layers on the rest; 'nobind': one per core, which on 2 cores stalls whenever the HTTP layers run)",
    )
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # the vLLM part run by the parent
    args = parser.parse_args()
    out = args.out or ROOT / "outputs" / f"bench-endpoint-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    model = str(build_tiny_model(out / "tiny")) if args.model == "tiny" else resolve_model_path(args.model)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.child:
        print(f"bench-endpoint: model {model}, backend {args.backend}, output {out}", flush=True)
        print(f"load before: {_load()} on {os.cpu_count()} CPUs", flush=True)
    ratios: list[str] = []
    failed = False
    if args.backend in ("hf_cpu", "both"):
        ratios += run_hf_cpu(args, model)
    if args.backend in ("vllm", "both"):
        python = vllm_python()
        if python is None:
            print("vllm: skipped: no vLLM here and no .venv-vllm (make vllm-env)", flush=True)
        elif python == sys.executable:
            ratios += run_vllm(args, model, out)
        else:  # the vLLM part in .venv-vllm: its output streamed, its ratio lines printed with the others at the end
            argv = [python, __file__, *sys.argv[1:], "--backend", "vllm", "--model", model, "--out", str(out)]
            argv.append("--child")
            with subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True) as proc:
                for line in proc.stdout:
                    if line.startswith("ratio "):
                        ratios.append(line.rstrip("\n"))
                    else:
                        print(line, end="", flush=True)
            if proc.returncode:
                print(f"vllm part failed (exit code {proc.returncode})", flush=True)
                failed = True
    if args.child:  # the parent prints them
        print("\n".join(ratios), flush=True)
        return 0
    print(f"load after: {_load()}", flush=True)
    for line in ratios:
        print(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
