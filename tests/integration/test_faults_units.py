"""Fault suite, unit level: re-registration after an API restart, pre-flight one-line errors, the launcher's exit
codes, and the launcher restarting a dead API on the same port. (The spool's life cycle: tests/unit/test_spool.py.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from recipe.atropos.launcher.config import load_config
from recipe.atropos.launcher.preflight import PreflightError, run_preflight, typed_config
from recipe.atropos.launcher.processes import ManagedProcess, free_port
from recipe.atropos.launcher.supervisor import Launcher
from recipe.atropos.rundir import RunDir
from recipe.atropos.schema import validate_group
from recipe.atropos.setup.assets import model_vocab_size
from recipe.atropos.transport.client import AtroposClient
from tests.factories import TINY_CONFIG, group
from tests.helpers import http_ok, launcher_argv, run_at_once, wait_until


# ---- client against a restarted API --------------------------------------------------------------------------
def test_client_registers_again_at_its_current_step_after_an_api_restart(make_run_api) -> None:
    api = make_run_api(guard={"vocab_size": 1000, "batch_size": 2}).start()
    step = {"now": 0}
    client = AtroposClient(api.url, current_step=lambda: step["now"], vocab_size=1000)
    client.register(batch_size=2, max_token_len=64, starting_step=0, num_steps=10)
    assert client.get_batch() is None
    api.stop()
    api.start()  # the same port, fresh state: "Trainer not registered"
    step["now"] = 4
    assert client.get_batch() is None
    assert client.reregistrations == 1
    assert requests.get(f"{api.url}/status", timeout=5).json()["current_step"] == 4
    requests.post(f"{api.url}/scored_data", json=group(), timeout=5).raise_for_status()
    got = client.poll_batch(timeout=10)
    assert [g.tokens for g in got] == [validate_group(group()).tokens]
    metrics = client.metrics()
    assert metrics["atropos/reregistrations"] == 1.0 and metrics["atropos/api_restarts"] == 0.0


def test_a_poll_that_cannot_form_a_batch_says_why(make_run_api) -> None:
    from recipe.atropos.transport.client import AtroposAPIError

    api = make_run_api().start()  # plain run-api: it queues a group of 5 that can never pack into 8
    client = AtroposClient(api.url)
    client.register(batch_size=8, max_token_len=64, starting_step=0, num_steps=10)
    client.get_batch()
    requests.post(f"{api.url}/scored_data", json=group(n=5), timeout=5).raise_for_status()
    with pytest.raises(AtroposAPIError, match="holds 1 queued groups but formed no batch"):
        client.poll_batch(timeout=1)
    guarded = make_run_api(guard={"vocab_size": None, "batch_size": 8}).start()
    client = AtroposClient(guarded.url)
    client.register(batch_size=8, max_token_len=64, starting_step=0, num_steps=10)
    requests.post(f"{guarded.url}/scored_data", json=group(n=4), timeout=5).raise_for_status()
    assert "fewer than a batch" in client.why_no_batch()


# ---- pre-flight --------------------------------------------------------------------------------------------
def preflight(*overrides: str) -> None:
    config = load_config(TINY_CONFIG, list(overrides))
    run_preflight(config, typed_config(config))


def test_vocab_size_comes_from_the_model_config(tiny_model: Path) -> None:
    assert model_vocab_size(str(tiny_model)) == json.loads((tiny_model / "config.json").read_text())["vocab_size"]
    assert model_vocab_size("/nowhere") is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["actor_rollout_ref.model.path=/no/such/model"], "actor_rollout_ref.model.path=/no/such/model: no such model"),
        (["atropos.inference.backend=bogus"], "atropos.inference.backend='bogus'"),
        (["trainer.total_training_steps=null"], "trainer.total_training_steps is required"),
        (["atropos.launcher.envs.0.module=no_such_env_module"], "module 'no_such_env_module' is not importable"),
        (["~atropos.launcher.envs.0.module", "+atropos.launcher.envs.0.script=/no/env.py"], "/no/env.py' does not"),
        (["atropos.launcher.max_env_restarts=-1"], "atropos.launcher.max_api_restarts / max_env_restarts must be >= 0"),
        (["+atropos.launcher.no_such_key=1"], "atropos.launcher.no_such_key"),
    ],
)
def test_preflight_names_the_key_and_the_fix_in_one_line(tiny_model, overrides, message) -> None:
    with pytest.raises(PreflightError) as info:
        preflight(f"actor_rollout_ref.model.path={tiny_model}", *overrides)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_preflight_refuses_a_port_in_use(tiny_model: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(PreflightError, match=f"atropos.launcher.api_port={port}: the port is in use"):
            preflight(f"actor_rollout_ref.model.path={tiny_model}", f"atropos.launcher.api_port={port}")


def launcher_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "recipe.atropos.launch_atropos_verl_services", "--config", str(TINY_CONFIG), *args]


@pytest.fixture(scope="module")
def launcher_runs(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess]:
    """The launcher on each command line below, run at once (each spends its time importing and checking its
    config), for the tests that read its exit code and output: a model that is not there (run dir ``no_model``), an
    unknown key Hydra refuses, an unknown key the typed config refuses, a run dir whose checkpoint is at the last
    step (``finished``)."""
    tmp = tmp_path_factory.mktemp("launcher_runs")
    checkpoints = RunDir(tmp / "finished").checkpoints
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest_checkpointed_iteration.txt").write_text("3")
    commands = {
        "no_model": ["actor_rollout_ref.model.path=/no/such/model", f"atropos.launcher.run_dir={tmp / 'no_model'}"],
        "unknown_key": ["atropos.no_such_key=1"],  # Hydra refuses it while composing
        "unknown_launcher_key": ["+atropos.launcher.no_such_key=1"],  # composes; the typed config refuses it
        "finished": [f"actor_rollout_ref.model.path={tiny_model}", f"atropos.launcher.run_dir={tmp / 'finished'}"],
    }
    return run_at_once({name: launcher_command(*args) for name, args in commands.items()}, timeout=240)


def test_launcher_start_up_failure_is_one_line_exit_2_before_any_service(launcher_runs) -> None:
    run = launcher_runs["no_model"]
    assert run.returncode == 2
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "actor_rollout_ref.model.path=/no/such/model" in errors[0]
    assert "Traceback" not in run.stderr
    run_dir = next(Path(arg.split("=", 1)[1]) for arg in run.args if arg.startswith("atropos.launcher.run_dir="))
    assert not RunDir(run_dir).logs.exists()  # nothing was started


def test_launcher_with_an_unknown_key_is_one_line_exit_2(launcher_runs) -> None:
    run = launcher_runs["unknown_key"]
    assert run.returncode == 2 and "Traceback" not in run.stderr and "cannot compose" in run.stderr
    run = launcher_runs["unknown_launcher_key"]
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert len(errors) == 1 and "atropos.launcher.no_such_key" in errors[0]


def test_resuming_a_finished_run_says_so_and_exits_0(launcher_runs) -> None:
    run = launcher_runs["finished"]
    assert run.returncode == 0, run.stderr
    assert "already finished: checkpoint at step 3 of trainer.total_training_steps=3" in run.stdout


def test_sigint_works_when_inherited_as_ignored(tiny_model: Path, tmp_path: Path, no_leftovers: list) -> None:
    """A launcher started with SIGINT ignored (a script's background job) still stops on SIGINT."""

    port = free_port()
    argv = launcher_argv(
        tiny_model, tmp_path / "r", f"atropos.launcher.api_port={port}", "atropos.launcher.startup_timeout_s=600"
    )
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    wait_until(RunDir(tmp_path / "r").trainer_log.exists, 120, "the trainer's log", proc=proc)
    proc.send_signal(signal.SIGINT)
    try:
        output, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, output[-4000:]


def test_launcher_restarts_a_dead_api_on_the_same_port_then_the_envs(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The trainer and the envs keep the API's URL: a killed guarded API comes back on the same port, with its counters
    (same stats file), and the envs are started again after it (their env ids died with the old API)."""
    port = free_port()
    overrides = [f"actor_rollout_ref.model.path={tiny_model}", f"atropos.launcher.run_dir={tmp_path / 'r'}"]
    launcher = Launcher(TINY_CONFIG, [*overrides, f"atropos.launcher.api_port={port}"])
    envs_started: list[int] = []
    # Private: restart_api starts the envs through _start_envs, which waits for each to register, and the API admits
    # envs only while a trainer is registered; no public hook records that call, so it is replaced here.
    monkeypatch.setattr(launcher, "_start_envs", lambda: envs_started.append(launcher.api_restarts))
    launcher.model = str(tiny_model)
    try:
        # the launcher's API, started from its command line among its children (where restart_api finds it)
        first = ManagedProcess("run-api", launcher.api_argv(), RunDir(tmp_path / "r").log("run-api")).start()
        launcher.children["run-api"] = first
        wait_until(http_ok(f"{launcher.api_url}/status"), 60, "the API", proc=first)
        assert "recipe.atropos.guard.app" in first.argv and str(port) in first.argv
        first.popen.kill()
        first.popen.wait(timeout=30)
        launcher.restart_api()
        again = launcher.children["run-api"]
        assert again.pid != first.pid and again.poll() is None
        assert launcher.api_url == f"http://127.0.0.1:{port}" and launcher.api_restarts == 1
        assert envs_started == [1]
        assert requests.get(f"{launcher.api_url}/guard/stats", timeout=5).json()["starts"] == 2
    finally:
        launcher.stop_all()  # no envs or trainer: records the API's final counters, then stops it
    assert again.poll() is not None
    assert json.loads(RunDir(tmp_path / "r").api_final_stats.read_text())["starts"] == 2


# ---- the step the trainer registers at, before its workers start ----------------------------------------------
def test_resume_step_follows_verls_checkpoint_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The API is told the step before verl loads the checkpoint: 0 from scratch, N from the tracker file (relative
    dirs from the working directory), the global_step_N of resume_from_path, 0 when resume is disabled."""
    from omegaconf import OmegaConf

    from recipe.atropos.trainer.checkpoints import resume_step

    def cfg(**kw: object) -> object:
        return OmegaConf.create({"resume_mode": "auto", "default_local_dir": "ckpts", "resume_from_path": None, **kw})

    monkeypatch.chdir(tmp_path)
    assert resume_step(cfg()) == 0  # no tracker file: from scratch
    (tmp_path / "ckpts" / "global_step_4").mkdir(parents=True)
    (tmp_path / "ckpts" / "latest_checkpointed_iteration.txt").write_text("4")
    assert resume_step(cfg()) == 4
    assert resume_step(cfg(default_local_dir=str(tmp_path / "ckpts"))) == 4
    assert resume_step(cfg(resume_mode="disable")) == 0
    assert resume_step(cfg(resume_mode="resume_path", resume_from_path="elsewhere/global_step_7")) == 7
