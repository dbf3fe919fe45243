"""One supervised run: Atropos ``run-api`` → the trainer (which serves the inference endpoint) → the environments.

    python -m recipe.atropos.launch_atropos_verl_services --config recipe/atropos/config/atropos_grpo_cpu_demo.yaml \
        [hydra overrides]

The YAML is the trainer's own Hydra config; its ``atropos.launcher`` block names the environments and the run's
ports, directory, timeouts and restart policy. Pre-flight checks (config keys, model path, ports, each env's
interpreter and the env imported there) run before any service starts; each failure is one line naming the key and the
fix, exit code 2. Each env runs in its own interpreter (``.venv-envs`` by default, see
:mod:`recipe.atropos.launcher.env_python`). A run directory whose checkpoint already reached
``trainer.total_training_steps`` is reported finished (exit 0). The API is
atroposlib's own app behind validation (``python -m recipe.atropos.guard.app``). Every service logs to
``<run_dir>/logs/<name>.log``. A dead API is restarted on the same port (``restart_api``, bounded; the environments
are restarted with it, the trainer registers again by itself), a dead environment is restarted (``restart_envs``,
bounded); past the bounds the launcher names the service, prints its log tail and stops the rest. Ctrl-C / SIGTERM
(SIGINT works even when inherited as ignored) stop every process tree the launcher started — nothing else. When the
trainer finishes, the run's metrics are plotted to ``<run_dir>/metrics.png`` (also redrawn at every evaluation during
the run) and summarised (``summary.txt``, with a fault line when services were restarted or groups rejected). At start
and as it stops (any way but SIGKILL) it prints where the trainer's wandb run is (``<run_dir>/wandb``), and as it stops
the command that resumes the run from its newest checkpoint (the same ``--config`` and overrides, plus
``atropos.launcher.run_dir``), or that no checkpoint was saved yet.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from recipe.atropos.access import inference_token
from recipe.atropos.guard.app import guard_argv
from recipe.atropos.guard.state import GuardSettings
from recipe.atropos.launcher.config import LaunchError, load_config
from recipe.atropos.launcher.env_entries import (
    EnvServers,
    checked_envs,
    env_argv,
    env_environ,
    probe_envs,
    teacher_environ,
    wait_registered,
    write_env_ids,
)
from recipe.atropos.launcher.preflight import PreflightError, env_pythons, finished_step, run_preflight, typed_config
from recipe.atropos.launcher.processes import (
    ManagedProcess,
    free_port,
    install_stop_signals,
    raise_if_stopped,
    run_api_argv,
    start_watchdog,
    tail,
)
from recipe.atropos.launcher.report import (
    MetricsPlot,
    resume_command,
    resume_line,
    step_line,
    write_final_api_stats,
    write_launcher_state,
    write_run_report,
)
from recipe.atropos.launcher.roles import RemoteTrainer, TeacherService, role_plan, teacher_service, teacher_top_k
from recipe.atropos.launcher.watch import ConsoleWatch
from recipe.atropos.metrics_file import read_metrics
from recipe.atropos.polling import poll_until
from recipe.atropos.rundir import RunDir
from recipe.atropos.setup.assets import model_vocab_size, resolve_model_path
from recipe.atropos.setup.tracking import DIR_ENV, wandb_base, wandb_line, wandb_mode
from recipe.atropos.waiting import get_json

__all__ = ["Launcher", "main"]

logger = logging.getLogger("atropos_launcher")


class Launcher:
    """One supervised run of the config at ``config_path`` with Hydra ``overrides``; the typed ``atropos`` block is
    built once, here (:attr:`atropos`), and the environments are checked (:class:`LaunchError`)."""

    def __init__(self, config_path: Path, overrides: list[str]) -> None:
        self.config_path = Path(config_path).resolve()
        self.overrides = list(overrides)
        self.config = load_config(self.config_path, self.overrides)
        self.atropos = typed_config(self.config)
        if not self.atropos.online:
            raise LaunchError(
                f"atropos.source={self.atropos.source}: offline training needs no API or environments; run "
                "`python -m recipe.atropos.main_atropos` with the same config and overrides instead"
            )
        lcfg = self.atropos.launcher
        self.envs = checked_envs(lcfg, int(self.config.data.train_batch_size)) if lcfg.role != "trainer" else {}
        # Each env's interpreter (and where it was named), and the servers its config_init declares (preflight).
        self.env_pythons = env_pythons(lcfg) if self.envs else {}
        self.env_servers: dict[str, EnvServers] = {}
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_dir = RunDir(Path(lcfg.run_dir or f"outputs/{self.config.trainer.experiment_name}-{stamp}").resolve())
        self.api_port = lcfg.api_port or free_port()
        self.inference_port = lcfg.inference_port or free_port()
        self.plan = role_plan(self.atropos, self.api_port, self.inference_port)  # what runs here (launcher/roles.py)
        self.api_url, self.inference_url = self.plan.api_url, self.plan.inference_url
        self.children: dict[str, ManagedProcess] = {}
        self.env_ids: dict[int, str] = {}  # API env id → env name, as each env registered
        self.restarts: dict[str, int] = {}
        self.printed_rows = 0  # metrics rows already mirrored on the console
        self.api_restarts = 0
        self.model = str(self.config.actor_rollout_ref.model.path)  # resolved (maybe converted) in start_all
        self.remote_trainer: RemoteTrainer | None = None  # role=services: the trainer elsewhere
        self.teacher: TeacherService | None = None  # atropos.launcher.teacher: the envs' frozen teacher (start_all)
        self.plot = MetricsPlot(self.run_dir.metrics_plot, str(self.config.trainer.experiment_name))  # at each eval
        self.console = ConsoleWatch(  # why a step waits, which env raised what (recipe.atropos.launcher.watch)
            self.run_dir,
            {name: self.run_dir.log(name) for name in self.envs},
            api_url=self.api_url,
            inference_url=self.inference_url,
            interval_s=lcfg.wait_report_s,
        )

    def preflight(self) -> None:
        """Raise :class:`PreflightError` (one line) before anything starts; keeps what each env declares."""
        self.env_servers = run_preflight(self.config, self.atropos, self.env_pythons)

    def finished(self) -> int | None:
        """The step this run directory already finished at (checkpoint >= total steps), else None."""
        if str(self.config.trainer.get("resume_mode", "auto")) == "disable":
            return None
        step = finished_step(self.run_dir.checkpoints)
        total = int(self.config.trainer.total_training_steps)
        return step if step is not None and step >= total else None

    # ---- services ---------------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self.run_dir.log(name), env=env, die_with_parent=True).start()  # dies with us
        self.children[name] = proc
        raise_if_stopped()  # a Ctrl-C that landed while forking (stop_all stops this child too)
        return proc

    def trainer_argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "recipe.atropos.main_atropos",
            "--config-path",
            str(self.config_path.parent),
            "--config-name",
            self.config_path.stem,
            *self.overrides,
            f"actor_rollout_ref.model.path={self.model}",
            f"atropos.api_url={self.api_url}",
            f"atropos.inference.port={self.inference_port}",
            f"atropos.metrics_file={self.run_dir.metrics_file}",
            *([f"atropos.env_ids_file={self.run_dir.env_ids}"] if self.plan.runs_envs else []),
            f"atropos.wait_file={self.run_dir.wait_file}",
            f"trainer.default_local_dir={self.run_dir.checkpoints}",
            *(
                [f"atropos.rejected_groups_file={self.run_dir.trainer_rejected}"]
                if not self.atropos.rejected_groups_file
                else []
            ),
            f"hydra.run.dir={self.run_dir.hydra}",  # not ./outputs/<date>/<time>
        ]

    def env_argv(self, name: str) -> list[str]:
        """The command line of env ``name``: its interpreter, this run's API, endpoint, model, lengths and lag cap
        (a multi-server env's --config YAML is written under ``<run_dir>/env_configs``). What the env declares is
        probed here when the preflight did not."""
        python = self.env_pythons[name][0]
        if name not in self.env_servers:
            self.env_servers.update(probe_envs({name: self.envs[name]}, {name: python}))
        return env_argv(
            name,
            self.envs[name],
            api_url=self.api_url,
            inference_url=self.inference_url,
            model=self.model,
            max_token_length=int(self.config.data.max_prompt_length + self.config.data.max_response_length),
            max_policy_lag=self.atropos.max_policy_lag,
            api_key=inference_token(self.atropos.inference.api_key),
            python=python,
            servers=self.env_servers[name],
            config_dir=self.run_dir.env_configs,
        )

    def api_argv(self) -> list[str]:
        """The guarded API (``guard_api``, default) or plain ``run-api``, on ``api_port``."""
        lcfg = self.atropos.launcher
        if not lcfg.guard_api:
            return run_api_argv(self.api_port, host=lcfg.api_host)
        batch = int(self.config.data.train_batch_size)
        settings = GuardSettings(
            vocab_size=model_vocab_size(self.model),
            batch_size=batch,
            rejected_file=self.run_dir.rejected_groups,
            stats_file=self.run_dir.guard_stats,
            journal_dir=self.run_dir.api_journal,
            max_queued_sequences=self.atropos.max_queued_sequences(batch),
        )
        return guard_argv(self.api_port, settings, host=lcfg.api_host, allow=lcfg.api_allow)

    def _start_api(self) -> None:
        api = self._start("run-api", self.api_argv())
        api.wait_http(f"{self.api_url}/status", timeout=60)

    def _start_registered_env(self, name: str, timeout: float) -> None:
        """Start env ``name`` and record the env id it registers as (:mod:`recipe.atropos.launcher.env_entries`); a
        trainer that exits meanwhile ends the wait without an id (the caller's next look at the trainer handles its
        exit)."""
        environ = env_environ(self.envs[name], self.env_pythons[name][0])
        if self.teacher is not None:
            environ.update(teacher_environ(self.teacher.url, self.teacher.top_k))
        proc = self._start(name, self.env_argv(name), environ)
        env_id = len(self.env_ids)
        if not wait_registered(proc, self.api_url, env_id, timeout, self.children.get("trainer")):
            return
        self.env_ids[env_id] = name
        write_env_ids(self.run_dir.env_ids, self.env_ids)
        logger.info("%s registered as env id %d", name, env_id)

    def _start_envs(self) -> None:
        """Every environment, registered in order (env id -> name for exact mixtures). The first one starts while the
        trainer is still starting (its start-up overlaps the trainer's Ray start-up)."""
        self.env_ids = {}  # a (re)started API numbers its envs from 0
        for name in self.envs:
            self._start_registered_env(name, self.atropos.launcher.startup_timeout_s)

    def _start_teacher(self) -> None:
        """The frozen teacher endpoint (``atropos.launcher.teacher``), serving before any env starts; on the same port
        when restarted."""
        tcfg = self.atropos.launcher.teacher
        if self.teacher is None:
            port = tcfg.port or free_port()
            model = resolve_model_path(str(tcfg.model_path))
            self.teacher = teacher_service(tcfg, model, port, teacher_top_k(self.config))
        proc = self._start("teacher", self.teacher.argv)
        proc.wait_http(f"{self.teacher.url}/health", timeout=self.atropos.launcher.startup_timeout_s)
        logger.info("teacher endpoint %s/v1 (top-k %d) for the environments", self.teacher.url, self.teacher.top_k)

    def restart_api(self) -> None:
        """Start the API again on the same port, then the environments (their env ids died with the old API)."""
        self.api_restarts += 1
        logger.warning(
            "run-api exited (code %s); restarting it on port %d (restart %d of %d); the environments restart with it",
            self.children["run-api"].poll(),
            self.api_port,
            self.api_restarts,
            self.atropos.launcher.max_api_restarts,
        )
        for name in self.envs:
            if name in self.children:
                self.children[name].stop()
        self._start_api()
        self._start_envs()

    def start_all(self) -> None:
        timeout = self.atropos.launcher.startup_timeout_s
        self.model = resolve_model_path(str(self.config.actor_rollout_ref.model.path))
        os.environ["ATROPOS_VERL_METRICS_FILE"] = str(self.run_dir.metrics_file)  # envs append held-out evals here
        if self.plan.runs_api:
            self._start_api()
        if self.plan.runs_envs and self.atropos.launcher.teacher.model_path:
            self._start_teacher()
        if not self.plan.runs_trainer:  # role=services: the trainer runs elsewhere
            self.remote_trainer = RemoteTrainer(self.inference_url, self.atropos.launcher.trainer_gone_s)
            self._start_envs()
            return
        trainer = self._start("trainer", self.trainer_argv(), {DIR_ENV: str(self.wandb_dir)})
        self._start_envs()
        logger.info("waiting for the trainer's endpoint %s (Ray and verl workers start first)", self.inference_url)
        try:
            trainer.wait_http(f"{self.inference_url}/health", timeout=timeout)
        except RuntimeError:
            if trainer.poll() != 0:  # died; a trainer that already finished (a short resumed run) is not an error
                raise

    def stop_all(self) -> None:
        """Producers first, then the consumer, then the API (its counters read once nothing else talks to it)."""
        for name in [*self.envs, "teacher", "trainer"]:
            if name in self.children:
                self.children[name].stop()
        api = self.children.get("run-api")
        if api is not None and api.poll() is None and self.atropos.launcher.guard_api:
            write_final_api_stats(self.run_dir, get_json(f"{self.api_url}/guard/stats"))
        if "run-api" in self.children:
            self.children["run-api"].stop()

    # ---- supervision ------------------------------------------------------------------------------------
    def _died(self, proc: ManagedProcess) -> LaunchError:
        code, log = proc.poll(), proc.log_path
        stopped = self.console.trainer_stopped(log) if proc.name == "trainer" else None  # its paragraph, no traceback
        why = f" (log: {log}): {stopped}" if stopped else f"; last lines of {log}:\n{tail(log)}"
        return LaunchError(f"{proc.name} exited with code {code}{why}")

    def supervise(self) -> None:
        """Until the trainer exits: restart or fail on a dead env, fail on a dead API, mirror each step (one look a
        second, :meth:`look`)."""
        poll_until(self.look, None, 1.0)

    def look(self) -> bool:
        """One look at the run: print the new metrics rows and console lines, restart or fail on a dead service;
        True once the run is over (the trainer exited, or a remote trainer is gone)."""
        lcfg = self.atropos.launcher
        raise_if_stopped()
        rows = read_metrics(self.run_dir.metrics_file)
        for row in rows[self.printed_rows :]:
            print(step_line(row, int(self.config.trainer.total_training_steps)), flush=True)
        self.printed_rows = len(rows)
        self.plot.refresh(rows)  # metrics.png again when an env's evaluation came in
        for line in self.console.lines():
            print(line, flush=True)
        trainer = self.children.get("trainer")
        if trainer is None and self.remote_trainer.gone():
            logger.info("the trainer's endpoint %s is gone: stopping the API and the envs", self.inference_url)
            return True
        if trainer is not None and trainer.poll() is not None:
            if trainer.poll() != 0:
                raise self._died(trainer)
            return True
        if "run-api" in self.children and self.children["run-api"].poll() is not None:
            if lcfg.restart_api and self.api_restarts < lcfg.max_api_restarts:
                self.restart_api()
                return False
            raise self._died(self.children["run-api"])
        teacher = self.children.get("teacher")
        if teacher is not None and teacher.poll() is not None:
            if not (lcfg.restart_envs and self.restarts.get("teacher", 0) < lcfg.max_env_restarts):
                raise self._died(teacher)
            self.restarts["teacher"] = self.restarts.get("teacher", 0) + 1
            logger.warning("teacher exited (code %s); restart %d", teacher.poll(), self.restarts["teacher"])
            self._start_teacher()
        for name in self.envs:
            proc = self.children[name]
            if proc.poll() is None:
                continue
            if lcfg.restart_envs and self.restarts.get(name, 0) < lcfg.max_env_restarts:
                self.restarts[name] = self.restarts.get(name, 0) + 1
                logger.warning("%s exited (code %s); restart %d", name, proc.poll(), self.restarts[name])
                self._start_registered_env(name, lcfg.startup_timeout_s)
            else:
                raise self._died(proc)
        return False

    def finish(self) -> str:
        """The closing summary (:func:`recipe.atropos.launcher.report.write_run_report`)."""
        title = str(self.config.trainer.experiment_name)
        restarts = sum(self.restarts.values())
        spool = self.atropos.spool.dir
        return write_run_report(self.run_dir, title, self.api_restarts, restarts, spool_dir=spool, plot=self.plot)

    @property
    def wandb_dir(self) -> Path:
        """Where the trainer's wandb writes its ``wandb/`` folder: ``$WANDB_DIR``, else the run directory."""
        return wandb_base(self.run_dir.root)

    def wandb_line(self, latest: bool = True) -> str | None:
        """Where the trainer's wandb run goes (:func:`recipe.atropos.setup.tracking.wandb_line`; ``latest``: name the
        newest run folder); None without a trainer here or without wandb in ``trainer.logger``."""
        if not self.plan.runs_trainer:
            return None
        trainer = self.config.trainer
        mode, source = wandb_mode(self.atropos.wandb_mode)
        loggers = [str(x) for x in (trainer.get("logger") or [])]
        return wandb_line(loggers, mode, source, self.wandb_dir, trainer.project_name, trainer.experiment_name, latest)

    def resume_line(self) -> str | None:
        """The command that resumes this run from its newest checkpoint, or why there is none
        (:func:`recipe.atropos.launcher.report.resume_line`); None without a trainer here (its host keeps them)."""
        if not self.plan.runs_trainer:
            return None
        trainer = self.config.trainer
        return resume_line(
            lambda replace: resume_command(self.config_path, self.overrides, self.run_dir.root, replace),
            finished_step(self.run_dir.checkpoints),
            int(trainer.total_training_steps),
            int(trainer.save_freq),
            str(trainer.get("resume_mode", "auto")),
        )

    def run(self) -> int:
        try:
            self.preflight()
        except PreflightError as error:
            logger.error("%s", error)
            return 2
        done = self.finished()
        if done is not None:
            print(
                f"{self.run_dir.root} already finished: checkpoint at step {done} of trainer.total_training_steps="
                f"{int(self.config.trainer.total_training_steps)}; nothing to do (raise total_training_steps to train "
                "on, or use a new atropos.launcher.run_dir)",
                flush=True,
            )
            return 0
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        start_watchdog(self.run_dir.log("watchdog"))  # SIGKILLs what a SIGKILLed launcher leaves behind
        print(f"run directory: {self.run_dir.root} (logs in {self.run_dir.logs})", flush=True)
        if self.wandb_line(latest=False):  # not a run of an earlier launch of this run directory
            print(self.wandb_line(latest=False), flush=True)
        code = 0
        try:
            self.start_all()
            self.supervise()
        except (LaunchError, RuntimeError, TimeoutError) as error:
            logger.error("%s", error)
            code = 1
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping every service this launcher started")
            code = 130
        finally:
            self.stop_all()
            write_launcher_state(self.run_dir, self.api_restarts, self.restarts)
        if code == 0:
            print(self.finish(), flush=True)
        else:  # the plot as the run stopped (the summary is written when the trainer finishes)
            self.plot.draw(read_metrics(self.run_dir.metrics_file))
        for line in (self.wandb_line(), self.resume_line()):  # the wandb run's folder now names it
            if line:
                print(line, flush=True)
        return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the trainer's Hydra YAML")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for main_atropos")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    install_stop_signals()  # Ctrl-C and SIGTERM stop the run, also when SIGINT was inherited as ignored
    try:
        launcher = Launcher(args.config, args.overrides)
    except (LaunchError, PreflightError) as error:
        logger.error("%s", error)
        return 2
    except Exception as error:  # Hydra/OmegaConf composition errors: one line, not a traceback
        logger.error("cannot compose %s with %s: %s", args.config, args.overrides, str(error).splitlines()[0])
        return 2
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
