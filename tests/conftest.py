"""Shared fixtures: a real Atropos `run-api` process on 127.0.0.1 (fresh per test module), a tiny local model, the
launcher as a test runs it (`launch`), and the check that a test leaves no process behind (`no_leftovers`).

Tiers are directories: every test under tests/unit, tests/integration, tests/e2e gets that marker here
(`pytest -m unit` = `pytest tests/unit`); a test file anywhere else is refused at collection. The time each tier
took is printed at the end of the run."""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from recipe.atropos.launcher.processes import ManagedProcess, free_port
from recipe.atropos.setup.assets import build_tiny_model
from tests.helpers import Launch, RunApi, launcher_factory, no_processes_left

# Offline, quiet, deterministic defaults for every test process.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


TIERS = ("unit", "integration", "e2e")
TESTS_DIR = Path(__file__).resolve().parent


def tier_of(path: Path) -> str | None:
    """``unit`` / ``integration`` / ``e2e`` for a file under that directory of tests/, ``""`` for another file under
    tests/, None outside tests/."""
    try:
        top = Path(path).resolve().relative_to(TESTS_DIR).parts[0]
    except ValueError:
        return None
    return top if top in TIERS else ""


_tier_of_test: dict[str, str] = {}
_started = pytest.StashKey[float]()
_tier_seconds: dict[str, float] = defaultdict(float)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test by its directory. A test file under tests/ outside the three tiers is an error; a test marked
    for another tier than its directory's gets a warning (the directory decides what `make test-fast` runs)."""
    misplaced = set()
    for item in items:
        tier = tier_of(item.path)
        if tier is None:
            continue
        if not tier:
            misplaced.add(str(item.path))
            continue
        others = sorted({m.name for m in item.iter_markers() if m.name in TIERS and m.name != tier})
        if others:
            item.warn(pytest.PytestWarning(f"marked {', '.join(others)} but in tests/{tier}: move it or drop the mark"))
        item.add_marker(getattr(pytest.mark, tier))
        _tier_of_test[item.nodeid] = tier
    if misplaced:
        raise pytest.UsageError(f"test files must be under tests/{{{','.join(TIERS)}}}/: {sorted(misplaced)}")
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: the longest modules first, the short ones fill in
        items.sort(key=_slowest_first)


# End-to-end modules by their time on the 2-core box (slowest first; `make test`'s --durations list): under
# pytest-xdist (--dist loadfile hands whole modules to workers in collection order) the long ones start at once and
# the many short ones balance the workers at the end. A module missing here comes after these, before integration.
SLOW_FIRST = (
    "test_faults_e2e.py",
    "test_lora_e2e.py",
    "test_env_patterns_e2e.py",
    "test_e2e_offline.py",
    "test_e2e_trainer.py",
    "test_e2e_online.py",
    "test_verl_grpo_cpu.py",
    "test_console_e2e.py",
    "test_extension_e2e.py",
)


def _slowest_first(item: pytest.Item) -> tuple[int, int]:
    tier = _tier_of_test.get(item.nodeid, "")
    if tier != "e2e":
        return (len(SLOW_FIRST) + 1 + (tier == "unit"), 0)  # integration, then unit; sort() keeps their order
    name = item.path.name
    return (SLOW_FIRST.index(name) if name in SLOW_FIRST else len(SLOW_FIRST), 0)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add the test's setup + call + teardown seconds to its tier (module fixtures count where first used). Under
    pytest-xdist the controller collects nothing and gets the workers' reports: the tier comes from the node id's
    path (relative to the rootdir, i.e. the repository)."""
    tier = _tier_of_test.get(report.nodeid) or tier_of(TESTS_DIR.parent / report.nodeid.split("::")[0])
    if tier:
        _tier_seconds[tier] += report.duration


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_started] = time.monotonic()


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:  # noqa: ANN001
    if _tier_seconds:
        times = ", ".join(f"{t} {_tier_seconds[t]:.1f} s" for t in TIERS if t in _tier_seconds)
        wall = time.monotonic() - config.stash.get(_started, time.monotonic())
        workers = getattr(config.option, "numprocesses", None)
        where = f" over {workers} pytest-xdist workers" if workers else ""
        terminalreporter.write_line(f"time per tier (test seconds, summed): {times}; wall {wall:.0f} s{where}")


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


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer Llama with a byte-level ChatML tokenizer, built locally (no download), once per session: the
    same seed builds the same model, and no test writes into it."""
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model (seed 1, the same tokenizer): a teacher for distillation whose KL to ``tiny_model`` is not
    zero."""
    return build_tiny_model(tmp_path_factory.mktemp("teacher") / "tiny", seed=1)


@pytest.fixture()
def no_leftovers() -> Iterator[list[ManagedProcess]]:
    """Processes the test starts (append them here to have them stopped, whole trees, at the end); afterwards no
    process the test started may remain (Ray, vLLM workers, envs included), see ``helpers.no_processes_left``: ones
    that existed before, and fixtures' processes (FIXTURE_PIDS) with their children, are ignored; processes
    re-parented to init are found too; any found are stopped and the test fails."""
    with no_processes_left() as started:
        yield started


@pytest.fixture()
def launch(tmp_path: Path, tiny_model: Path, no_leftovers: list[ManagedProcess]) -> Iterator[Callable[..., Launch]]:
    """Starts ``python -m recipe.atropos.launch_atropos_verl_services`` on the tiny model (``helpers.launcher_argv``):
    ``launch(*overrides, run_dir=tmp_path/"run", config=TINY_CONFIG, log=tmp_path/"launcher.log")`` returns a started
    :class:`~tests.helpers.Launch` (``wait_for``, ``wait_exit``, ``child``, ``send_signal``, ``log_text``). Called
    again with the same ``run_dir`` it resumes that run. At teardown each launcher still running gets SIGTERM (it
    stops its services), then its process tree is stopped; then ``no_leftovers`` fails the test if any process it
    started remains. For one run shared by a module's tests: ``helpers.no_processes_left`` and
    ``helpers.launcher_factory`` in a module-scoped fixture."""
    with launcher_factory(tiny_model, tmp_path) as start:
        yield start
