"""An env that distils: ``OneWordDistillEnv`` (the :class:`~recipe.atropos.envs.distill.TeacherDistillation` mixin
on the bundled env) asks the recipe's inference endpoint, serving the tiny model as a frozen teacher, for the teacher
fields of every group it posts; what it writes (atroposlib's own JSONL writer, as ``process`` saves groups) passes the
schema, holds a forward pass's values, and becomes verl's teacher tensors in the trainer's conversion."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipe.atropos.endpoint.backends import PromptLogprobs
from recipe.atropos.endpoint.server import InferenceEndpoint
from recipe.atropos.endpoint.teacher import HFTeacherBackend
from recipe.atropos.endpoint.teacher import teacher_endpoint as teacher_endpoint_of
from recipe.atropos.envs.one_word_distill_env import OneWordDistillEnv
from recipe.atropos.schema import validate_group
from recipe.atropos.trainer.dataproto import scored_data_to_dataproto
from recipe.atropos.trainer.distillation import teacher_tensors
from tests.factories import X


class CountingTeacher(HFTeacherBackend):
    """The frozen teacher's backend (the hf_cpu generator in this process), counting its prompt_logprobs calls."""

    calls = 0

    async def prompt_logprobs(self, prompt_ids: list[int], k: int) -> PromptLogprobs:
        self.calls += 1
        return await super().prompt_logprobs(prompt_ids, k)


@pytest.fixture(scope="module")
def teacher_endpoint(tiny_model: Path) -> Iterator[tuple[InferenceEndpoint, CountingTeacher]]:
    """recipe.atropos.endpoint.teacher's endpoint (what ``python -m recipe.atropos.endpoint.teacher`` serves)."""
    endpoint = teacher_endpoint_of(model=str(tiny_model), max_tokens=8)
    backend = CountingTeacher(str(tiny_model), response_length=8, num_threads=1)
    endpoint.backend = backend
    endpoint.start()
    try:
        yield endpoint, backend
    finally:
        endpoint.stop()


def forward_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """Row j: the tiny model's log-probs of the token at j + 1 given ids[:j + 1] [L - 1, V]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].float(), dim=-1)


def env_with_teacher(tiny_model: Path, url: str, out: Path, top_k: int) -> OneWordDistillEnv:
    config, servers = OneWordDistillEnv.config_init()
    config = config.model_copy(
        update={
            "tokenizer_name": str(tiny_model),
            "group_size": 2,
            "data_path_to_save_groups": str(out),
            "teacher_base_url": f"{url}/env/teacher/v1",
            "teacher_top_k": top_k,
        }
    )
    return OneWordDistillEnv(config, servers, slurm=False, testing=True)


def posted_groups() -> list[dict[str, Any]]:
    return [
        {"tokens": [[257, 72, 105, 33], [257, 72, 105, 63]], "masks": [[X, X, 105, 33], [X, X, 105, 63]],
         "scores": [1.0, 0.0]},
        {"tokens": [[257, 65, 66], [257, 65, 67]], "masks": [[X, 66, 66], [X, 67, 67]], "scores": [0.5, 0.5]},
    ]  # fmt: skip


def post(env: OneWordDistillEnv, groups: list[dict]) -> None:
    asyncio.run(env.handle_send_to_api(groups, do_send_to_api=False, abort_on_any_max_length_exceeded=False))
    env.jsonl_writer.close()


@pytest.mark.parametrize("top_k", [0, 3])
def test_every_posted_group_carries_the_teachers_fields(
    teacher_endpoint: tuple[InferenceEndpoint, CountingTeacher], tiny_model: Path, tmp_path: Path, top_k: int
) -> None:
    endpoint, backend = teacher_endpoint
    calls_before = backend.calls
    env = env_with_teacher(tiny_model, endpoint.url, tmp_path / "groups.jsonl", top_k)
    post(env, posted_groups())
    # the second group's scores are all equal: BaseEnv drops it, and it is never sent to the teacher
    assert backend.calls - calls_before == 2
    lines = [json.loads(line) for line in (tmp_path / "groups.jsonl").read_text().splitlines()]
    assert len(lines) == 1
    group = validate_group(lines[0], vocab_size=AutoTokenizer.from_pretrained(tiny_model).vocab_size + 10)
    assert group.distill_top_k == (top_k or 1)
    for tokens, ids, lps in zip(group.tokens, group.distill_token_ids, group.distill_logprobs, strict=True):
        expected = forward_logprobs(tiny_model, tokens)
        assert ids[0] == [] and lps[0] == []
        for p in range(1, len(tokens)):
            row = expected[p - 1]
            if top_k == 0:
                assert ids[p] == [tokens[p]]
                assert lps[p] == pytest.approx([float(row[tokens[p]])], abs=1e-4)
            else:
                assert ids[p] == row.topk(top_k).indices.tolist()
                assert lps[p] == pytest.approx(row.topk(top_k).values.tolist(), abs=1e-4)
    assert env.teacher_failures == 0
    assert endpoint.traffic.snapshot()["envs"]["teacher"]["routes"]["/generate"]["200"] >= 2


def test_the_trainer_turns_them_into_verls_teacher_tensors(
    teacher_endpoint: tuple[InferenceEndpoint, CountingTeacher], tiny_model: Path, tmp_path: Path
) -> None:
    """JSONL → schema → the trainer's conversion: the teacher log-prob of each sampled response token is the forward
    pass's, in the row that predicts it."""
    endpoint, _ = teacher_endpoint
    env = env_with_teacher(tiny_model, endpoint.url, tmp_path / "groups.jsonl", top_k=0)
    post(env, posted_groups()[:1])
    group = validate_group(json.loads((tmp_path / "groups.jsonl").read_text().splitlines()[0]))
    batch = scored_data_to_dataproto([group], max_prompt_length=2, max_response_length=2, pad_token_id=0)
    t = teacher_tensors([group], max_prompt_length=2, max_response_length=2, pad_token_id=0, top_k=None)
    assert t.mask.tolist() == [[1.0, 1.0], [1.0, 1.0]]
    for row, tokens in enumerate(group.tokens):
        expected = forward_logprobs(tiny_model, tokens)
        responses = batch.batch["responses"][row].tolist()
        for r, token in enumerate(responses):
            column = 2 - 1 + r  # the row that predicts response token r (prompt width 2)
            assert int(t.ids[row, column, 0]) == token
            assert float(t.logprobs[row, column, 0]) == pytest.approx(float(expected[column, token]), abs=1e-4)


def test_a_failing_teacher_leaves_the_group_to_train_as_rl(tiny_model: Path, tmp_path: Path) -> None:
    env = env_with_teacher(tiny_model, "http://127.0.0.1:9", tmp_path / "groups.jsonl", top_k=0)
    env.config.teacher_timeout_s = 2.0
    post(env, posted_groups()[:1])
    line = json.loads((tmp_path / "groups.jsonl").read_text().splitlines()[0])
    assert not line.get("distill_token_ids") and env.teacher_failures == 1


@pytest.mark.timeout(180)
def test_the_teacher_command_serves_prompt_logprobs_until_stopped(tiny_model: Path, tmp_path: Path) -> None:
    """``python -m recipe.atropos.endpoint.teacher``: the ready file names its URL; SIGTERM stops it."""
    import subprocess
    import sys
    import time

    import requests

    ready = tmp_path / "teacher.json"
    argv = [
        sys.executable,
        "-m",
        "recipe.atropos.endpoint.teacher",
        "--model",
        str(tiny_model),
        "--ready-file",
        str(ready),
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=(tmp_path / "teacher.log").open("w"))
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert ready.exists(), (tmp_path / "teacher.log").read_text()[-2000:]
        url = json.loads(ready.read_text())["url"]
        body = {"prompt": {"prompt_token_ids": [257, 72, 105]}, "max_tokens": 1, "prompt_logprobs": 2}
        rows = requests.post(f"{url}/generate", json=body, timeout=60).json()["prompt_logprobs"]
        assert rows[0] is None and all(2 <= len(row) <= 3 for row in rows[1:])
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0
