"""Helpers shared by the tests that start real processes: command lines, a run-api process, the one wait loop, processes
left behind."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import psutil
import pytest
import requests

from recipe.atropos.guard.app import guard_argv
from recipe.atropos.guard.state import GuardSettings
from recipe.atropos.launcher.processes import ManagedProcess, run_api_argv, stop_process_tree, tail
from recipe.atropos.polling import poll_until
from recipe.atropos.rundir import RunDir
from tests.factories import CONFIG_DIR, TINY_CONFIG

# Set (to a token unique to the test) in the environment of every process a test under `no_leftovers` starts and
# inherited by all their descendants, Ray's included: finds what they left behind even after re-parenting to init.
TEST_TAG_VAR = "ATROPOS_VERL_TEST_TAG"

# Processes owned by fixtures that outlive a test (the module's run-api, restarted by some tests): not leftovers.
FIXTURE_PIDS: set[int] = set()


def printed_resume_command(log_text: str) -> tuple[str, list[str]]:
    """The last resume line a launcher printed as it stopped (``resume from checkpoint N (of T steps): CMD`` or
    ``finished: ...; to train on to step M: CMD``, :func:`recipe.atropos.launcher.report.resume_line`): the words
    before the command, and the command split as a shell would."""
    pattern = re.compile(r"^(resume from checkpoint \d+ \(of \d+ steps\)|finished: .*?to train on to step \d+): (.+)$")
    found = [m for m in map(pattern.match, log_text.splitlines()) if m]
    assert found, "the launcher printed no resume command"
    return found[-1].group(1), shlex.split(found[-1].group(2))


def launcher_argv(model: Path, run_dir: Path, *overrides: str, config: Path = TINY_CONFIG) -> list[str]:
    """``python -m recipe.atropos.launch_atropos_verl_services`` on ``config`` with ``model`` in ``run_dir``."""
    return [
        sys.executable,
        "-m",
        "recipe.atropos.launch_atropos_verl_services",
        "--config",
        str(config),
        f"actor_rollout_ref.model.path={model}",
        f"atropos.launcher.run_dir={run_dir}",
        *overrides,
    ]


def trainer_argv(model: Path, run_dir: Path, *overrides: str, config_name: str = "atropos_grpo_tiny") -> list[str]:
    """``python -m recipe.atropos.main_atropos`` (the trainer alone); metrics, checkpoints, Hydra dir in run_dir."""
    return [
        sys.executable,
        "-m",
        "recipe.atropos.main_atropos",
        "--config-path",
        str(CONFIG_DIR),
        "--config-name",
        config_name,
        f"actor_rollout_ref.model.path={model}",
        f"atropos.metrics_file={RunDir(run_dir).metrics_file}",
        f"trainer.default_local_dir={RunDir(run_dir).checkpoints}",
        f"hydra.run.dir={RunDir(run_dir).hydra}",
        *overrides,
    ]


def offline_trainer_argv(model: Path, run_dir: Path, data: Path, steps: int, *overrides: str) -> list[str]:
    """:func:`trainer_argv` training ``steps`` steps on saved groups (``atropos.source=jsonl``, the JSONL ``data``);
    no API: ``atropos.api_url`` points where nothing listens, so any API call would fail the run."""
    return trainer_argv(
        model,
        run_dir,
        "atropos.source=jsonl",
        f"atropos.jsonl_paths=[{data}]",
        "atropos.api_url=http://127.0.0.1:9",
        f"trainer.total_training_steps={steps}",
        *overrides,
    )


# ---- the one wait loop ------------------------------------------------------------------------------------------
class Pollable(Protocol):
    def poll(self) -> int | None: ...


def wait_until(
    ready: Callable[[], bool],
    timeout: float,
    what: str,
    proc: Pollable | None = None,
    log: Path | None = None,
    interval: float = 0.5,
) -> None:
    """Poll ``ready()`` until true. ``proc`` (a ``ManagedProcess`` or ``Popen``) exiting first, or ``timeout`` s
    passing, fails the test (AssertionError) with the tail of ``log`` (default: ``proc.log_path``)."""
    if log is None:
        log = getattr(proc, "log_path", None)

    def ready_while_running() -> bool:
        if ready():
            return True
        code = None if proc is None else proc.poll()
        if code is not None:
            raise AssertionError(f"exited with code {code} before {what}:\n{tail(log, 80) if log else ''}")
        return False

    if not poll_until(ready_while_running, timeout, interval):
        raise AssertionError(f"timeout after {timeout:.0f} s waiting for {what}:\n{tail(log, 80) if log else ''}")


def wait_exit(proc: ManagedProcess, timeout: float) -> int:
    """The exit code of ``proc``; after ``timeout`` s, AssertionError with its log tail."""
    wait_until(lambda: proc.poll() is not None, timeout, f"{proc.name} to exit", log=proc.log_path)
    return int(proc.poll())


def run_at_once(
    commands: dict[str, list[str]], timeout: float, envs: dict[str, dict[str, str]] | None = None
) -> dict[str, subprocess.CompletedProcess]:
    """Each command to its end, all started at once, with its exit code and output (text), by name; ``envs``: a name's
    variables on top of this process's. For commands that spend their time starting (imports, a tokenizer): on 2 cores
    two take about the time of one. A command still running after ``timeout`` s is killed (TimeoutExpired)."""
    procs = {
        name: subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(envs or {}).get(name, {})},
        )
        for name, argv in commands.items()
    }
    deadline = time.monotonic() + timeout
    done = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=max(deadline - time.monotonic(), 0.1))
            done[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done


def http_ok(url: str) -> Callable[[], bool]:
    """A ``wait_until`` predicate: ``GET url`` answers with a status below 500."""

    def answers() -> bool:
        try:
            return requests.get(url, timeout=2).status_code < 500
        except requests.RequestException:
            return False

    return answers


# ---- a run-api process -----------------------------------------------------------------------------------------
@dataclass
class RunApi:
    """A running `run-api` child process; `stop()`/`start()` simulate the API going down and coming back."""

    port: int
    log_dir: Path
    proc: ManagedProcess | None = None
    # Serve the guarded API (recipe.atropos.guard.app) with these options instead of plain `run-api`.
    guard: dict | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> RunApi:
        argv = run_api_argv(self.port) if self.guard is None else guard_argv(self.port, GuardSettings(**self.guard))
        self.proc = ManagedProcess("run-api", argv, self.log_dir / "run_api.log").start()
        FIXTURE_PIDS.add(self.proc.popen.pid)  # a fixture's API outlives the test that restarted it
        wait_until(http_ok(f"{self.url}/status"), 60, "run-api to answer", proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


# ---- the launcher as a test runs it -----------------------------------------------------------------------------
@dataclass
class Launch:
    """One ``launch_atropos_verl_services`` process started by the ``launch`` fixture (stopped by it)."""

    proc: ManagedProcess
    run_dir: Path

    @property
    def log(self) -> Path:
        return self.proc.log_path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """``wait_until`` for this launcher: its exit (or a timeout) fails the test with its log tail."""
        wait_until(ready, timeout, what, proc=self.proc)

    def wait_exit(self, timeout: float) -> int:
        return wait_exit(self.proc, timeout)

    def send_signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def child(self, needle: str) -> psutil.Process:
        """The launcher's descendant whose command line holds ``needle``."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if any(needle in part for part in child.cmdline()):
                    return child
            except psutil.NoSuchProcess:
                continue
        raise AssertionError(f"no child process of the launcher running {needle}")

    def stop(self, grace_s: float = 60.0, kill_after_s: float = 10.0) -> None:
        """SIGTERM (the launcher stops its services); after ``grace_s``, the whole process tree of what still runs
        (SIGTERM, SIGKILL after ``kill_after_s``)."""
        popen = self.proc.popen
        if popen is None or popen.poll() is not None:
            return
        popen.send_signal(signal.SIGTERM)
        try:
            popen.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            stop_process_tree(popen.pid, timeout=kill_after_s)
            popen.wait(timeout=30)


@contextmanager
def launcher_factory(model: Path, tmp_dir: Path) -> Iterator[Callable[..., Launch]]:
    """``start(*overrides, run_dir=tmp_dir/"run", config=TINY_CONFIG, log=tmp_dir/"launcher.log")`` starts a launcher
    on ``model`` and returns its :class:`Launch`; on leaving, every launcher started is stopped (:meth:`Launch.stop`).
    The same ``run_dir`` again resumes that run (the log is appended to). ``argv``: this exact command instead (the
    resume command a launcher printed, :func:`printed_resume_command`), in ``run_dir``."""
    launches: list[Launch] = []

    def start(
        *overrides: str,
        run_dir: Path | None = None,
        config: Path = TINY_CONFIG,
        log: Path | None = None,
        argv: list[str] | None = None,
    ) -> Launch:
        run_dir = run_dir or tmp_dir / "run"
        argv = argv or launcher_argv(model, run_dir, *overrides, config=config)
        proc = ManagedProcess("launcher", argv, log or tmp_dir / "launcher.log").start()
        launches.append(Launch(proc, run_dir))
        return launches[-1]

    try:
        yield start
    finally:
        for run in reversed(launches):
            run.stop()


# ---- processes left behind --------------------------------------------------------------------------------------
def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def tagged(tag: str) -> list[psutil.Process]:
    """Processes (of any parent) whose environment holds ``TEST_TAG_VAR=tag``: started by the test that set it."""
    out = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(TEST_TAG_VAR) == tag:
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def left_behind(before: set[int], grace_s: float = 30.0, tag: str | None = None, kill: bool = False) -> list[list[str]]:
    """Command lines of the processes still alive after ``grace_s`` (zombies ignored) among this process's
    descendants not in ``before`` and, with ``tag``, the processes carrying it (except ``before`` and theirs).
    ``kill``: stop those found (whole trees), so a failed test does not leave them to the next one."""

    def excluded() -> set[int]:
        out = set(before)
        for pid in before:
            try:
                out |= {c.pid for c in psutil.Process(pid).children(recursive=True)}
            except psutil.NoSuchProcess:
                continue
        return out

    def alive() -> list[psutil.Process]:
        skip = excluded()
        candidates = {p.pid: p for p in psutil.Process().children(recursive=True)}
        if tag is not None:
            candidates.update({p.pid: p for p in tagged(tag)})
        out = []
        for pid, p in candidates.items():
            try:
                if pid not in skip and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    left: list[psutil.Process] = []

    def none_left() -> bool:
        left[:] = alive()
        return not left

    poll_until(none_left, grace_s, 1.0)
    names = []
    for p in left:
        try:
            names.append(p.cmdline())
        except psutil.NoSuchProcess:
            continue
    if kill:
        for p in left:
            stop_process_tree(p.pid)
    return names


@contextmanager
def no_processes_left(grace_s: float = 30.0) -> Iterator[list[ManagedProcess]]:
    """Processes started inside (append ManagedProcess objects to have them stopped, whole trees, on leaving); on
    leaving, no process started inside may remain (Ray, vLLM workers, envs included): AssertionError naming them, after
    stopping them. Ones that existed before, and FIXTURE_PIDS with their children, are ignored. What was started is
    found as this process's descendants and by ``TEST_TAG_VAR``, set to a fresh token in ``os.environ`` inside (every
    process started inherits it), so processes re-parented to init when their parent died are found too."""
    tag = uuid.uuid4().hex
    previous = os.environ.get(TEST_TAG_VAR)
    os.environ[TEST_TAG_VAR] = tag
    before = descendants()
    started: list[ManagedProcess] = []
    try:
        yield started
    finally:
        if previous is None:
            os.environ.pop(TEST_TAG_VAR, None)
        else:
            os.environ[TEST_TAG_VAR] = previous
        for proc in reversed(started):
            proc.stop()
        left = left_behind(before | FIXTURE_PIDS, grace_s, tag=tag, kill=True)
    assert not left, f"processes left behind: {left}"


def checkpoint_state(run_dir: Path, step: int) -> dict:
    """The actor's weights in a run's checkpoint of ``step`` (rank 0 of one), FSDP DTensors made whole."""
    import torch  # only the tests that read checkpoints pay for it

    path = RunDir(run_dir).checkpoints / f"global_step_{step}" / "actor" / "model_world_size_1_rank_0.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}


def host_address() -> str:
    """A non-loopback IPv4 address of this machine: a request to it arrives from it, i.e. from outside loopback
    (the test is skipped where there is none)."""
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    pytest.skip("this machine has no non-loopback IPv4 address to test a refused client with")


def save_with_atroposlib(model: Path, path: Path, groups: list[dict]) -> None:
    """Write ``groups`` (all of one size) to the JSONL ``path`` with atroposlib's own writer:
    ``BaseEnv.handle_send_to_api`` of the bundled env with ``data_path_to_save_groups`` (what an env's ``process``
    command does), sending nothing."""
    import asyncio

    from recipe.atropos.envs.one_word_env import OneWordEnv

    env_config, servers = OneWordEnv.config_init()
    size = len(groups[0]["tokens"])
    env_config = env_config.model_copy(
        update={"tokenizer_name": str(model), "group_size": size, "data_path_to_save_groups": str(path)}
    )
    env = OneWordEnv(env_config, servers, slurm=False, testing=True)
    asyncio.run(env.handle_send_to_api(groups, do_send_to_api=False, abort_on_any_max_length_exceeded=False))
    env.jsonl_writer.close()


def teacher_fields(teacher: Path, tokens: list[list[int]], top_k: int) -> dict[str, list]:
    """``distill_token_ids`` / ``distill_logprobs`` of a group's ``tokens`` from the model ``teacher``, built as the
    teacher endpoint answers ``prompt_logprobs`` (its hf_cpu generator and its vLLM-shaped reply) and as the env mixin
    turns that answer into the schema's rows (``envs.distill.teacher_rows``)."""
    from recipe.atropos.cpu.hf_cpu import HFGenerator
    from recipe.atropos.endpoint.backends import from_verl_prompt_logprobs
    from recipe.atropos.envs.distill import teacher_rows

    generator = HFGenerator(str(teacher), response_length=8, num_threads=1)
    rows = []
    for seq in tokens:
        raw = generator.prompt_logprobs(seq, max(top_k, 1))
        answer = from_verl_prompt_logprobs(
            seq, raw["prompt_ids"], raw["prompt_logprobs"], raw["prompt_token_logprobs"], max(top_k, 1)
        )
        ids = [list(e) if e else [] for e in answer]
        lps = [list(e.values()) if e else [] for e in answer]
        rows.append(teacher_rows(seq, ids, lps, top_k))
    return {"distill_token_ids": [ids for ids, _ in rows], "distill_logprobs": [lps for _, lps in rows]}
