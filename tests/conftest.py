"""Shared fixtures: a real Atropos `run-api` process on 127.0.0.1 (fresh per test module), a tiny local model, and
the check that a test leaves no process behind."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from recipe.atropos.guard.app import guard_argv
from recipe.atropos.launcher.processes import ManagedProcess, free_port, run_api_argv
from recipe.atropos.runtime.assets import build_tiny_model
from tests.helpers import descendants, left_behind

# Offline, quiet, deterministic defaults for every test process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# Processes owned by fixtures that outlive a test (the module's run-api, restarted by some tests): not leftovers.
FIXTURE_PIDS: set[int] = set()


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
        argv = run_api_argv(self.port) if self.guard is None else guard_argv(self.port, **self.guard)
        self.proc = ManagedProcess("run-api", argv, self.log_dir / "run_api.log").start()
        FIXTURE_PIDS.add(self.proc.popen.pid)  # a fixture's API outlives the test that restarted it
        self.proc.wait_http(f"{self.url}/status", timeout=60)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None


@pytest.fixture()
def make_run_api(tmp_path: Path) -> Iterator[Callable[[], RunApi]]:
    """Factory for extra `run-api` processes (not started); each is stopped at the end of the test."""
    made: list[RunApi] = []

    def make(guard: dict | None = None) -> RunApi:
        api = RunApi(port=free_port(), log_dir=tmp_path / f"run_api_{len(made)}", guard=guard)
        made.append(api)
        return api

    yield make
    for api in made:
        api.stop()


@pytest.fixture(scope="module")
def run_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunApi]:
    """A fresh `run-api` per test module (its state is in memory and cannot be fully reset)."""
    api = RunApi(port=free_port(), log_dir=tmp_path_factory.mktemp("run_api")).start()
    try:
        yield api
    finally:
        api.stop()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with a byte-level ChatML tokenizer, built locally (no download), once per module."""
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture()
def no_leftovers() -> Iterator[list[ManagedProcess]]:
    """Processes the test starts (append them here to have them stopped, whole trees, at the end); afterwards no
    process the test started may remain (Ray, vLLM workers, envs included) — ones that existed before are ignored."""
    before = descendants()
    started: list[ManagedProcess] = []
    yield started
    for proc in reversed(started):
        proc.stop()
    left = left_behind(before | FIXTURE_PIDS)
    assert not left, f"processes left behind: {left}"
