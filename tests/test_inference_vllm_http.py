"""The vLLM HTTP path of the inference endpoint, against a stand-in for a GPU vLLM server.

vLLM cannot run on this CPU machine, so `FakeVLLMOpenAIServer` (named as a stand-in) replays the response shape a
vLLM OpenAI server returns for `/v1/completions` with `logprobs` and `return_tokens_as_token_ids` (recorded from
vLLM's `CompletionResponse`: `choices[i].logprobs.{tokens, token_logprobs, top_logprobs, text_offset}`). Everything
else is real: HTTP on 127.0.0.1, our endpoint, and atroposlib's own `VLLMServer` client parsing our answer.
"""

from __future__ import annotations

import asyncio
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import uvicorn
from fastapi import FastAPI, Request

from recipe.atropos.inference import InferenceEndpoint, SamplingParams, VLLMCompletionsBackend
from recipe.atropos.processes import free_port

# One choice as vLLM returns it (token ids spelled "token_id:<id>").
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


class FakeVLLMOpenAIServer:
    """GPU stand-in: answers /v1/completions with the recorded vLLM shape and remembers the request bodies."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.port = free_port()
        app = FastAPI()

        @app.post("/v1/completions")
        async def completions(request: Request) -> dict:
            body = await request.json()
            self.requests.append(body)
            return {
                "id": "cmpl-1",
                "object": "text_completion",
                "created": 0,
                "model": body["model"],
                "choices": [RECORDED_CHOICE],
                "usage": {"prompt_tokens": len(body["prompt"]), "completion_tokens": 3, "total_tokens": 0},
            }

        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> FakeVLLMOpenAIServer:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture()
def fake_vllm() -> Iterator[FakeVLLMOpenAIServer]:
    with FakeVLLMOpenAIServer() as server:
        yield server


def test_request_body_carries_token_ids_logprobs_and_sampling(fake_vllm: FakeVLLMOpenAIServer) -> None:
    backend = VLLMCompletionsBackend([f"127.0.0.1:{fake_vllm.port}"], model_name="m")
    params = SamplingParams(max_tokens=5, temperature=0.7, top_p=0.9, top_k=20)
    out = asyncio.run(backend.generate([1, 2, 3], params))
    body = fake_vllm.requests[-1]
    assert body["prompt"] == [1, 2, 3]
    assert body["model"] == "m"
    assert (body["max_tokens"], body["temperature"], body["top_p"], body["top_k"]) == (5, 0.7, 0.9, 20)
    assert body["logprobs"] == 1 and body["return_tokens_as_token_ids"] is True
    assert out.token_ids == [42, 7, 2]
    assert out.log_probs == [-0.25, -1.5, -0.125]
    assert out.finish_reason == "stop"


def test_choice_without_logprobs_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no logprobs"):
        VLLMCompletionsBackend.parse_choice({"text": "x", "finish_reason": "stop"})


def test_atroposlib_vllm_client_reads_our_endpoint_backed_by_vllm_http(fake_vllm: FakeVLLMOpenAIServer) -> None:
    from atroposlib.envs.server_handling.openai_server import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    from recipe.atropos.runtime.assets import build_tiny_model

    backend = VLLMCompletionsBackend([f"http://127.0.0.1:{fake_vllm.port}"], model_name="m")
    endpoint = InferenceEndpoint(backend, port=0, max_tokens_cap=8, eos_token_ids=[2], policy_version=3).start()
    try:
        assert requests.get(f"{endpoint.url}/health", timeout=5).json()["policy_version"] == 3
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = build_tiny_model(Path(tmp) / "tiny")
            server = VLLMServer(
                APIServerConfig(
                    server_type="vllm",
                    base_url=f"{endpoint.url}/v1",
                    model_name="m",
                    tokenizer_name=str(model_dir),
                    api_key="x",
                    health_check=False,
                )
            )
            prompt_ids, tokens, logprobs, reasons = asyncio.run(
                server.tokens_and_logprobs_completion(input_ids=[5, 6], n=2, max_tokens=4)
            )
        assert prompt_ids == [5, 6]
        assert tokens == [[42, 7, 2], [42, 7, 2]]
        assert logprobs == [[-0.25, -1.5, -0.125]] * 2
        assert reasons == ["stop", "stop"]
        # n=2 fans out to two backend calls; max_tokens is passed through under the cap
        assert len(fake_vllm.requests) == 2 and fake_vllm.requests[0]["max_tokens"] == 4
        assert endpoint.ledger.version_of([5, 6, 42, 7, 2]) == 3
    finally:
        endpoint.stop()
