"""Load test of the guarded API (``python -m recipe.atropos.guard.app``), the old guard and the new side by side, on
loopback, bounded in time and count.

The *old* guard is the guard of git commit ``--old-ref`` (default: the last one before the guard was rebuilt on
FastAPI's routes with a body parsed once, issue 26 item 5), materialised with ``git archive`` into a temporary directory
that comes first on its ``PYTHONPATH``; the *new* guard is this checkout's. Both run the same command line. Phases run
in ``--order`` (default ``old,new,new,old``: each side once early and once late, so a machine getting busier or
quieter during the run does not favour one side).

In each phase, K environments (asyncio tasks, one request in flight each, as many env ids registered) post valid
ScoredData groups of ``--group-size`` sequences x ``--tokens`` tokens (gzip, as atroposlib's BaseEnv sends bodies over
1 KB) for ``--seconds``, while a slow trainer takes one batch (``--batch-groups`` groups) every ``--drain-every`` s with
``GET /batch``. The guard runs as the launcher starts it (stats file, rejected-groups file, journal fsynced before each
answer). Its resident memory (psutil) is sampled every second.

Prints, per phase, a table (every 10 s: accepted groups, groups/s over the interval, API queue, guard RSS, the guard's
CPU time per accepted group and its share of one core over the interval) and one line ``guard load (old|new): ...``;
then a side-by-side table (each side's phases pooled) and the ratio lines, as in a run on the shared 2-core test
machine with little else running (docs/atropos.rst, *Guard load test*)::

    ratio new/old guard CPU per accepted group: 0.45x (old 5.63 ms, new 2.54 ms)
    ratio new/old post latency p99: 0.31x (old 134.7 ms, new 41.5 ms)
    ratio new/old groups/s: 2.44x (old 159.1, new 387.9)

The guard's CPU time (user + system) per accepted group is what the guard costs: on a machine shared with other work
the rate and the latencies measure the share of the CPU the guard got, the CPU per group what it needs (1000 / that =
groups/s on one free core, the clients and the trainer elsewhere).

Bounds: at most ``--max-groups`` posts per phase, and posting stops early (said in the summary) when the guard's RSS
passes ``--max-rss-mb``.

    python bench/bench_guard.py [--envs 8] [--seconds 20] [--order old,new,new,old] [--old-ref REF] [--group-size 8]
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
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipe.atropos.guard.app import guard_argv  # noqa: E402
from recipe.atropos.launcher.processes import ManagedProcess, free_port  # noqa: E402

VOCAB = 49152  # SmolLM2's
OLD_REF = "38f4d158dc9ee445604f719991c659458525002d"  # the guard in raw ASGI, each body parsed twice


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


@dataclass
class Phase:
    """What one phase measured."""

    side: str
    accepted: int = 0
    errors: int = 0
    drained: int = 0
    elapsed: float = 0.0
    cpu: float = 0.0  # guard CPU seconds (user + system) during the load
    start_mb: float = 0.0
    peak_mb: float = 0.0
    stop_reason: str = ""
    latencies: list[float] = field(default_factory=list)  # ms

    def rate(self) -> float:
        return self.accepted / max(self.elapsed, 1e-9)

    def cpu_ms(self) -> float:
        return 1000 * self.cpu / max(self.accepted, 1)


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


def materialise_old_guard(ref: str, into: Path) -> str:
    """``recipe/`` as of git ``ref`` under ``into``; the commit's one-line description."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "recipe"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    subject = subprocess.run(
        ["git", "-C", str(ROOT), "log", "-1", "--format=%h %cs %s", ref], capture_output=True, text=True, check=True
    )
    return subject.stdout.strip()


def imported_from(env: dict[str, str], cwd: str | None) -> str:
    """The file ``recipe.atropos.guard.app`` is imported from with this environment and working directory."""
    probe = [sys.executable, "-c", "import recipe.atropos.guard.app as m; print(m.__file__)"]
    return subprocess.run(probe, env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True).stdout.strip()


def run_phase(args: argparse.Namespace, side: str, tree: Path | None) -> tuple[Phase, list]:
    workdir = Path(tempfile.mkdtemp(prefix=f"bench_guard_{side}_"))
    port = free_port()
    argv = guard_argv(
        port,
        vocab_size=VOCAB,
        batch_size=args.batch_groups * args.group_size,
        rejected_file=workdir / "rejected.jsonl",
        stats_file=None if args.no_stats_file else workdir / "stats.json",
        journal_dir=workdir / "journal",  # every accepted group fsynced; memory bound: the guard's default
    )
    env = {"PYTHONPATH": str(tree)} if tree is not None else {}
    guard = ManagedProcess(f"guard-{side}", argv, workdir / "guard.log", env=env, cwd=str(tree or ROOT)).start()
    url = f"http://127.0.0.1:{port}"
    phase = Phase(side)
    try:
        guard.wait_http(f"{url}/status", timeout=60)
        register(url, args)
        bench = Bench(args, url, guard.pid)
        phase.start_mb = bench.guard.memory_info().rss / 2**20
        cpu0 = sum(bench.guard.cpu_times()[:2])
        phase.elapsed = asyncio.run(bench.run())
        phase.cpu = sum(bench.guard.cpu_times()[:2]) - cpu0
    finally:
        guard.popen.kill()
        guard.popen.wait(timeout=30)
        shutil.rmtree(workdir, ignore_errors=True)  # the journal holds every accepted group (~0.1 MB each here)
    phase.accepted, phase.errors, phase.drained = bench.accepted, bench.errors, bench.drained
    phase.stop_reason, phase.latencies = bench.stop_reason, [x * 1000 for x in bench.latencies]
    phase.peak_mb = max((mb for _, mb in bench.rss), default=phase.start_mb)
    return phase, bench.table


def print_phase(args: argparse.Namespace, number: int, phase: Phase, table: list) -> None:
    heads = ("t (s)", "accepted", "groups/s", "API queue", "guard RSS MB", "CPU ms/group", "guard CPU")
    print(f"-- phase {number}: {phase.side} guard")
    print("  ".join(f"{h:>{w}}" for h, w in zip(heads, (6, 9, 9, 9, 12, 12, 9), strict=True)))
    for t, n, rate, queue, mb, per_group, busy in table:
        print(f"{t:6.0f}  {n:9d}  {rate:9.1f}  {queue:9d}  {mb:12.0f}  {per_group:12.1f}  {busy:9.0%}")
    ms = phase.latencies
    print(
        f"guard load ({phase.side}): K={args.envs} accepted {phase.accepted} groups ({args.group_size}x{args.tokens} "
        f"tokens) in {phase.elapsed:.1f} s = {phase.rate():.1f} groups/s | post latency p50 {percentile(ms, 0.5):.1f} "
        f"ms p99 {percentile(ms, 0.99):.1f} ms (mean {statistics.fmean(ms) if ms else float('nan'):.1f}) | guard "
        f"peak RSS {phase.peak_mb:.0f} MB (start {phase.start_mb:.0f} MB) | guard CPU {phase.cpu:.1f} s = "
        f"{phase.cpu_ms():.2f} ms per accepted group | drained {phase.drained} groups | errors {phase.errors} | "
        f"stopped: {phase.stop_reason} | load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs",
        flush=True,
    )


def pooled(phases: list[Phase], side: str) -> Phase:
    """The phases of ``side`` as one."""
    mine = [p for p in phases if p.side == side]
    return Phase(
        side,
        accepted=sum(p.accepted for p in mine),
        errors=sum(p.errors for p in mine),
        drained=sum(p.drained for p in mine),
        elapsed=sum(p.elapsed for p in mine),
        cpu=sum(p.cpu for p in mine),
        peak_mb=max((p.peak_mb for p in mine), default=0.0),
        stop_reason=f"{len(mine)} phases",
        latencies=[ms for p in mine for ms in p.latencies],
    )


def print_side_by_side(old: Phase, new: Phase) -> None:
    rows = [
        ("accepted groups", old.accepted, new.accepted, "{:.0f}"),
        ("groups/s", old.rate(), new.rate(), "{:.1f}"),
        ("post latency p50 (ms)", percentile(old.latencies, 0.5), percentile(new.latencies, 0.5), "{:.1f}"),
        ("post latency p99 (ms)", percentile(old.latencies, 0.99), percentile(new.latencies, 0.99), "{:.1f}"),
        ("guard CPU per accepted group (ms)", old.cpu_ms(), new.cpu_ms(), "{:.2f}"),
        ("guard peak RSS (MB)", old.peak_mb, new.peak_mb, "{:.0f}"),
        ("errors", old.errors, new.errors, "{:.0f}"),
    ]
    print(f"-- side by side ({old.stop_reason} old, {new.stop_reason} new, pooled)")
    print(f"{'':36s}{'old':>10s}{'new':>10s}{'new/old':>10s}")
    for name, a, b, fmt in rows:
        ratio = f"{b / a:.2f}x" if a else "-"
        print(f"{name:36s}{fmt.format(a):>10s}{fmt.format(b):>10s}{ratio:>10s}")
    cpu_ratio = new.cpu_ms() / max(old.cpu_ms(), 1e-9)
    p99_old, p99_new = percentile(old.latencies, 0.99), percentile(new.latencies, 0.99)
    print(
        f"ratio new/old guard CPU per accepted group: {cpu_ratio:.2f}x (old {old.cpu_ms():.2f} ms, new "
        f"{new.cpu_ms():.2f} ms)"
    )
    print(f"ratio new/old post latency p99: {p99_new / p99_old:.2f}x (old {p99_old:.1f} ms, new {p99_new:.1f} ms)")
    print(
        f"ratio new/old groups/s: {new.rate() / max(old.rate(), 1e-9):.2f}x (old {old.rate():.1f}, new "
        f"{new.rate():.1f})",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", type=int, default=8, help="concurrent posting environments (K)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--order", default="old,new,new,old", help="phases, comma-separated: old and/or new")
    parser.add_argument("--old-ref", default=OLD_REF, help="git commit of the old guard")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--batch-groups", type=int, default=8, help="groups per trainer batch")
    parser.add_argument("--drain-every", type=float, default=0.5, help="seconds between the trainer's GET /batch")
    parser.add_argument("--max-groups", type=int, default=30000, help="most groups posted per phase")
    parser.add_argument("--max-rss-mb", type=float, default=2500.0, help="stop posting past this guard RSS")
    parser.add_argument("--no-gzip", action="store_true", help="post plain JSON")
    parser.add_argument("--no-stats-file", action="store_true", help="run the guard without its stats file")
    args = parser.parse_args(argv)
    order = [side.strip() for side in args.order.split(",") if side.strip()]
    if not order or set(order) - {"old", "new"}:
        parser.error(f"--order {args.order!r}: a comma-separated list of old and new")

    trees: dict[str, Path | None] = {"new": None}
    old_dir = Path(tempfile.mkdtemp(prefix="bench_guard_old_tree_"))
    try:
        if "old" in order:
            print(f"old guard: {materialise_old_guard(args.old_ref, old_dir)}")
            trees["old"] = old_dir
        for side, tree in trees.items():
            where = imported_from({"PYTHONPATH": str(tree)} if tree else {}, str(tree or ROOT))
            print(f"{side} guard: {where}")
            if not where.startswith(str(tree or ROOT)):
                raise SystemExit(f"the {side} guard would be imported from {where!r}, not from {tree or ROOT}")
        phases = []
        for number, side in enumerate(order, 1):
            phase, table = run_phase(args, side, trees[side])
            print_phase(args, number, phase, table)
            phases.append(phase)
    finally:
        shutil.rmtree(old_dir, ignore_errors=True)
    if {"old", "new"} <= set(order):
        print_side_by_side(pooled(phases, "old"), pooled(phases, "new"))
    return 0 if all(p.accepted and not p.errors for p in phases) else 1


if __name__ == "__main__":
    sys.exit(main())
