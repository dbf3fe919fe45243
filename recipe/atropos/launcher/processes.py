"""Child processes we start, and only those: start with a log file, wait for health, stop the whole tree.

Used by the launcher and by the tests. Every child gets its own session (process group) so a stop reaches its
grandchildren (Ray workers, uvicorn), and the stop walks the psutil process tree of *our* PID — never a
name-based kill. A child started with ``die_with_parent`` gets SIGKILL from the kernel when the thread that started it
dies, even by SIGKILL (Linux ``PR_SET_PDEATHSIG``). Ray's own processes follow the trainer that started them only
slowly (its agents notice a dead raylet after up to a minute), so the launcher also starts a watchdog
(:func:`start_watchdog`, ``python -m recipe.atropos.launcher.processes --watch PID``): it records the launcher's
descendants every second and, once the launcher is gone, SIGKILLs every one of them still alive (same PID *and* start
time, so a reused PID is never hit).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import requests

from recipe.atropos.polling import poll_until

logger = logging.getLogger(__name__)

# Stop signals (SIGINT, SIGTERM) this process received. Its handler raises KeyboardInterrupt, but CPython drops an
# exception raised while os.fork runs its at-fork hooks ("Exception ignored in: <function _releaseLock>"), so a Ctrl-C
# that lands while a child is being started would be lost and the run would go on; the record raises it again.
_STOP_SIGNALS: list[int] = []


def _stop(signum: int, frame: object) -> None:
    _STOP_SIGNALS.append(signum)
    raise KeyboardInterrupt(f"signal {signum}")


def install_stop_signals() -> None:
    """Ctrl-C and SIGTERM raise KeyboardInterrupt, also where SIGINT was inherited as ignored (a shell's background
    job: Python keeps an inherited SIG_IGN), and are remembered for :func:`raise_if_stopped`."""
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)


def raise_if_stopped() -> None:
    """KeyboardInterrupt if a stop signal has arrived (its first raise may have been dropped while forking)."""
    if _STOP_SIGNALS:
        raise KeyboardInterrupt(f"signal {_STOP_SIGNALS[0]}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def stop_process_tree(pid: int, timeout: float = 10.0) -> list[int]:
    """SIGTERM ``pid`` and every descendant, SIGKILL what is still alive after ``timeout`` s.

    Returns the PIDs that were signalled. Descendants are collected *before* the parent is signalled, so
    children re-parented to init on the parent's exit are still stopped.
    """
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return []
    procs = [root, *root.children(recursive=True)]
    for proc in procs:
        try:
            proc.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=timeout)
    return [p.pid for p in procs]


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent_pid: int) -> Callable[[], None]:
    """A ``preexec_fn``: SIGKILL this child when its parent dies; if the parent is gone already, now."""

    def preexec() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
        if os.getppid() != parent_pid:  # the parent died before the flag was set
            os.kill(os.getpid(), signal.SIGKILL)

    return preexec


def tail(path: Path, n_lines: int = 40) -> str:
    """The last ``n_lines`` of a text file ('' when it does not exist)."""
    try:
        with open(path, errors="replace") as fh:
            return "".join(fh.readlines()[-n_lines:])
    except FileNotFoundError:
        return ""


@dataclass
class ManagedProcess:
    """A named child process writing stdout+stderr to ``log_path``."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    die_with_parent: bool = False  # Linux: SIGKILL from the kernel when the starting thread dies (module docstring)
    popen: subprocess.Popen | None = field(default=None, init=False)

    def start(self) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        env = {**os.environ, **(self.env or {})}
        self.popen = subprocess.Popen(
            list(self.argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_die_with_parent(os.getpid()) if self.die_with_parent else None,  # noqa: PLW1509
        )
        log.close()
        logger.info("started %s (pid %d), log: %s", self.name, self.popen.pid, self.log_path)
        return self

    @property
    def pid(self) -> int:
        if self.popen is None:
            raise RuntimeError(f"{self.name} was never started")
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit code, or None while it runs."""
        return None if self.popen is None else self.popen.poll()

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready()`` until true; raise with the log tail if the process dies or ``timeout`` passes."""

        def ready_while_alive() -> bool:
            if self.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with code {self.poll()} before {what}. Last lines of {self.log_path}:\n"
                    f"{tail(self.log_path)}"
                )
            return bool(ready())

        if poll_until(ready_while_alive, timeout, 0.25):
            return
        raise TimeoutError(
            f"{self.name} not ready after {timeout:.0f} s ({what}). Last lines of {self.log_path}:\n"
            f"{tail(self.log_path)}"
        )

    def wait_http(self, url: str, timeout: float) -> None:
        """Wait until ``GET url`` answers with a status below 500."""

        def answers() -> bool:
            try:
                return requests.get(url, timeout=2).status_code < 500
            except requests.RequestException:
                return False

        self.wait_until(answers, timeout, f"{url} answered")

    def stop(self, timeout: float = 10.0) -> None:
        """Stop this process and every descendant (idempotent)."""
        if self.popen is None:
            return
        stop_process_tree(self.popen.pid, timeout=timeout)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.error("%s (pid %d) did not exit after SIGKILL", self.name, self.popen.pid)


def watch(parent_pid: int, interval_s: float = 1.0) -> list[int]:
    """Until ``parent_pid`` exits: record its descendants; then SIGKILL those still alive. Returns their PIDs."""
    me, known = os.getpid(), {}

    def parent_gone() -> bool:  # and meanwhile, the descendants it has now
        try:
            parent = psutil.Process(parent_pid)
            if parent.status() == psutil.STATUS_ZOMBIE:
                return True
            before = len(known)
            for child in parent.children(recursive=True):
                if child.pid != me:
                    known[child.pid] = child.create_time()
            if len(known) != before:
                print(f"watchdog: {len(known)} descendants of {parent_pid} seen", flush=True)
        except psutil.NoSuchProcess:
            return True
        return False

    poll_until(parent_gone, None, interval_s)
    left: dict[int, psutil.Process] = {}
    for pid, created in known.items():
        try:
            proc = psutil.Process(pid)
            if proc.create_time() == created:
                left.update({p.pid: p for p in [proc, *proc.children(recursive=True)]})
        except psutil.NoSuchProcess:
            continue
    for proc in left.values():
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return sorted(left)


def start_watchdog(log_path: Path) -> ManagedProcess:
    """The watchdog of this process (see the module docstring); it exits by itself after this process does."""
    import sys

    argv = [sys.executable, "-m", "recipe.atropos.launcher.processes", "--watch", str(os.getpid())]
    return ManagedProcess("watchdog", argv, log_path).start()


def run_api_argv(port: int, host: str = "127.0.0.1") -> list[str]:
    """The command line of Atropos' trajectory API server (console script of atroposlib)."""
    exe = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "run-api"
    if not exe.exists():
        import sys

        exe = Path(sys.executable).parent / "run-api"
    return [str(exe), "--host", host, "--port", str(port)]


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="SIGKILL what PID leaves behind when it exits")
    parser.add_argument("--watch", type=int, required=True, help="the PID to watch (the launcher)")
    killed = watch(parser.parse_args().watch)
    if killed:
        print(f"watchdog: SIGKILLed {len(killed)} processes the watched process left: {killed}", flush=True)
