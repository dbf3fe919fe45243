"""The launcher with real processes: composition without importing verl (a fresh interpreter), supervision of a
dying environment, and a trainer that cannot start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from recipe.atropos.launcher.config import LaunchError
from recipe.atropos.launcher.processes import ManagedProcess
from recipe.atropos.launcher.supervisor import Launcher
from recipe.atropos.rundir import RunDir
from tests.factories import CONFIG_DIR, TINY_CONFIG
from tests.helpers import http_ok, run_at_once, wait_until

# `pkg://verl.trainer.config` is read as its directory: same config as Hydra's pkg:// path, verl not imported.
COMPOSE = f"""
import sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from recipe.atropos.launcher.config import load_config
fast = load_config({str(CONFIG_DIR / "atropos_grpo_cpu_demo.yaml")!r}, ["data.train_batch_size=16"])
assert "verl" not in sys.modules and "torch" not in sys.modules, "composition imported verl"
with initialize_config_dir(config_dir={str(CONFIG_DIR)!r}, version_base=None):
    slow = compose(config_name="atropos_grpo_cpu_demo", overrides=["data.train_batch_size=16"])
assert OmegaConf.to_container(fast) == OmegaConf.to_container(slow)
print(fast.data.train_batch_size)
"""


@pytest.fixture(scope="module")
def fresh_interpreters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """The two checks below that need an interpreter of their own, run at once: the launcher's composition
    (``compose``) and the trainer started without trainer.total_training_steps (``trainer``)."""
    trainer = [sys.executable, "-m", "recipe.atropos.main_atropos", "actor_rollout_ref.model.path=/nowhere"]
    trainer.append(f"hydra.run.dir={tmp_path_factory.mktemp('hydra')}")
    return run_at_once({"compose": [sys.executable, "-c", COMPOSE], "trainer": trainer}, timeout=120)


def test_launcher_composes_the_trainers_config_without_importing_verl(fresh_interpreters) -> None:
    out = fresh_interpreters["compose"]
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "16"


@pytest.mark.parametrize("restart_envs", [False, True])
def test_a_dying_env_stops_the_run_naming_it(
    tiny_model: Path, tmp_path: Path, restart_envs: bool, no_leftovers
) -> None:
    """The supervision loop with the real guarded API and an env process that exits with code 3 at once; the trainer
    is a stand-in process (supervision reads only whether it still runs), since a real one adds a minute and nothing
    to what is checked. Without restarts the first exit stops the run; with them, the restarted env dies before it
    registers, which stops the run too."""
    run_dir = tmp_path / "run"
    overrides = [
        f"actor_rollout_ref.model.path={tiny_model}",
        f"atropos.launcher.run_dir={run_dir}",
        f"atropos.launcher.restart_envs={str(restart_envs).lower()}",
        "atropos.launcher.max_env_restarts=2",
    ]
    launcher = Launcher(TINY_CONFIG, overrides)
    launcher.model = str(tiny_model)
    dies = [sys.executable, "-c", "import sys; print('env failed to start'); sys.exit(3)"]
    launcher.env_argv = lambda name: dies  # type: ignore[method-assign]
    try:
        # the launcher's children (the processes supervise() watches): its guarded API, started from its command line,
        # a stand-in trainer and the dying envs
        api = ManagedProcess("run-api", launcher.api_argv(), RunDir(run_dir).log("run-api")).start()
        launcher.children["run-api"] = api
        wait_until(http_ok(f"{launcher.api_url}/status"), 60, "the API", proc=api)
        stand_in = ManagedProcess("trainer", [sys.executable, "-c", "import time; time.sleep(120)"], tmp_path / "t.log")
        launcher.children["trainer"] = stand_in.start()
        first = next(iter(launcher.envs))  # the tiny config's first env is the first one supervision looks at
        for name in launcher.envs:
            launcher.children[name] = ManagedProcess(name, dies, RunDir(run_dir).log(name)).start()
        with pytest.raises(LaunchError, match=f"{first} exited with code 3") as error:
            launcher.supervise()
        assert "env failed to start" in str(error.value)  # the log tail names the cause
        assert launcher.restarts == ({first: 1} if restart_envs else {})
    finally:
        launcher.stop_all()


def test_trainer_without_total_steps_fails_fast_naming_the_key(fresh_interpreters) -> None:
    run = fresh_interpreters["trainer"]
    assert run.returncode != 0
    assert "trainer.total_training_steps is required" in run.stderr + run.stdout
