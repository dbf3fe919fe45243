"""The ``atropos:`` block of the trainer config as typed dataclasses, in verl's own pattern.

Every default of the block lives here (``atropos_grpo_base.yaml`` repeats them with their documentation, and a test
holds the two equal). :func:`atropos_config` builds the dataclass from a composed config once per process (the
launcher, the trainer driver) with verl's ``omega_conf_to_dataclass``: an unknown key or a wrong type fails there, and
each ``__post_init__`` refuses values that cannot work, naming the key and the fix. Checks that need verl's own keys
too live in :mod:`recipe.atropos.config.checks`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from verl.base_config import BaseConfig

from recipe.atropos.access import check_exposure, parse_networks
from recipe.atropos.setup.tracking import WANDB_MODES

SOURCES = ("api", "jsonl")
BACKENDS = ("ray", "vllm_http")
NORMALIZATIONS = ("none", "batch")
ROLES = ("all", "services", "trainer")  # atropos.launcher.role
RUNTIMES = ("auto", "cpu", "cuda")  # atropos.runtime (recipe.atropos.setup.cpu_runtime.should_use_cpu_runtime)
CPU_ROLLOUTS = ("hf_cpu", "vllm")  # atropos.cpu_rollout (recipe.atropos.setup.cpu_runtime.cpu_rollout_settings)


def _one_of(key: str, value: str, allowed: tuple[str, ...], hint: str = "") -> None:
    if value not in allowed:
        raise ValueError(f"atropos.{key}={value!r}: use one of {', '.join(map(repr, allowed))}{hint}")


@dataclass
class OfflineConfig(BaseConfig):
    """``atropos.offline``: how ``source=jsonl`` walks the saved groups."""

    shuffle: bool = False
    seed: int = 0
    epochs: int | None = None  # passes over the data; None = as many as trainer.total_training_steps needs

    def __post_init__(self) -> None:
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"atropos.offline.epochs={self.epochs}: use null (as many as the steps need) or >= 1")


@dataclass
class AdvantageConfig(BaseConfig):
    """``atropos.advantage``: applied to the combined advantages, normalize then clip."""

    normalize: str = "none"
    clip: list[float] | None = None

    def __post_init__(self) -> None:
        _one_of("advantage.normalize", self.normalize, NORMALIZATIONS, " (batch: whiten over the trained tokens)")
        if self.clip is None:
            return
        bounds = list(self.clip)
        if len(bounds) != 2 or not all(isinstance(b, int | float) and math.isfinite(b) for b in bounds):
            raise ValueError(
                f"atropos.advantage.clip={bounds!r}: use null or two finite numbers [lo, hi], e.g. [-3, 3]"
            )
        if not bounds[0] < bounds[1]:
            raise ValueError(f"atropos.advantage.clip={bounds}: lo must be below hi, e.g. [-3.0, 3.0]")

    @property
    def clip_range(self) -> tuple[float, float] | None:
        return None if self.clip is None else (float(self.clip[0]), float(self.clip[1]))


@dataclass
class SpoolConfig(BaseConfig):
    """``atropos.spool``: fetched groups on disk until a checkpoint includes their training."""

    enable: bool = True
    dir: str | None = None  # None = <trainer.default_local_dir>/spool
    drain_max_sequences: int | None = None  # None = data.train_batch_size; 0 = fetch only when a step needs data


@dataclass
class GuardConfig(BaseConfig):
    """``atropos.guard``: the guarded API's memory bound (``python -m recipe.atropos.guard.app``)."""

    max_queued_sequences: int | None = None  # None = data.train_batch_size x max(1, max_policy_lag or 2) x 2

    def __post_init__(self) -> None:
        if self.max_queued_sequences is not None and self.max_queued_sequences < 1:
            raise ValueError(
                f"atropos.guard.max_queued_sequences={self.max_queued_sequences}: use null (derived) or a number of "
                "sequences >= data.train_batch_size"
            )


@dataclass
class InferenceConfig(BaseConfig):
    """``atropos.inference``: the endpoint environments call."""

    host: str = "127.0.0.1"
    port: int = 8001
    backend: str = "ray"
    served_model_name: str | None = None
    ready_file: str | None = None
    drain_timeout_s: float = 600.0
    max_tracked_completions: int = 200000
    api_key: str | None = None  # None = $ATROPOS_INFERENCE_API_KEY, else no token (loopback only)

    def __post_init__(self) -> None:
        _one_of("inference.backend", self.backend, BACKENDS)


@dataclass
class EnvConfig(BaseConfig):
    """One entry of ``atropos.launcher.envs``: a module (``python -m``) or a script run with ``serve``, in its own
    interpreter (``python``) with its own import path (``pythonpath``); see ``atropos_grpo_base.yaml``."""

    name: str | None = None  # None = env<index>
    module: str | None = None
    script: str | None = None
    python: str | None = None  # the env's interpreter; None = atropos.launcher.env_python
    pythonpath: list[str] = field(default_factory=list)  # folders prepended to the env's PYTHONPATH
    group_size: int = 8
    weight: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)  # the env's own CLI flags; they win over the launcher's
    policy_server: int = 0  # multi-server envs: the index of config_init's servers that is the trained policy
    servers: list[dict[str, Any]] = field(default_factory=list)  # multi-server envs: merged onto config_init's

    def __post_init__(self) -> None:
        if self.policy_server < 0:
            raise ValueError(f"atropos.launcher.envs[].policy_server={self.policy_server}: use an index >= 0")


@dataclass
class LauncherTeacherConfig(BaseConfig):
    """``atropos.launcher.teacher``: a frozen teacher endpoint the launcher starts for environments that distil
    (``python -m recipe.atropos.endpoint.teacher``; see ``atropos_grpo_base.yaml``)."""

    model_path: str | None = None  # None = no teacher endpoint
    host: str = "127.0.0.1"
    port: int | None = None  # None = a free port
    top_k: int | None = None  # what envs ask of it; None = distillation_loss.topk with forward_kl_topk, else 0
    max_tokens: int = 64

    def __post_init__(self) -> None:
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"atropos.launcher.teacher.top_k={self.top_k}: use null (from the loss), 0 or k > 0")
        if self.max_tokens < 1:
            raise ValueError(f"atropos.launcher.teacher.max_tokens={self.max_tokens}: use >= 1")


@dataclass
class LauncherConfig(BaseConfig):
    """``atropos.launcher``: what the supervised run starts, where, and how it recovers."""

    run_dir: str | None = None
    api_port: int | None = None
    inference_port: int | None = None
    startup_timeout_s: float = 900.0
    restart_envs: bool = True
    max_env_restarts: int = 3
    guard_api: bool = True
    restart_api: bool = True
    max_api_restarts: int = 3
    wait_report_s: float = 30.0
    envs: list[EnvConfig] = field(default_factory=list)
    role: str = "all"
    api_host: str = "127.0.0.1"
    api_allow: list[str] = field(default_factory=list)
    endpoint_url: str | None = None  # role=services: the trainer's endpoint, e.g. http://trainer-host:8001
    trainer_gone_s: float = 300.0
    env_python: str | None = None  # the envs' interpreter; None = $ATROPOS_ENV_PYTHON, else .venv-envs, else this one
    teacher: LauncherTeacherConfig = field(default_factory=LauncherTeacherConfig)

    def __post_init__(self) -> None:
        if self.max_api_restarts < 0 or self.max_env_restarts < 0:
            raise ValueError("atropos.launcher.max_api_restarts / max_env_restarts must be >= 0")
        _one_of("launcher.role", self.role, ROLES, " (all: API, envs and trainer; services: API and envs; trainer)")
        parse_networks(self.api_allow)
        check_exposure(
            self.api_host, guarded=bool(self.api_allow), what="the Atropos API", key="atropos.launcher.api_allow"
        )
        if self.api_allow and not self.guard_api:
            raise ValueError(
                "atropos.launcher.api_allow needs atropos.launcher.guard_api=true: plain run-api has no allow-list"
            )
        if self.role == "services" and not (self.endpoint_url and self.api_port):
            raise ValueError(
                "atropos.launcher.role=services needs atropos.launcher.endpoint_url (the trainer's endpoint, e.g. "
                "http://TRAINER_HOST:8001) and atropos.launcher.api_port (the port the trainer's atropos.api_url names)"
            )
        if self.role == "trainer" and not self.inference_port:
            raise ValueError(
                "atropos.launcher.role=trainer needs atropos.launcher.inference_port: the services' "
                "atropos.launcher.endpoint_url names it"
            )
        if self.wait_report_s <= 0:
            raise ValueError(f"atropos.launcher.wait_report_s={self.wait_report_s}: use seconds > 0, e.g. 30")
        for i, (name, env) in enumerate(zip(self.env_names(), self.envs, strict=True)):
            if bool(env.module) == bool(env.script):
                raise ValueError(f"atropos.launcher.envs[{i}] ({name}): give exactly one of `module` or `script`")
        weights = {name: env.weight for name, env in zip(self.env_names(), self.envs, strict=True)}
        if any(w < 0 for w in weights.values()) or (len(weights) >= 2 and sum(weights.values()) <= 0):
            raise ValueError(f"atropos.launcher.envs[].weight {weights}: use weights >= 0 with a positive sum")

    def env_names(self) -> list[str]:
        return [env.name or f"env{i}" for i, env in enumerate(self.envs)]


@dataclass
class AtroposConfig(BaseConfig):
    """The ``atropos:`` block; see ``atropos_grpo_base.yaml`` for what each key does."""

    api_url: str = "http://127.0.0.1:8000"
    source: str = "api"
    jsonl_paths: list[str] = field(default_factory=list)
    offline: OfflineConfig = field(default_factory=OfflineConfig)
    final_eval_wait_s: float = 0.0
    eval_wait_s: float = 0.0
    poll_timeout_s: float = 1800.0
    poll_interval_s: float = 0.05
    poll_max_interval_s: float = 2.0
    error_log_interval_s: float = 30.0
    request_timeout_s: float = 30.0
    use_env_advantages: bool = True
    fallback_to_grpo: bool = True
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    mixture: dict[str, float] = field(default_factory=dict)
    mixture_wait_s: float = 120.0
    mixture_max_pending_batches: int | None = 4
    env_ids_file: str | None = None
    max_policy_lag: int | None = 2
    runtime: str = "auto"
    cpu_rollout: str = "hf_cpu"
    metrics_file: str | None = None
    wait_file: str | None = None
    rejected_groups_file: str | None = None
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    wandb_group: str | None = None  # None = trainer.experiment_name
    wandb_project: str | None = None  # None = trainer.project_name
    wandb_mode: str = "offline"  # the trainer's WANDB_MODE unless the environment sets it (setup/tracking.py)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    def __post_init__(self) -> None:
        _one_of("source", self.source, SOURCES, " (api: the live run-api; jsonl: atropos.jsonl_paths)")
        if self.source == "jsonl" and not self.jsonl_paths:
            raise ValueError(
                "atropos.source=jsonl needs atropos.jsonl_paths: files or globs of saved ScoredData groups"
            )
        _one_of("runtime", self.runtime, RUNTIMES)
        _one_of("wandb_mode", self.wandb_mode, WANDB_MODES, " (a WANDB_MODE environment variable wins over it)")
        _one_of("cpu_rollout", self.cpu_rollout, CPU_ROLLOUTS, " (vllm needs .venv-vllm from `make vllm-env`)")
        if self.max_policy_lag is not None and self.max_policy_lag < 0:
            raise ValueError(f"atropos.max_policy_lag={self.max_policy_lag} must be >= 0 (or null for no limit)")
        if any(w < 0 for w in self.mixture.values()) or (self.mixture and sum(self.mixture.values()) <= 0):
            raise ValueError(f"atropos.mixture={dict(self.mixture)}: use weights >= 0 with a positive sum")
        if self.eval_wait_s < 0 or self.final_eval_wait_s < 0:
            raise ValueError(
                f"atropos.eval_wait_s={self.eval_wait_s} / final_eval_wait_s={self.final_eval_wait_s}: use seconds "
                ">= 0 (0 = do not wait)"
            )

    def max_queued_sequences(self, batch_size: int) -> int:
        """``guard.max_queued_sequences``, or derived: ``batch_size`` x the lag cap (2 when null, 1 at least) x 2."""
        if self.guard.max_queued_sequences is not None:
            return int(self.guard.max_queued_sequences)
        cap = 2 if self.max_policy_lag is None else max(1, self.max_policy_lag)
        return int(batch_size) * cap * 2

    @property
    def online(self) -> bool:
        """True when groups come from the live API (environments generate through the trainer's endpoint)."""
        return self.source == "api"


def atropos_config(config: DictConfig) -> AtroposConfig:
    """The typed ``atropos`` block of a composed trainer config (interpolations resolved); raises ``ValueError``."""
    from verl.utils.config import omega_conf_to_dataclass

    block = OmegaConf.to_container(config.atropos, resolve=True) if "atropos" in config else {}
    try:
        return omega_conf_to_dataclass(OmegaConf.create(block), AtroposConfig)
    except OmegaConfBaseException as exc:  # unknown key, wrong type: one line naming the key
        key = getattr(exc, "full_key", None)
        where = f"atropos.{key}: " if key else "atropos: "
        raise ValueError(f"{where}{str(exc).splitlines()[0]} (see atropos_grpo_base.yaml)") from None
