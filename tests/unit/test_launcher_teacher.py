"""The launcher's frozen teacher (``atropos.launcher.teacher``): its command line, the top-k the envs ask of it, and
the variables that point an env's teacher mixin at it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from recipe.atropos.config import LauncherTeacherConfig
from recipe.atropos.envs import distill
from recipe.atropos.launcher.config import load_config
from recipe.atropos.launcher.env_entries import TEACHER_TOP_K_ENV, TEACHER_URL_ENV, teacher_environ
from recipe.atropos.launcher.roles import teacher_service, teacher_top_k
from tests.factories import TINY_CONFIG


def test_the_teacher_runs_the_teacher_endpoint_module_on_its_own_model(tmp_path: Path) -> None:
    service = teacher_service(
        LauncherTeacherConfig(model_path="/t", host="0.0.0.0", max_tokens=8), "/models/t", 8123, 2, tmp_path / "ready"
    )
    assert service.argv == [
        sys.executable, "-m", "recipe.atropos.endpoint.teacher", "--model", "/models/t", "--host", "0.0.0.0",
        "--port", "8123", "--max-tokens", "8", "--ready-file", str(tmp_path / "ready"),
    ]  # fmt: skip
    assert service.url == "http://127.0.0.1:8123" and service.top_k == 2  # a wildcard bind is reached on loopback


@pytest.mark.parametrize(
    ("overrides", "top_k"),
    [
        ([], 0),  # verl's default loss, k3: the sampled token's log-prob
        (["distillation.distillation_loss.loss_mode=forward_kl_topk", "distillation.distillation_loss.topk=4"], 4),
        (["distillation.distillation_loss.loss_mode=forward_kl_topk", "atropos.launcher.teacher.top_k=6"], 6),
    ],
)
def test_the_envs_ask_the_top_k_the_loss_needs(overrides: list[str], top_k: int) -> None:
    assert teacher_top_k(load_config(TINY_CONFIG, overrides)) == top_k


def test_the_envs_get_the_teachers_v1_url_and_top_k() -> None:
    assert teacher_environ("http://127.0.0.1:8123/", 3) == {
        "ATROPOS_TEACHER_URL": "http://127.0.0.1:8123/v1",
        "ATROPOS_TEACHER_TOP_K": "3",
    }
    assert teacher_environ(None, 3) == {}


def test_the_launcher_and_the_mixin_name_the_same_variables() -> None:
    assert (TEACHER_URL_ENV, TEACHER_TOP_K_ENV) == (distill.TEACHER_URL_ENV, distill.TEACHER_TOP_K_ENV)


def test_a_negative_top_k_is_refused() -> None:
    with pytest.raises(ValueError, match="atropos.launcher.teacher.top_k"):
        LauncherTeacherConfig(top_k=-1)
