"""The launcher starts a frozen teacher endpoint (``atropos.launcher.teacher``: its own model, a second tiny model
with seed 1) and hands it to the envs through the environment: an env that distils, given no teacher flag, fills
its groups' ``distill_*`` from that teacher's forward pass (not the student's)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM

from recipe.atropos.envs.one_word_distill_env import OneWordDistillEnv
from recipe.atropos.launcher.env_entries import teacher_environ
from recipe.atropos.launcher.supervisor import Launcher
from recipe.atropos.schema import validate_group
from recipe.atropos.setup.assets import build_tiny_model
from tests.factories import TINY_CONFIG, X


def forward_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """Row j: the model's log-probs of the token at j + 1 [L - 1, V]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


@pytest.mark.timeout(300)
def test_the_launchers_teacher_serves_the_envs_through_the_environment(
    tmp_path: Path, tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    teacher = build_tiny_model(tmp_path / "teacher", seed=1)
    launcher = Launcher(
        TINY_CONFIG,
        [
            f"actor_rollout_ref.model.path={tiny_model}",
            f"atropos.launcher.run_dir={tmp_path / 'run'}",
            f"atropos.launcher.teacher.model_path={teacher}",
            "atropos.launcher.teacher.max_tokens=8",
            "distillation.enabled=true",
            "distillation.distillation_loss.loss_mode=k3",
        ],
    )
    try:
        # Private: the public start_all also starts the API, the envs and the trainer; this test needs the teacher
        # service alone, as start_all starts it before the envs.
        launcher._start_teacher()
        assert requests.get(f"{launcher.teacher.url}/health", timeout=5).status_code == 200
        assert launcher.teacher.top_k == 0  # k3: the sampled token's log-prob
        for key, value in teacher_environ(launcher.teacher.url, launcher.teacher.top_k).items():
            monkeypatch.setenv(key, value)  # what _start_registered_env adds to each env's environment
        config, servers = OneWordDistillEnv.config_init()
        out = tmp_path / "groups.jsonl"
        config = config.model_copy(
            update={"tokenizer_name": str(tiny_model), "group_size": 2, "data_path_to_save_groups": str(out)}
        )
        assert config.teacher_base_url is None and config.teacher_top_k is None  # no flag: the environment's
        env = OneWordDistillEnv(config, servers, slurm=False, testing=True)
        group = {"tokens": [[257, 72, 105, 33], [257, 72, 105, 63]], "masks": [[X, X, 105, 33], [X, X, 105, 63]],
                 "scores": [1.0, 0.0]}  # fmt: skip
        asyncio.run(env.handle_send_to_api([group], do_send_to_api=False, abort_on_any_max_length_exceeded=False))
        env.jsonl_writer.close()
        posted = validate_group(json.loads(out.read_text().splitlines()[0]))
        tokens = posted.tokens[0]
        expected, student = forward_logprobs(teacher, tokens), forward_logprobs(tiny_model, tokens)
        for p in range(1, len(tokens)):
            assert posted.distill_token_ids[0][p] == [tokens[p]]
            lp = posted.distill_logprobs[0][p][0]
            assert lp == pytest.approx(float(expected[p - 1, tokens[p]]), abs=1e-4)
            assert abs(lp - float(student[p - 1, tokens[p]])) > 1e-3  # the teacher's own model, not the student's
        assert launcher.children["teacher"].log_path == launcher.run_dir.log("teacher")
    finally:
        launcher.stop_all()
    assert launcher.children["teacher"].poll() is not None
