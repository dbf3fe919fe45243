"""Helpers shared by the end-to-end tests: the launcher's command line, waiting for an exit, processes left behind."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil

from recipe.atropos.launcher.processes import ManagedProcess, tail

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipe" / "atropos" / "config"
TINY_CONFIG = CONFIG_DIR / "atropos_grpo_tiny.yaml"


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
        f"atropos.metrics_file={run_dir / 'metrics.jsonl'}",
        f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        f"hydra.run.dir={run_dir / 'hydra'}",
        *overrides,
    ]


def wait_exit(proc: ManagedProcess, timeout: float) -> int:
    """The exit code of ``proc``; after ``timeout`` s, TimeoutError with its log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return int(proc.poll())
        time.sleep(1)
    raise TimeoutError(f"{proc.name} still running after {timeout} s:\n{tail(proc.log_path, 60)}")


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen, log: Path) -> None:
    """Until ``predicate()``; a launcher that exits first, or a timeout (the launcher is then stopped with SIGTERM, so
    it stops its services), fails the test with the log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"launcher exited ({proc.poll()}) before {what}:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
    proc.terminate()
    proc.wait(60)
    raise AssertionError(f"timeout waiting for {what}:\n{log.read_text()[-4000:]}")


def descendants() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


def left_behind(before: set[int], grace_s: float = 30.0) -> list[list[str]]:
    """Command lines of this process's descendants not in ``before`` still alive after ``grace_s`` (zombies ignored)."""
    deadline = time.monotonic() + grace_s

    def alive() -> list[psutil.Process]:
        out = []
        for p in psutil.Process().children(recursive=True):
            try:
                if p.pid not in before and p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
            except psutil.NoSuchProcess:
                continue
        return out

    left = alive()
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = alive()
    names = []
    for p in left:
        try:
            names.append(p.cmdline())
        except psutil.NoSuchProcess:
            continue
    return names
