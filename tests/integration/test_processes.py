"""Children started with ``die_with_parent`` do not outlive a SIGKILLed parent (the launcher's services); without it
they do (the test can fail)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from recipe.atropos.launcher.processes import ManagedProcess, stop_process_tree
from tests.helpers import wait_until

PARENT = """
import sys, time
from pathlib import Path
from recipe.atropos.launcher.processes import ManagedProcess
child = ManagedProcess("sleeper", [sys.executable, "-c", "import time; time.sleep(120)"], Path(sys.argv[1]),
                       die_with_parent=sys.argv[2] == "1").start()
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("die_with_parent", [True, False])
def test_a_sigkilled_parent_takes_its_children_along(tmp_path: Path, die_with_parent: bool) -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(tmp_path / "child.log"), "1" if die_with_parent else "0"],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    child = psutil.Process(int(parent.stdout.readline()))
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)

        def gone() -> bool:
            try:
                return child.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        if die_with_parent:
            wait_until(gone, 10, "the child to die with its parent", interval=0.05)
        else:
            assert not gone()  # re-parented, still running: what the launcher's children must not do
    finally:
        if child.is_running():
            stop_process_tree(child.pid, timeout=5)


def test_die_with_parent_is_off_by_default() -> None:
    assert ManagedProcess("x", ["true"], Path("x.log")).die_with_parent is False
