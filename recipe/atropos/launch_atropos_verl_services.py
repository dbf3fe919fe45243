"""One supervised run: Atropos ``run-api`` → the trainer (which serves the inference endpoint) → the environments.

    python -m recipe.atropos.launch_atropos_verl_services --config recipe/atropos/config/atropos_grpo_cpu_demo.yaml \
        [hydra overrides]

The YAML is the trainer's own Hydra config; its ``atropos.launcher`` block names the environments and the run's
ports, directory, timeouts and restart policy. Every service logs to ``<run_dir>/logs/<name>.log``. If a service
dies, the launcher says which, prints its log tail, and stops the rest (or restarts an environment when
``restart_envs`` is on). Ctrl-C / SIGTERM stop every process tree the launcher started — nothing else. When the trainer
finishes, the run's metrics are plotted to ``<run_dir>/metrics.png`` and summarised in one line.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from recipe.atropos.plotting import plot_metrics, read_metrics, step_line, summarize
from recipe.atropos.processes import ManagedProcess, free_port, run_api_argv, tail
from recipe.atropos.runtime.assets import resolve_model_path

logger = logging.getLogger("atropos_launcher")


class LaunchError(RuntimeError):
    """A service failed to start or died; the message names it and carries its log tail."""


@dataclass(frozen=True)
class EnvSpec:
    """One environment to run with ``serve``: a module (``python -m``) or a script, plus its own flags."""

    name: str
    module: str | None = None
    script: str | None = None
    group_size: int = 8
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)

    def argv(self, api_url: str, inference_url: str, model: str, max_token_length: int) -> list[str]:
        target = ["-m", self.module] if self.module else [str(Path(self.script).expanduser())]
        flags: dict[str, Any] = {
            "env.rollout_server_url": api_url,
            "env.tokenizer_name": model,
            "env.group_size": self.group_size,
            "env.inference_weight": self.weight,
            "env.max_token_length": max_token_length,
            "env.use_wandb": False,
            "env.wandb_name": self.name,
            "openai.server_type": "vllm",
            "openai.base_url": f"{inference_url}/v1",
            "openai.model_name": model,
            "openai.tokenizer_name": model,
            "openai.api_key": "x",
        }
        flags.update(self.args)  # the env's own flags win
        cli = []
        for key, value in flags.items():
            cli += [f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)]
        return [sys.executable, *target, "serve", *cli]


def load_config(config_path: Path, overrides: list[str]) -> DictConfig:
    """Compose the trainer's Hydra config exactly as ``main_atropos`` would."""
    config_path = Path(config_path).resolve()
    with initialize_config_dir(config_dir=str(config_path.parent), version_base=None):
        return compose(config_name=config_path.stem, overrides=overrides)


def env_specs(config: DictConfig) -> list[EnvSpec]:
    """The ``atropos.launcher.envs`` entries, checked (one of module/script; batch size a multiple of group size)."""
    entries = OmegaConf.to_container(config.atropos.launcher.envs, resolve=True) or []
    if not entries:
        raise LaunchError("atropos.launcher.envs is empty: name at least one environment (module or script)")
    batch_size = int(config.data.train_batch_size)
    specs = []
    for i, entry in enumerate(entries):
        spec = EnvSpec(**{"name": f"env{i}", **entry})
        if bool(spec.module) == bool(spec.script):
            raise LaunchError(f"atropos.launcher.envs[{i}] ({spec.name}): give exactly one of `module` or `script`")
        if spec.group_size < 1 or batch_size % spec.group_size:
            raise LaunchError(
                f"data.train_batch_size={batch_size} is not a multiple of env {spec.name!r} group_size="
                f"{spec.group_size}: the Atropos API would never form a batch. Change one of them."
            )
        specs.append(spec)
    return specs


class Launcher:
    def __init__(self, config_path: Path, overrides: list[str]) -> None:
        self.config_path = Path(config_path).resolve()
        self.overrides = list(overrides)
        self.config = load_config(self.config_path, self.overrides)
        if self.config.atropos.get("source", "api") != "api":
            raise LaunchError(
                f"atropos.source={self.config.atropos.source}: offline training needs no API or environments; run "
                "`python -m recipe.atropos.main_atropos` with the same config and overrides instead"
            )
        self.envs = env_specs(self.config)
        lcfg = self.config.atropos.launcher
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        self.run_dir = Path(lcfg.run_dir or f"outputs/{self.config.trainer.experiment_name}-{stamp}").resolve()
        self.api_port = int(lcfg.api_port or free_port())
        self.inference_port = int(lcfg.inference_port or free_port())
        self.api_url = f"http://127.0.0.1:{self.api_port}"
        self.inference_url = f"http://127.0.0.1:{self.inference_port}"
        self.metrics_file = self.run_dir / "metrics.jsonl"
        self.children: dict[str, ManagedProcess] = {}
        self.env_ids_file = self.run_dir / "env_ids.json"
        self.env_ids: dict[int, str] = {}  # API env id → env name, as each env registered
        self.restarts: dict[str, int] = {}
        self.model = str(self.config.actor_rollout_ref.model.path)  # resolved (maybe converted) in start_all

    # ---- services ---------------------------------------------------------------------------------------
    def _log(self, name: str) -> Path:
        return self.run_dir / "logs" / f"{name}.log"

    def _start(self, name: str, argv: list[str]) -> ManagedProcess:
        proc = ManagedProcess(name, argv, self._log(name)).start()
        self.children[name] = proc
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
            f"atropos.metrics_file={self.metrics_file}",
            f"atropos.env_ids_file={self.env_ids_file}",
            f"trainer.default_local_dir={self.run_dir / 'checkpoints'}",
            f"hydra.run.dir={self.run_dir / 'hydra'}",  # not ./outputs/<date>/<time>
        ]

    def _start_env(self, spec: EnvSpec) -> ManagedProcess:
        max_len = int(self.config.data.max_prompt_length + self.config.data.max_response_length)
        return self._start(spec.name, spec.argv(self.api_url, self.inference_url, self.model, max_len))

    def _start_registered_env(self, spec: EnvSpec, timeout: float) -> None:
        """Start ``spec`` and wait until the API lists it: envs register one at a time, so the env id the API hands
        out (its registration count) names this env; ``env_ids.json`` tells the trainer (exact env mixtures)."""
        proc = self._start_env(spec)
        env_id = len(self.env_ids)

        def registered() -> bool:
            try:
                answer = requests.get(f"{self.api_url}/status-env", json={"env_id": env_id}, timeout=5)
            except requests.RequestException:
                return False
            return answer.status_code == 200

        try:
            proc.wait_until(registered, timeout, f"registration with the API as env id {env_id}")
        except (RuntimeError, TimeoutError) as error:
            raise LaunchError(str(error)) from error
        self.env_ids[env_id] = spec.name
        self.env_ids_file.write_text(json.dumps({str(k): v for k, v in self.env_ids.items()}))
        logger.info("%s registered as env id %d", spec.name, env_id)

    def start_all(self) -> None:
        timeout = float(self.config.atropos.launcher.startup_timeout_s)
        self.model = resolve_model_path(str(self.config.actor_rollout_ref.model.path))
        api = self._start("run-api", run_api_argv(self.api_port))
        api.wait_http(f"{self.api_url}/status", timeout=60)
        trainer = self._start("trainer", self.trainer_argv())
        logger.info("waiting for the trainer's endpoint %s (Ray and verl workers start first)", self.inference_url)
        trainer.wait_http(f"{self.inference_url}/health", timeout=timeout)
        for spec in self.envs:
            self._start_registered_env(spec, timeout)

    def stop_all(self) -> None:
        for name in [*(s.name for s in self.envs), "trainer", "run-api"]:
            if name in self.children:
                self.children[name].stop()

    # ---- supervision ------------------------------------------------------------------------------------
    def _died(self, proc: ManagedProcess) -> LaunchError:
        return LaunchError(
            f"{proc.name} exited with code {proc.poll()}; last lines of {proc.log_path}:\n{tail(proc.log_path)}"
        )

    def supervise(self) -> None:
        """Until the trainer exits: restart or fail on a dead env, fail on a dead API, mirror each step."""
        lcfg = self.config.atropos.launcher
        total = int(self.config.trainer.total_training_steps)
        printed = 0
        while True:
            rows = read_metrics(self.metrics_file)
            for row in rows[printed:]:
                print(step_line(row, total), flush=True)
            printed = len(rows)
            trainer = self.children["trainer"]
            if trainer.poll() is not None:
                if trainer.poll() != 0:
                    raise self._died(trainer)
                return
            if self.children["run-api"].poll() is not None:
                raise self._died(self.children["run-api"])
            for spec in self.envs:
                proc = self.children[spec.name]
                if proc.poll() is None:
                    continue
                if lcfg.restart_envs and self.restarts.get(spec.name, 0) < int(lcfg.max_env_restarts):
                    self.restarts[spec.name] = self.restarts.get(spec.name, 0) + 1
                    logger.warning("%s exited (code %s); restart %d", spec.name, proc.poll(), self.restarts[spec.name])
                    self._start_registered_env(spec, float(lcfg.startup_timeout_s))
                else:
                    raise self._died(proc)
            time.sleep(1.0)

    def finish(self) -> str:
        rows = read_metrics(self.metrics_file)
        summary = summarize(rows)
        if rows:
            png = plot_metrics(rows, self.run_dir / "metrics.png", title=str(self.config.trainer.experiment_name))
            logger.info("plot: %s", png)
        (self.run_dir / "summary.txt").write_text(summary + "\n")
        return summary

    def run(self) -> int:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        print(f"run directory: {self.run_dir} (logs in {self.run_dir / 'logs'})", flush=True)
        try:
            self.start_all()
            self.supervise()
        except LaunchError as error:
            logger.error("%s", error)
            return 1
        except KeyboardInterrupt:
            logger.warning("interrupted: stopping every service this launcher started")
            return 130
        finally:
            self.stop_all()
        print(self.finish(), flush=True)
        return 0


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the trainer's Hydra YAML")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for main_atropos")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM stops the run like Ctrl-C
    try:
        launcher = Launcher(args.config, args.overrides)
    except LaunchError as error:
        logger.error("%s", error)
        return 2
    return launcher.run()


if __name__ == "__main__":
    sys.exit(main())
