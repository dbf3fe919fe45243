"""The command the launcher prints as it stops: it resumes the run from its newest checkpoint (the same ``--config``
and overrides, plus ``atropos.launcher.run_dir``), or the console says that no checkpoint was saved yet and when one
will be."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytest

from recipe.atropos.launcher import supervisor
from recipe.atropos.launcher.report import resume_command, resume_line
from recipe.atropos.launcher.supervisor import Launcher
from recipe.atropos.rundir import RunDir
from tests.factories import CONFIG_DIR

MODULE = "recipe.atropos.launch_atropos_verl_services"
DEMO = CONFIG_DIR / "atropos_grpo_cpu_demo.yaml"


def test_the_command_keeps_config_and_overrides_in_order_and_names_the_run_dir_once() -> None:
    overrides = [
        "trainer.total_training_steps=12",
        "atropos.launcher.run_dir=outputs/old",  # replaced by the run's absolute directory, at the end
        "atropos.launcher.envs.0.script=my envs/env.py",  # a space: quoted for the shell
        "+trainer.resume_mode=disable",  # replaced when asked for
    ]
    command = resume_command(
        Path("/cfg/mine.yaml"), overrides, Path("/runs/r1"), {"trainer.resume_mode": "auto"}, python="python"
    )
    assert command == (
        "python -m recipe.atropos.launch_atropos_verl_services --config /cfg/mine.yaml trainer.total_training_steps=12"
        " 'atropos.launcher.envs.0.script=my envs/env.py' atropos.launcher.run_dir=/runs/r1 trainer.resume_mode=auto"
    )
    assert shlex.split(command)[-3] == "atropos.launcher.envs.0.script=my envs/env.py"  # one word again in a shell


def command(replace: dict[str, str]) -> str:
    return resume_command(Path("/c.yaml"), ["data.train_batch_size=16"], Path("/r"), replace, python="python")


BASE = f"python -m {MODULE} --config /c.yaml data.train_batch_size=16 atropos.launcher.run_dir=/r"


@pytest.mark.parametrize(
    ("checkpoint", "total", "save_freq", "mode", "line"),
    [
        (5, 10, 5, "auto", f"resume from checkpoint 5 (of 10 steps): {BASE}"),
        (5, 10, 5, "disable", f"resume from checkpoint 5 (of 10 steps): {BASE} trainer.resume_mode=auto"),
        (
            10,
            10,
            5,
            "auto",
            f"finished: checkpoint 10 of trainer.total_training_steps=10; to train on to step 20: {BASE} "
            "trainer.total_training_steps=20",
        ),
        (
            None,
            10,
            5,
            "auto",
            "no checkpoint saved yet (trainer.save_freq=5: one every 5 steps and at the last): a new launch starts at "
            "step 0",
        ),
        (
            None,
            10,
            -1,
            "auto",
            "no checkpoint: trainer.save_freq=-1 saves none, so this run cannot be resumed (set trainer.save_freq=N to "
            "save one every N steps and at the last)",
        ),
    ],
)
def test_the_line_by_checkpoint_and_cadence(
    checkpoint: int | None, total: int, save_freq: int, mode: str, line: str
) -> None:
    assert resume_line(command, checkpoint, total, save_freq, mode) == line


def test_a_launchers_printed_command_launches_the_same_run_again(tmp_path: Path) -> None:
    """Built from the demo config and a run directory holding checkpoint 5: the printed command, split as a shell
    does, names this module, and its --config and overrides compose the same config in the same run directory."""
    run_dir = tmp_path / "run"
    overrides = [f"atropos.launcher.run_dir={run_dir}", "atropos.max_policy_lag=3"]
    launcher = Launcher(DEMO, overrides)
    assert launcher.resume_line() == (
        "no checkpoint saved yet (trainer.save_freq=5: one every 5 steps and at the last): a new launch starts at "
        "step 0"
    )
    RunDir(run_dir).checkpoints.mkdir(parents=True)
    (RunDir(run_dir).checkpoints / "latest_checkpointed_iteration.txt").write_text("5")
    line = launcher.resume_line()
    expected = (
        f"{sys.executable} -m {MODULE} --config {DEMO} atropos.max_policy_lag=3 atropos.launcher.run_dir={run_dir}"
    )
    assert line == f"resume from checkpoint 5 (of 10 steps): {expected}"
    argv = shlex.split(line.split(": ", 1)[1])
    assert argv[:5] == [sys.executable, "-m", MODULE, "--config", str(DEMO)]
    again = Launcher(Path(argv[4]), argv[5:])
    assert again.run_dir == launcher.run_dir and again.config == launcher.config
    assert again.finished() is None  # 5 of 10: the launch trains on


def test_ctrl_c_prints_the_command_after_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Launcher.run as Ctrl-C lands while the services start (nothing started: no preflight, no watchdog): exit 130,
    the last console line is the resume command, and metrics.png shows the steps recorded so far."""
    run_dir = tmp_path / "run"
    launcher = Launcher(DEMO, [f"atropos.launcher.run_dir={run_dir}"])
    RunDir(run_dir).checkpoints.mkdir(parents=True)
    (RunDir(run_dir).checkpoints / "latest_checkpointed_iteration.txt").write_text("5")
    RunDir(run_dir).metrics_file.write_text('{"step": 5, "atropos/mean_score": 0.5}\n')

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(launcher, "preflight", lambda: None)
    monkeypatch.setattr(launcher, "start_all", interrupted)
    monkeypatch.setattr(supervisor, "start_watchdog", lambda log: None)
    assert launcher.run() == 130
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"run directory: {run_dir} (logs in {RunDir(run_dir).logs})"
    assert lines[-1] == (
        f"resume from checkpoint 5 (of 10 steps): {sys.executable} -m {MODULE} --config {DEMO} "
        f"atropos.launcher.run_dir={run_dir}"
    )
    assert RunDir(run_dir).launcher_state.exists()  # written as it stopped, as before
    assert RunDir(run_dir).metrics_plot.stat().st_size > 0 and launcher.plot.failures == 0
