"""What one launcher runs (``atropos.launcher.role``) and where its processes reach the API and the endpoint.

- ``all``: the API, the environments and the trainer, on this host (the single-machine run).
- ``services``: the API and the environments, for a trainer started elsewhere: the environments call
  ``atropos.launcher.endpoint_url``; the API listens on ``api_host:api_port`` (the trainer's ``atropos.api_url``).
  The launcher runs until interrupted or until the trainer is gone: its endpoint answered ``/health`` once and then
  not for ``atropos.launcher.trainer_gone_s`` seconds.
- ``trainer``: the trainer only (its endpoint on ``atropos.inference.host:inference_port``), against the API at
  ``atropos.api_url``. Exact env mixtures need the env ids the services' launcher records (``env_ids.json``, on the
  other host): this role trains on FIFO batches unless ``atropos.mixture`` is set.

Processes on this host reach a service bound to a wildcard or loopback address through 127.0.0.1.

With ``atropos.launcher.teacher.model_path`` a launcher that runs the environments also runs a frozen teacher endpoint
(:func:`teacher_service`) on this host, for the environments that distil.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import requests

from recipe.atropos.access import is_loopback

if TYPE_CHECKING:  # the typed config imports verl: not at import time
    from omegaconf import DictConfig

    from recipe.atropos.config import AtroposConfig, LauncherTeacherConfig

WILDCARDS = ("0.0.0.0", "::", "")


def local_host(bind: str) -> str:
    """The host a process on this machine connects to for a service bound to ``bind``."""
    return "127.0.0.1" if bind in WILDCARDS or is_loopback(bind) else bind


@dataclass(frozen=True)
class RolePlan:
    """The services one launcher starts and the URLs its processes use."""

    role: str
    api_url: str  # the API, as the trainer and the envs this launcher starts call it
    inference_url: str  # the endpoint, as the envs this launcher starts (and its start-up wait) call it

    @property
    def runs_api(self) -> bool:
        return self.role != "trainer"

    @property
    def runs_envs(self) -> bool:
        return self.role != "trainer"

    @property
    def runs_trainer(self) -> bool:
        return self.role != "services"


def role_plan(atropos: AtroposConfig, api_port: int, inference_port: int) -> RolePlan:
    launcher = atropos.launcher
    api_url = f"http://{local_host(launcher.api_host)}:{api_port}"
    inference_url = f"http://{local_host(atropos.inference.host)}:{inference_port}"
    if launcher.role == "services":
        inference_url = str(launcher.endpoint_url).rstrip("/").removesuffix("/v1")
    elif launcher.role == "trainer":
        api_url = atropos.api_url.rstrip("/")
    return RolePlan(launcher.role, api_url, inference_url)


@dataclass(frozen=True)
class TeacherService:
    """The frozen teacher endpoint a launcher starts beside the environments (``atropos.launcher.teacher``)."""

    argv: list[str]
    url: str  # as the envs on this host call it (without /v1)
    top_k: int  # the entries per position the envs ask of it


def teacher_top_k(config: DictConfig) -> int:
    """``atropos.launcher.teacher.top_k``, else ``distillation.distillation_loss.topk`` with
    ``loss_mode=forward_kl_topk``, else 0 (the sampled token's log-prob, for k3 and the other single-sample losses)."""
    from omegaconf import OmegaConf

    given = OmegaConf.select(config, "atropos.launcher.teacher.top_k", default=None)
    if given is not None:
        return int(given)
    if OmegaConf.select(config, "distillation.distillation_loss.loss_mode", default=None) == "forward_kl_topk":
        return int(OmegaConf.select(config, "distillation.distillation_loss.topk"))
    return 0


def teacher_service(
    teacher: LauncherTeacherConfig, model_path: str, port: int, top_k: int, ready_file: Path | None = None
) -> TeacherService:
    """``python -m recipe.atropos.endpoint.teacher --model MODEL_PATH`` on ``teacher.host:port`` (``model_path``
    resolved by the caller: the embedded demo model's name becomes its directory)."""
    argv = [
        sys.executable,
        "-m",
        "recipe.atropos.endpoint.teacher",
        "--model",
        model_path,
        "--host",
        teacher.host,
        "--port",
        str(port),
        "--max-tokens",
        str(teacher.max_tokens),
        *(["--ready-file", str(ready_file)] if ready_file else []),
    ]
    return TeacherService(argv, f"http://{local_host(teacher.host)}:{port}", top_k)


class RemoteTrainer:
    """The trainer of a ``services`` launcher, seen through its endpoint's ``GET /health`` (open without a token)."""

    def __init__(self, endpoint_url: str, gone_after_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.health_url = f"{endpoint_url.rstrip('/')}/health"
        self.gone_after_s = gone_after_s
        self.clock = clock
        self.last_seen: float | None = None  # when /health last answered; None: never yet

    def _answers(self) -> bool:
        try:
            return requests.get(self.health_url, timeout=5).status_code == 200
        except requests.RequestException:
            return False

    def gone(self) -> bool:
        """True once the endpoint, having answered, has not answered for ``gone_after_s`` (a trainer that restarts
        within that time is waited for; one never seen yet is waited for as long as it takes)."""
        now = self.clock()
        if self._answers():
            self.last_seen = now
            return False
        return self.last_seen is not None and now - self.last_seen >= self.gone_after_s
