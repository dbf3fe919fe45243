"""The test helpers that can fail a test: the one wait loop and the check for processes left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from recipe.atropos.launcher.processes import ManagedProcess
from tests.helpers import TEST_TAG_VAR, Launch, no_processes_left, wait_exit, wait_until


def test_wait_until_returns_when_ready_and_fails_on_timeout() -> None:
    calls = []
    wait_until(lambda: calls.append(1) or len(calls) == 3, 10, "three polls", interval=0.01)
    assert len(calls) == 3
    with pytest.raises(AssertionError, match="timeout after 0 s waiting for never"):
        wait_until(lambda: False, 0.05, "never", interval=0.01)


def test_wait_until_fails_with_the_log_tail_when_the_process_exits_first(tmp_path: Path) -> None:
    proc = ManagedProcess("dies", [sys.executable, "-c", "print('last words'); raise SystemExit(3)"], tmp_path / "l")
    proc.start()
    with pytest.raises(AssertionError, match=r"exited with code 3 before the step(.|\n)*last words"):
        wait_until(lambda: False, 60, "the step", proc=proc, interval=0.05)
    assert wait_exit(proc, 10) == 3


def test_an_orphaned_process_is_found_named_and_stopped(tmp_path: Path) -> None:
    """A process whose parent exited (re-parented to init, no longer our descendant) is found by the tag."""
    marker = f"sleep {321 + os.getpid() % 1000}"
    with pytest.raises(AssertionError, match="processes left behind") as failure:
        with no_processes_left(grace_s=1.0):
            subprocess.run(["sh", "-c", f"exec {marker} >/dev/null 2>&1 &"], check=True)
    assert str(marker.split()) in str(failure.value)  # named by its command line
    alive = [p for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == marker.split()]
    assert not alive, "the leftover was not stopped"
    assert TEST_TAG_VAR not in os.environ  # the tag is only set inside


def test_processes_stopped_in_time_are_not_leftovers(tmp_path: Path) -> None:
    with no_processes_left(grace_s=1.0) as started:
        argv = [sys.executable, "-c", "import time; time.sleep(60)"]
        started.append(ManagedProcess("sleeper", argv, tmp_path / "s.log").start())  # stopped on leaving
        done = ManagedProcess("quick", [sys.executable, "-c", "pass"], tmp_path / "q.log").start()
        assert wait_exit(done, 30) == 0


def dead(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


GRACEFUL = """
import signal, sys, time
def stop(*_):
    open(sys.argv[1], "w").write("stopped its services")
    sys.exit(130)
signal.signal(signal.SIGTERM, stop)
print("ready", flush=True)
time.sleep(60)
"""
STUBBORN = """
import signal, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"
subprocess.Popen([sys.executable, "-c", child])
print("ready", flush=True)
time.sleep(60)
"""


def test_launch_stop_sends_sigterm_then_stops_the_tree_of_a_launcher_that_ignores_it(tmp_path: Path) -> None:
    with no_processes_left(grace_s=1.0):
        note = tmp_path / "note"
        graceful = ManagedProcess("launcher", [sys.executable, "-c", GRACEFUL, str(note)], tmp_path / "g.log").start()
        run = Launch(graceful, tmp_path)
        run.wait_for(lambda: "ready" in run.log_text(), 30, "ready")
        run.stop(grace_s=30)
        assert graceful.poll() == 130 and note.read_text() == "stopped its services"  # SIGTERM first

        stubborn = ManagedProcess("launcher", [sys.executable, "-c", STUBBORN], tmp_path / "s.log").start()
        run = Launch(stubborn, tmp_path)
        run.wait_for(lambda: "ready" in run.log_text(), 30, "ready")
        child = run.child("signal.SIG_IGN")
        run.stop(grace_s=0.5, kill_after_s=0.5)  # ignored: the whole tree is stopped (SIGKILL after 0.5 s)
        assert stubborn.poll() is not None  # (its code reads 0: psutil reaped it before Popen could)
        assert dead(child)  # re-parented, killed (a zombie until init reaps it)
