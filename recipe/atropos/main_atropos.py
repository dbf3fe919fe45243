"""Entry point: ``python -m recipe.atropos.main_atropos <hydra overrides>``.

Builds verl's workers and a :class:`~recipe.atropos.trainer.RayAtroposTrainer` in a Ray TaskRunner, as verl's
``main_ppo`` does, minus the datasets. On a machine without CUDA the CPU runtime is switched on here (platform,
rollout backend, Ray resources): users pass no extra flags.

An error the recipe raises on purpose with a message that says what to do (:data:`STOP_ERRORS`: the poll timeout
"no batch ... within N s" above all, which carries the waiting line and what to check; the config checks' one-line
errors) ends the process with that message as one paragraph headed ``atropos-verl: the trainer stopped:`` on stderr
and exit code 1, not Hydra's traceback: :func:`stop_reason` takes it out of the ``RayTaskError`` that carries it from
the Ray actor. Any other error is a bug and keeps its traceback.

A config of your own, in any folder: ``--config-path DIR --config-name NAME`` (``DIR`` absolute, or relative to the
working directory: :func:`config_path_from_cwd`; Hydra alone would take it relative to this file), and the YAML extends
a shipped one with ``defaults: [atropos_grpo_base, _self_]`` (``hydra_plugins/atropos_verl`` puts the shipped configs on
the search path).

wandb: ``WANDB_MODE`` is ``atropos.wandb_mode`` (offline by default) unless the environment sets it already (the user's
``WANDB_MODE`` wins); the run lands under ``$WANDB_DIR/wandb`` (the launcher sets ``WANDB_DIR`` to the run directory),
else under the working directory's ``wandb/``; the trainer logs where at start (:mod:`recipe.atropos.setup.tracking`).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
import ray
from omegaconf import DictConfig, OmegaConf
from ray.exceptions import RayTaskError

from recipe.atropos.access import API_KEY_ENV, inference_token
from recipe.atropos.algos import extensions
from recipe.atropos.config import check_atropos_config
from recipe.atropos.schema import GroupValidationError
from recipe.atropos.setup.assets import resolve_model_path
from recipe.atropos.setup.cluster import pinned_here, ray_init_kwargs
from recipe.atropos.setup.cpu_runtime import apply_cpu_runtime, should_use_cpu_runtime
from recipe.atropos.setup.gpu import check_gpu_runtime
from recipe.atropos.setup.tracking import DIR_ENV, MODE_ENV, wandb_base, wandb_line, wandb_mode
from recipe.atropos.sources.jsonl import OfflineDataError
from recipe.atropos.trainer.distillation import distillation_plan, take_distillation
from recipe.atropos.transport.client import AtroposAPIError
from recipe.atropos.waiting import stop_paragraph

logger = logging.getLogger(__name__)

# Raised by the recipe on purpose, each with a message that says what happened and what to check: the API's errors
# and the poll timeout (AtroposAPIError), offline data that cannot train (OfflineDataError), a malformed group where
# it cannot be set aside (GroupValidationError).
STOP_ERRORS: tuple[type[BaseException], ...] = (AtroposAPIError, OfflineDataError, GroupValidationError)


def _add_external_module(module: str) -> None:
    """Make every verl process (Ray workers included) import ``module`` at ``import verl`` time."""
    current = [m for m in os.environ.get("VERL_USE_EXTERNAL_MODULES", "").split(",") if m]
    if module not in current:
        os.environ["VERL_USE_EXTERNAL_MODULES"] = ",".join([*current, module])


def prepare_runtime(config: DictConfig, runtime: str = "auto") -> bool:
    """Resolve the embedded model, select the CPU runtime when ``runtime`` (``atropos.runtime``) asks or without CUDA;
    True when it is on."""
    config.actor_rollout_ref.model.path = resolve_model_path(str(config.actor_rollout_ref.model.path))
    use_cpu = should_use_cpu_runtime(runtime)
    if use_cpu:
        apply_cpu_runtime(config, extra_modules=[extensions.MODULE])
    else:
        check_gpu_runtime(config)
        _add_external_module(extensions.MODULE)
    return use_cpu


def show_recipe_logs() -> None:
    """The recipe's INFO lines (worker layout, endpoint address, waits) in this process's output, at
    ``ATROPOS_LOG_LEVEL``: a Ray worker starts with no logging handler, so only warnings would reach the log."""
    recipe = logging.getLogger("recipe.atropos")
    if not recipe.handlers:  # its own handler: whatever the root logger's (vLLM's stack installs one) may filter
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        recipe.addHandler(handler)
        recipe.propagate = False
    recipe.setLevel(os.environ.get("ATROPOS_LOG_LEVEL", "INFO"))


@ray.remote(num_cpus=1)
class AtroposTaskRunner:
    """Runs in Ray: creates the worker groups and the trainer, then trains."""

    def run(
        self,
        config: DictConfig,
        trainer_cls: type | None = None,
        api_key: str | None = None,
        environ: dict[str, str] | None = None,
    ) -> None:
        from verl.trainer.main_ppo_v0 import BaseTaskRunner

        show_recipe_logs()
        from verl.trainer.ppo.utils import need_reference_policy
        from verl.utils.config import omega_conf_to_dataclass, validate_config

        from recipe.atropos.trainer import RayAtroposTrainer

        OmegaConf.resolve(config)
        if api_key:  # the driver's $ATROPOS_INFERENCE_API_KEY: this actor may run in another node's environment
            os.environ[API_KEY_ENV] = api_key
        os.environ.update(environ or {})  # the driver's wandb mode and folder (wandb.init runs in this actor)
        roles = BaseTaskRunner()
        _, worker_group_cls = roles.add_actor_rollout_worker(config)
        roles.add_reward_model_resource_pool(config)
        roles.add_teacher_model_resource_pool(config)  # verl's teacher pool when its switch is on (teacher_models)
        validate_config(config=config, use_reference_policy=need_reference_policy(config), use_critic=False)
        model_config = omega_conf_to_dataclass(config.actor_rollout_ref.model)
        trainer = (trainer_cls or RayAtroposTrainer)(
            config=config,
            tokenizer=model_config.tokenizer,
            processor=model_config.processor,
            role_worker_mapping=roles.role_worker_mapping,
            resource_pool_manager=roles.init_resource_pool_mgr(config),
            ray_worker_group_cls=worker_group_cls,
        )
        trainer.init_workers()
        trainer.fit()


def wandb_environ(config: DictConfig, configured_mode: str) -> dict[str, str]:
    """Set ``WANDB_MODE`` (``configured_mode``, ``atropos.wandb_mode``, unless the environment sets it: the user's
    wins) and ``WANDB_DIR`` (unless set: the working directory, absolute, so the run lands in ``./wandb`` whatever
    the Ray actor's directory) in this process's environment, log where the run goes, and return the two for the
    trainer's actor."""
    mode, source = wandb_mode(configured_mode)
    os.environ[MODE_ENV] = mode
    os.environ[DIR_ENV] = str(wandb_base(os.getcwd()))
    loggers = [str(x) for x in (config.trainer.get("logger") or [])]
    trainer = config.trainer
    line = wandb_line(loggers, mode, source, Path(os.environ[DIR_ENV]), trainer.project_name, trainer.experiment_name)
    if line is not None:
        logger.info("%s", line)
    return {MODE_ENV: mode, DIR_ENV: os.environ[DIR_ENV]}


def config_path_from_cwd(argv: list[str], cwd: str | None = None) -> list[str]:
    """``argv`` with a relative ``--config-path DIR`` / ``-cp DIR`` (or ``--config-path=DIR``) made absolute from the
    working directory ``cwd`` (default: this process's): Hydra takes a relative one from this file's folder, so
    ``--config-path my_configs`` would look in ``recipe/atropos/my_configs``. Absolute and ``pkg://`` paths stay."""
    cwd = cwd or os.getcwd()

    def absolute(path: str) -> str:
        return path if path.startswith("pkg://") or os.path.isabs(path) else os.path.join(cwd, path)

    out = list(argv)
    for i, arg in enumerate(out):
        flag, eq, value = arg.partition("=")
        if flag not in ("--config-path", "-cp"):
            continue
        if eq:
            out[i] = f"{flag}={absolute(value)}"
        elif i + 1 < len(out):
            out[i + 1] = absolute(out[i + 1])
    return out


def run_atropos(config: DictConfig, trainer_cls: type | None = None) -> None:
    """Start Ray (if needed), train, and shut down the Ray cluster this call started."""
    from verl.trainer.constants_ppo import get_ppo_ray_runtime_env

    atropos = check_atropos_config(config)
    tracking = wandb_environ(config, atropos.wandb_mode)
    prepare_runtime(config, atropos.runtime)
    take_distillation(config)  # before the task runner's resource pools: off (envs' fields) or sized (verl's teacher)
    started_ray = False
    if not ray.is_initialized():  # with ray_kwargs.ray_init.address set: joins that cluster (setup/cluster.py)
        ray.init(**ray_init_kwargs(config, get_ppo_ray_runtime_env(config)))
        started_ray = True
    try:
        # On the driver's node: the endpoint it serves listens where the launcher and the envs were told.
        runner = AtroposTaskRunner.options(**pinned_here()).remote()
        ray.get(runner.run.remote(config, trainer_cls, inference_token(atropos.inference.api_key), tracking))
    finally:
        if started_ray:  # disconnects from an attached cluster, which keeps running
            ray.shutdown()


def unwrap_ray_error(error: BaseException) -> BaseException:
    """The exception a Ray task or actor method raised, out of the ``RayTaskError`` (possibly nested: a task that
    called another) that ``ray.get`` raises for it; ``error`` itself when it is no ``RayTaskError``."""
    for _ in range(16):
        cause = getattr(error, "cause", None) if isinstance(error, RayTaskError) else None
        if not isinstance(cause, BaseException) or cause is error:
            break
        error = cause
    return error


def stop_reason(error: BaseException) -> str | None:
    """The paragraph to stop with for an error of :data:`STOP_ERRORS` (raised here or in the Ray actor), else None:
    a bug, whose traceback is kept."""
    cause = unwrap_ray_error(error)
    return stop_paragraph(str(cause)) if isinstance(cause, STOP_ERRORS) else None


def stop(paragraph: str) -> None:
    """Print ``paragraph`` to stderr and exit with code 1 (a ``SystemExit``, which Hydra lets through untouched)."""
    print(paragraph, file=sys.stderr, flush=True)
    raise SystemExit(1)


@hydra.main(config_path="config", config_name="atropos_grpo", version_base=None)
def main(config: DictConfig) -> None:
    try:
        check_atropos_config(config)  # the checks' ValueErrors name the key and the fix: one paragraph, before Ray
        distillation_plan(config)  # likewise for the distillation block (a loss without teacher, split + teacher, ...)
    except ValueError as error:
        stop(stop_paragraph(str(error)))
    try:
        run_atropos(config)
    except Exception as error:
        reason = stop_reason(error)
        if reason is None:
            raise
        stop(reason)


def cli() -> None:
    """The command line: :func:`main` with a relative ``--config-path`` taken from the working directory."""
    sys.argv = config_path_from_cwd(sys.argv)
    main()


if __name__ == "__main__":
    cli()
