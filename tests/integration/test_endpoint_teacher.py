"""The inference endpoint as a distillation teacher: ``POST /generate`` with ``prompt_logprobs: k`` answers as vLLM
does, so atroposlib's own ``VLLMServer.get_logprobs(input_ids=..., top_k=k)`` reads it; the hf_cpu rollout server
answers verl's teacher contract (what verl's teacher manager asks of a vLLM server). Values are checked against a
forward pass of the tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipe.atropos.endpoint.backends import Completion, SamplingParams, from_verl_prompt_logprobs
from recipe.atropos.endpoint.server import InferenceEndpoint

PROMPT = [257, 72, 101, 108, 108, 111, 33]  # the tiny tokenizer is byte-level: one token per character


def forward_logprobs(model_dir: Path, ids: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits over ``ids``: row j is the distribution of token j + 1 [L - 1, V]."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, dim=-1)


@pytest.fixture(scope="module")
def teacher(tiny_model: Path) -> Iterator[tuple[Any, InferenceEndpoint]]:
    """An hf_cpu rollout server (a Ray actor) behind an endpoint, as the trainer wires a replica."""
    import ray

    from recipe.atropos.cpu.hf_cpu import HFCPURolloutServer
    from recipe.atropos.endpoint.backends import RayReplicaBackend

    tok = AutoTokenizer.from_pretrained(tiny_model)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        server = HFCPURolloutServer.remote(str(tiny_model), 8)
        ray.get(server.stats.remote())
        backend = RayReplicaBackend([server], [tok.eos_token_id])
        endpoint = InferenceEndpoint(
            backend, port=0, max_tokens_cap=8, eos_token_ids=[tok.eos_token_id], tokenizer=tok, policy_version=0,
            served_model_name=str(tiny_model),
        ).start()  # fmt: skip
        try:
            yield server, endpoint
        finally:
            endpoint.stop()
    finally:
        ray.shutdown()


def test_atroposlibs_get_logprobs_reads_the_top_k_and_the_prompt_token(
    teacher: tuple[Any, InferenceEndpoint], tiny_model: Path
) -> None:
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    _, endpoint = teacher
    config = APIServerConfig(
        server_type="vllm", base_url=f"{endpoint.url}/env/distiller/v1", model_name=str(tiny_model), api_key="x",
        health_check=False,
    )  # fmt: skip
    payload = asyncio.run(VLLMServer(config).get_logprobs(input_ids=PROMPT, top_k=3))
    expected = forward_logprobs(tiny_model, PROMPT)
    assert payload["prompt_tokens"] == PROMPT
    ids, lps = payload["prompt_topk_token_ids"], payload["prompt_topk_logprobs"]
    assert len(ids) == len(lps) == len(PROMPT)
    assert ids[0] == [] and lps[0] == []  # nothing predicts the first token (vLLM's None)
    for p in range(1, len(PROMPT)):
        row = expected[p - 1]
        top = row.topk(3)
        assert ids[p][:3] == top.indices.tolist()  # the top-k, most likely first
        assert lps[p][:3] == pytest.approx(top.values.tolist(), abs=1e-4)
        # vLLM's rule: the prompt token too, when it is not among the top-k
        assert len(ids[p]) == (3 if PROMPT[p] in ids[p][:3] else 4)
        own = dict(zip(ids[p], lps[p], strict=True))[PROMPT[p]]
        assert own == pytest.approx(float(row[PROMPT[p]]), abs=1e-4)
    assert endpoint.traffic.snapshot()["envs"]["distiller"]["routes"]["/generate"] == {"200": 1}


def test_prompt_logprobs_zero_is_the_prompt_tokens_own(
    teacher: tuple[Any, InferenceEndpoint], tiny_model: Path
) -> None:
    _, endpoint = teacher
    body = {"prompt": {"prompt_token_ids": PROMPT}, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0}
    answer = requests.post(f"{endpoint.url}/generate", json=body, timeout=60).json()
    expected = forward_logprobs(tiny_model, PROMPT)
    rows = answer["prompt_logprobs"]
    assert rows[0] is None and len(rows) == len(PROMPT)
    for p in range(1, len(PROMPT)):
        assert list(rows[p]) == [str(PROMPT[p])]
        assert rows[p][str(PROMPT[p])] == pytest.approx(float(expected[p - 1, PROMPT[p]]), abs=1e-4)
    assert len(answer["token_ids"][0]) == 1  # the samples are served as usual


def test_the_hf_cpu_server_answers_verls_teacher_contract(
    teacher: tuple[Any, InferenceEndpoint], tiny_model: Path
) -> None:
    """What verl's teacher manager (``compute_teacher_logprobs_single``) asks and asserts: one row per sequence token,
    row j for token j + 1 ranked, the last row a dummy."""
    import ray

    server, _ = teacher
    params = {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 2, "detokenize": False}
    out = ray.get(server.generate.remote(prompt_ids=PROMPT, sampling_params=params, request_id="t"))
    teacher_ids = torch.tensor(out.extra_fields["prompt_ids"], dtype=torch.int32)
    teacher_lps = torch.tensor(out.extra_fields["prompt_logprobs"])
    assert teacher_ids.shape == teacher_lps.shape == (len(PROMPT), 2)
    expected = forward_logprobs(tiny_model, PROMPT).topk(2)
    assert teacher_ids[:-1].tolist() == expected.indices.tolist()
    torch.testing.assert_close(teacher_lps[:-1], expected.values, atol=1e-4, rtol=0)
    assert teacher_ids[-1].tolist() == [0, 0] and teacher_lps[-1].tolist() == [0.0, 0.0]


def test_from_verls_rows_to_vllms_answer_by_hand() -> None:
    # prompt [5, 6, 7]; rows: token 6 (top-2 [6, 9]), token 7 (top-2 [8, 9], 7 outside), dummy
    rows = from_verl_prompt_logprobs(
        [5, 6, 7], [[6, 9], [8, 9], [0, 0]], [[-0.1, -2.0], [-0.5, -1.0], [0.0, 0.0]], [-0.1, -3.0, 0.0], k=2
    )
    assert rows == [None, {6: -0.1, 9: -2.0}, {8: -0.5, 9: -1.0, 7: -3.0}]
    assert from_verl_prompt_logprobs([5, 6], [[6]], [[-0.1]], [-0.1], k=0) == [None, {6: -0.1}]


class NoPromptLogprobs:
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        return Completion([1], [-0.5], "length")


def test_a_backend_without_prompt_logprobs_is_refused_naming_the_field(tiny_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    endpoint = InferenceEndpoint(NoPromptLogprobs(), port=0, max_tokens_cap=4, tokenizer=tok).start()
    try:
        body = {"prompt": {"prompt_token_ids": PROMPT}, "prompt_logprobs": 2}
        answer = requests.post(f"{endpoint.url}/generate", json=body, timeout=30)
        assert answer.status_code == 422 and "prompt_logprobs" in answer.json()["error"]
        too_many = {"prompt": {"prompt_token_ids": PROMPT}, "prompt_logprobs": 100_000}
        assert requests.post(f"{endpoint.url}/generate", json=too_many, timeout=30).status_code == 422
    finally:
        endpoint.stop()
