"""Load test of the guarded API (``python -m recipe.atropos.guard.app``), loopback only, bounded in time and count.

K environments (asyncio tasks, one request in flight each, as many env ids registered) post valid ScoredData groups
of ``--group-size`` sequences x ``--tokens`` tokens (gzip, as atroposlib's BaseEnv sends bodies over 1 KB) for
``--seconds``, while a slow trainer takes one batch (``--batch-groups`` groups) every ``--drain-every`` s with
``GET /batch``. The guard runs as the launcher starts it (stats file, rejected-groups file, journal). Its resident
memory (psutil) is sampled every second.

Prints a table (every 10 s: accepted groups, groups/s over the interval, API queue, guard RSS, the guard's CPU time per
accepted group and its share of one core over the interval), then one line:

    guard load: K=8 accepted 12000 groups in 60.0 s = 200.0 groups/s | post latency p50 8.1 ms p99 40.2 ms |
    guard peak RSS 900 MB (start 120 MB) | guard CPU 50.0 s = 4.2 ms per accepted group | drained 960 groups | ...

The guard's CPU time (user + system) per accepted group is printed too: on a machine shared with other work the
rate measures the share of the CPU the guard got, the CPU per group what it costs (1000 / that = groups/s on one free
core, the clients and the trainer elsewhere).

Bounds: at most ``--max-groups`` posts in all, and posting stops early (said in the summary) when the guard's RSS
passes ``--max-rss-mb`` (the API queue grows while the trainer is slow unless the guard bounds its memory).

    python bench/bench_guard.py [--envs 8] [--seconds 60] [--group-size 8] [--tokens 512] [--drain-every 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipe.atropos.guard.app import guard_argv  # noqa: E402
from recipe.atropos.launcher.processes import ManagedProcess, free_port  # noqa: E402

VOCAB = 49152  # SmolLM2's


def make_group(group_size: int, tokens: int, env_id: int, seed: int) -> dict:
    """A valid group: a 64-token prompt (masked), the rest completion, per-token log-probs (1.0 on the prompt)."""
    rng = random.Random(seed)
    prompt = min(64, tokens - 1)
    seqs = [[rng.randrange(VOCAB) for _ in range(tokens)] for _ in range(group_size)]
    return {
        "tokens": seqs,
        "masks": [[-100] * prompt + s[prompt:] for s in seqs],
        "scores": [float(i % 2) for i in range(group_size)],
        "inference_logprobs": [[1.0] * prompt + [round(-rng.random(), 4) for _ in s[prompt:]] for s in seqs],
        "advantages": None,
        "ref_logprobs": None,
        "messages": None,
        "generation_params": None,
        "group_overrides": {},
        "overrides": [{} for _ in seqs],
        "images": None,
        "env_id": env_id,
    }


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Bench:
    def __init__(self, args: argparse.Namespace, url: str, guard_pid: int) -> None:
        self.args = args
        self.url = url
        self.guard = psutil.Process(guard_pid)
        self.latencies: list[float] = []
        self.accepted = 0
        self.errors = 0
        self.drained = 0
        self.stop_reason = f"{args.seconds:.0f} s elapsed"
        self.deadline = 0.0
        self.stopping = False
        self.rss: list[tuple[float, float]] = []  # (seconds since start, MB)
        self.table: list[tuple[float, int, float, int, float, float, float]] = []

    async def poster(self, session: aiohttp.ClientSession, env_id: int) -> None:
        body = json.dumps(make_group(self.args.group_size, self.args.tokens, env_id, seed=env_id)).encode()
        headers = {"Content-Type": "application/json"}
        if not self.args.no_gzip:
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        while not self.stopping and time.monotonic() < self.deadline:
            if self.accepted + self.errors >= self.args.max_groups:
                self.stop_reason = f"--max-groups {self.args.max_groups} posted"
                break
            start = time.perf_counter()
            try:
                async with session.post(f"{self.url}/scored_data", data=body, headers=headers) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except aiohttp.ClientError:
                ok = False
            self.latencies.append(time.perf_counter() - start)
            if ok:
                self.accepted += 1
            else:
                self.errors += 1

    async def drainer(self, session: aiohttp.ClientSession) -> None:
        while not self.stopping and time.monotonic() < self.deadline:
            await asyncio.sleep(self.args.drain_every)
            async with session.get(f"{self.url}/batch") as resp:
                batch = (await resp.json()).get("batch")
            self.drained += len(batch or [])

    async def sampler(self, session: aiohttp.ClientSession, t0: float) -> None:
        last_t, last_n, next_row = 0.0, 0, 10.0
        last_cpu = sum(self.guard.cpu_times()[:2])
        while not self.stopping:
            await asyncio.sleep(1.0)
            now = time.monotonic() - t0
            mb = self.guard.memory_info().rss / 2**20
            self.rss.append((now, mb))
            if mb > self.args.max_rss_mb:
                self.stop_reason = f"guard RSS {mb:.0f} MB passed --max-rss-mb {self.args.max_rss_mb}"
                self.stopping = True
            if now >= next_row or self.stopping or time.monotonic() >= self.deadline:
                async with session.get(f"{self.url}/status") as resp:
                    queue = int((await resp.json()).get("queue_size", -1))
                rate = (self.accepted - last_n) / max(now - last_t, 1e-9)
                cpu = sum(self.guard.cpu_times()[:2])
                per_group = 1000 * (cpu - last_cpu) / max(self.accepted - last_n, 1)
                busy = (cpu - last_cpu) / max(now - last_t, 1e-9)
                self.table.append((now, self.accepted, rate, queue, mb, per_group, busy))
                last_t, last_n, last_cpu, next_row = now, self.accepted, cpu, next_row + 10.0
            if time.monotonic() >= self.deadline:
                break

    async def run(self) -> float:
        connector = aiohttp.TCPConnector(limit=self.args.envs + 4)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            t0 = time.monotonic()
            self.deadline = t0 + self.args.seconds
            tasks = [asyncio.create_task(self.poster(session, env_id)) for env_id in range(self.args.envs)]
            drain = asyncio.create_task(self.drainer(session))
            sample = asyncio.create_task(self.sampler(session, t0))
            await asyncio.gather(*tasks)
            elapsed = time.monotonic() - t0
            self.stopping = True
            await asyncio.gather(drain, sample)
        return elapsed


def register(url: str, args: argparse.Namespace) -> None:
    batch = args.batch_groups * args.group_size
    body = {"wandb_group": "bench", "wandb_project": "bench", "batch_size": batch, "max_token_len": args.tokens + 1}
    body.update({"checkpoint_dir": "", "save_checkpoint_interval": -1, "starting_step": 0, "num_steps": 10**6})
    requests.post(f"{url}/register", json=body, timeout=10).raise_for_status()
    requests.get(f"{url}/batch", timeout=10)  # admits environments
    for i in range(args.envs):
        env = {"max_token_length": args.tokens + 1, "desired_name": f"env{i}", "weight": 1.0}
        env.update({"group_size": args.group_size, "min_batch_allocation": None})
        requests.post(f"{url}/register-env", json=env, timeout=10).raise_for_status()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=8, help="concurrent posting environments (K)")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--batch-groups", type=int, default=8, help="groups per trainer batch")
    parser.add_argument("--drain-every", type=float, default=0.5, help="seconds between the trainer's GET /batch")
    parser.add_argument("--max-groups", type=int, default=30000, help="most groups posted in all")
    parser.add_argument("--max-rss-mb", type=float, default=2500.0, help="stop posting past this guard RSS")
    parser.add_argument("--no-gzip", action="store_true", help="post plain JSON")
    parser.add_argument("--no-stats-file", action="store_true", help="run the guard without its stats file")
    args = parser.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="bench_guard_"))
    port = free_port()
    argv_ = guard_argv(
        port,
        vocab_size=VOCAB,
        batch_size=args.batch_groups * args.group_size,
        rejected_file=workdir / "rejected.jsonl",
        stats_file=None if args.no_stats_file else workdir / "stats.json",
        journal_dir=workdir / "journal",  # every accepted group fsynced; memory bound: the guard's default
    )
    guard = ManagedProcess("guard", argv_, workdir / "guard.log").start()
    url = f"http://127.0.0.1:{port}"
    try:
        guard.wait_http(f"{url}/status", timeout=60)
        register(url, args)
        bench = Bench(args, url, guard.pid)
        start_mb = bench.guard.memory_info().rss / 2**20
        cpu0 = sum(bench.guard.cpu_times()[:2])
        elapsed = asyncio.run(bench.run())
        guard_cpu = sum(bench.guard.cpu_times()[:2]) - cpu0
    finally:
        guard.popen.kill()
        guard.popen.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)  # the journal holds every accepted group (~0.1 MB each here)
    heads = ("t (s)", "accepted", "groups/s", "API queue", "guard RSS MB", "CPU ms/group", "guard CPU")
    print("  ".join(f"{h:>{w}}" for h, w in zip(heads, (6, 9, 9, 9, 12, 12, 9), strict=True)))
    for t, n, rate, queue, mb, per_group, busy in bench.table:
        print(f"{t:6.0f}  {n:9d}  {rate:9.1f}  {queue:9d}  {mb:12.0f}  {per_group:12.1f}  {busy:9.0%}")
    ms = [x * 1000 for x in bench.latencies]
    peak = max((mb for _, mb in bench.rss), default=start_mb)
    per_group = 1000 * guard_cpu / max(bench.accepted, 1)
    print(
        f"guard load: K={args.envs} accepted {bench.accepted} groups ({args.group_size}x{args.tokens} tokens) in "
        f"{elapsed:.1f} s = {bench.accepted / elapsed:.1f} groups/s | post latency p50 {percentile(ms, 0.5):.1f} ms "
        f"p99 {percentile(ms, 0.99):.1f} ms (mean {statistics.fmean(ms) if ms else float('nan'):.1f}) | guard peak "
        f"RSS {peak:.0f} MB (start {start_mb:.0f} MB) | guard CPU {guard_cpu:.1f} s = {per_group:.1f} ms per "
        f"accepted group | drained {bench.drained} groups | errors {bench.errors} | stopped: {bench.stop_reason} | "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )
    return 0 if bench.accepted and not bench.errors else 1


if __name__ == "__main__":
    sys.exit(main())
