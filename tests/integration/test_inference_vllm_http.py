"""The vLLM HTTP path of the inference endpoint.

Unit tests of the request we send and of the response parsing run everywhere. The rest run against a real vLLM
0.24.0 OpenAI server (its CPU build, ``.venv-vllm``; skipped where ``import vllm`` fails) serving the tiny model,
started by the test on 127.0.0.1: our ``VLLMCompletionsBackend``, our endpoint, and atroposlib's own ``VLLMServer``
client reading our answer. The log-probs vLLM returns are checked against the HF model's, computed here.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import torch

from recipe.atropos.endpoint.backends import SamplingParams, VLLMCompletionsBackend
from recipe.atropos.endpoint.server import InferenceEndpoint
from recipe.atropos.launcher.processes import ManagedProcess, free_port

requires_vllm = pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None, reason="needs vLLM's CPU build (make vllm-env)"
)

# One choice as vLLM 0.24.0 returns it for logprobs=1, return_tokens_as_token_ids=true (token ids spelled
# "token_id:<id>"), as recorded from the real server below.
RECORDED_CHOICE = {
    "index": 0,
    "text": "Paris",
    "logprobs": {
        "text_offset": [0, 1, 3],
        "token_logprobs": [-0.25, -1.5, -0.125],
        "tokens": ["token_id:42", "token_id:7", "token_id:2"],
        "top_logprobs": [{"token_id:42": -0.25}, {"token_id:7": -1.5}, {"token_id:2": -0.125}],
    },
    "finish_reason": "stop",
    "stop_reason": None,
    "prompt_logprobs": None,
}


# ---- unit: request and response shapes ----------------------------------------------------------------------
def test_request_body_carries_token_ids_logprobs_and_sampling() -> None:
    backend = VLLMCompletionsBackend(["127.0.0.1:1"], model_name="m")
    body = backend.request_body([1, 2, 3], SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, top_k=20))
    assert body["prompt"] == [1, 2, 3] and body["model"] == "m" and body["n"] == 1
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"]) == (5, 0.7, 0.9, 20)
    assert body["logprobs"] == 1 and body["return_tokens_as_token_ids"] is True


def test_choice_is_parsed_into_token_ids_and_logprobs() -> None:
    out = VLLMCompletionsBackend.parse_choice(RECORDED_CHOICE)
    assert out.token_ids == [42, 7, 2]
    assert out.log_probs == [-0.25, -1.5, -0.125]
    assert out.finish_reason == "stop"


def test_choice_without_logprobs_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no logprobs"):
        VLLMCompletionsBackend.parse_choice({"text": "x", "finish_reason": "stop"})


# ---- a real vLLM 0.24.0 server (CPU build) ------------------------------------------------------------------
SERVED_NAME = "tiny"
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def vllm_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``vllm serve``'s API server on the tiny model (fp32, eager, 1 GiB KV cache); yields its base URL."""
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny_model),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--enforce-eager",
        "--seed",
        "0",
    ]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    proc = ManagedProcess("vllm", argv, tmp_path_factory.mktemp("vllm") / "vllm.log").start()
    try:
        proc.wait_http(f"http://127.0.0.1:{port}/health", timeout=400)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.stop()


def hf_logprobs(model_dir: Path, prompt: list[int], completion: list[int]) -> list[float]:
    """log softmax of the HF model's logits (temperature 1) at each completion token, computed here."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1]  # [len(completion), V]
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(completion)), torch.tensor(completion)].tolist()


@pytest.mark.vllm
@requires_vllm
@pytest.mark.timeout(600)
def test_backend_against_real_vllm_returns_the_models_logprobs(vllm_server: str, tiny_model: Path) -> None:
    backend = VLLMCompletionsBackend([vllm_server], model_name=SERVED_NAME)
    prompt = [70, 71, 72, 73, 74]
    out = asyncio.run(backend.generate(prompt, SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0)))
    assert 1 <= len(out.token_ids) <= MAX_TOKENS and len(out.log_probs) == len(out.token_ids)
    assert out.finish_reason in ("stop", "length")
    expected = hf_logprobs(tiny_model, prompt, out.token_ids)
    assert max(abs(a - b) for a, b in zip(out.log_probs, expected, strict=True)) < 1e-3, (out.log_probs, expected)


@pytest.mark.vllm
@requires_vllm
@pytest.mark.timeout(600)
def test_unknown_model_name_is_an_error_naming_the_status(vllm_server: str) -> None:
    backend = VLLMCompletionsBackend([vllm_server], model_name="not-served")
    with pytest.raises(RuntimeError, match="answered 404"):
        asyncio.run(backend.generate([70, 71], SamplingParams(max_tokens=2)))


@pytest.mark.vllm
@requires_vllm
@pytest.mark.timeout(600)
def test_atroposlib_vllm_client_reads_our_endpoint_backed_by_real_vllm(vllm_server: str, tiny_model: Path) -> None:
    from atroposlib.envs.server_handling.openai_server import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    backend = VLLMCompletionsBackend([vllm_server], model_name=SERVED_NAME)
    endpoint = InferenceEndpoint(backend, port=0, max_tokens_cap=4, eos_token_ids=[2], policy_version=3).start()
    try:
        assert requests.get(f"{endpoint.url}/health", timeout=5).json()["policy_version"] == 3
        server = VLLMServer(
            APIServerConfig(
                server_type="vllm",
                base_url=f"{endpoint.url}/v1",
                model_name=SERVED_NAME,
                tokenizer_name=str(tiny_model),
                api_key="x",
                health_check=False,
            )
        )
        prompt_ids, tokens, logprobs, reasons = asyncio.run(
            server.tokens_and_logprobs_completion(input_ids=[70, 71, 72], n=2, max_tokens=MAX_TOKENS)
        )
        assert prompt_ids == [70, 71, 72]
        assert len(tokens) == len(logprobs) == len(reasons) == 2
        for toks, lps, reason in zip(tokens, logprobs, reasons, strict=True):
            assert 1 <= len(toks) <= 4  # max_tokens=6 was capped at the endpoint's max_tokens_cap
            assert len(lps) == len(toks) and all(lp <= 0 for lp in lps)
            assert reason in ("stop", "length")
            assert endpoint.ledger.version_of([70, 71, 72, *toks]) == 3
        assert endpoint.stats["capped_max_tokens"] == 1 and endpoint.stats["completions"] == 2
    finally:
        endpoint.stop()


@pytest.mark.vllm
@requires_vllm
@pytest.mark.timeout(600)
def test_openai_routes_of_our_endpoint_backed_by_real_vllm(vllm_server: str, tiny_model: Path) -> None:
    """atroposlib's ``chat_completion`` / ``completion`` (what most stock envs call) through our endpoint on the
    vllm_http backend: the choices, the cap, and each completion recorded under the endpoint's policy version."""
    from atroposlib.envs.server_handling.openai_server import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    backend = VLLMCompletionsBackend([vllm_server], model_name=SERVED_NAME)
    endpoint = InferenceEndpoint(
        backend,
        port=0,
        max_tokens_cap=4,
        eos_token_ids=[2],
        tokenizer=tok,
        policy_version=5,
        served_model_name=SERVED_NAME,
    ).start()
    try:
        server = VLLMServer(
            APIServerConfig(
                server_type="vllm",
                base_url=f"{endpoint.url}/env/stock/v1",
                model_name=SERVED_NAME,
                tokenizer_name=str(tiny_model),
                api_key="x",
                health_check=False,
            )
        )
        messages = [{"role": "user", "content": "hi"}]

        async def both() -> tuple:  # one event loop: the client's connections belong to it
            chat = await server.chat_completion(messages=messages, n=2, max_tokens=MAX_TOKENS, temperature=1.0)
            return chat, await server.completion(prompt="abc", n=3, max_tokens=3, temperature=1.0)

        chat, text = asyncio.run(both())
        assert len(chat.choices) == 2 and len(text.choices) == 3
        assert all(c.finish_reason in ("stop", "length") for c in [*chat.choices, *text.choices])
        assert chat.usage.completion_tokens <= 2 * 4  # max_tokens=6 capped at the endpoint's max_tokens_cap
        assert len(endpoint.ledger) == 5 and endpoint.stats["completions"] == 5
        health = requests.get(f"{endpoint.url}/health", timeout=5).json()["stats"]
        assert health["envs"]["stock"]["completions"] == 5
        assert health["routes"]["/v1/chat/completions"] == {"200": 1}
        assert health["routes"]["/v1/completions"] == {"200": 1}
    finally:
        endpoint.stop()
