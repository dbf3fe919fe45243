"""The inference endpoint's OpenAI routes (``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``) and its
per-route / per-env counters, over real HTTP, driven by atroposlib's own clients (``VLLMServer``, ``OpenAIServer``,
``ManagedServer``) and the ``openai`` client through the launcher's per-env base URL ``/env/<name>/v1``.

A scripted stand-in backend makes text, stop strings and log-probs checkable by hand (the tiny model's tokenizer is
byte-level: one token per character); the last test goes through the real hf_cpu rollout server (a Ray actor) and
checks the served log-probs against a forward pass of the tiny model."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import requests
from openai.types.chat import ChatCompletion
from openai.types.completion import Completion
from transformers import AutoTokenizer

from recipe.atropos.endpoint import backends
from recipe.atropos.endpoint.backends import SamplingParams, finish_reason
from recipe.atropos.endpoint.server import InferenceEndpoint

TOKEN = "t0ken"
REPLY = "Hi there. Bye"  # the stand-in's answer to every prompt, then EOS
VERSION = 7


class Scripted:
    """Answers every prompt with REPLY + EOS (cut at max_tokens), log-prob -(j+1)/10 at position j; records calls."""

    def __init__(self, tokenizer: Any) -> None:
        self.reply = tokenizer.encode(REPLY, add_special_tokens=False) + [tokenizer.eos_token_id]
        self.eos = tokenizer.eos_token_id
        self.calls: list[tuple[list[int], SamplingParams]] = []

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> backends.Completion:
        self.calls.append((list(prompt_ids), params))
        ids = self.reply[: params.max_tokens]
        logprobs = [-(j + 1) / 10 for j in range(len(ids))]
        return backends.Completion(ids, logprobs, finish_reason(ids, params.max_tokens, [self.eos]))


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Any:
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture()
def backend(tok: Any) -> Scripted:
    return Scripted(tok)


@pytest.fixture()
def endpoint(backend: Scripted, tok: Any, tiny_model: Path) -> Iterator[InferenceEndpoint]:
    endpoint = InferenceEndpoint(
        backend, port=0, max_tokens_cap=16, eos_token_ids=[tok.eos_token_id], tokenizer=tok, policy_version=VERSION,
        api_key=TOKEN, served_model_name=str(tiny_model),
    ).start()  # fmt: skip
    try:
        yield endpoint
    finally:
        endpoint.stop()


def env_url(endpoint: InferenceEndpoint, env: str = "testenv") -> str:
    return f"{endpoint.url}/env/{env}/v1"


def atropos_config(endpoint: InferenceEndpoint, tiny_model: Path, server_type: str = "vllm") -> Any:
    from atroposlib.envs.server_handling.server_baseline import APIServerConfig

    # what the launcher gives an env: the model path as model and tokenizer name, the endpoint's token
    return APIServerConfig(
        server_type=server_type, base_url=env_url(endpoint), model_name=str(tiny_model), api_key=TOKEN,
        health_check=False,
    )  # fmt: skip


def vllm_client(endpoint: InferenceEndpoint, tiny_model: Path) -> Any:
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    return VLLMServer(atropos_config(endpoint, tiny_model))


def openai_client(endpoint: InferenceEndpoint, api_key: str = TOKEN) -> openai.AsyncClient:
    return openai.AsyncClient(base_url=env_url(endpoint), api_key=api_key, max_retries=0)


def chat_prompt_ids(tok: Any, content: str) -> list[int]:
    return tok.encode(f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)


def test_chat_completion_through_atroposlib_n_logprobs_ledger(
    endpoint: InferenceEndpoint, backend: Scripted, tok: Any, tiny_model: Path
) -> None:
    client = vllm_client(endpoint, tiny_model)
    messages = [{"role": "user", "content": "hi"}]
    answer = asyncio.run(client.chat_completion(messages=messages, n=4, max_tokens=5, logprobs=True, top_logprobs=3))
    prompt = chat_prompt_ids(tok, "hi")
    assert [call[0] for call in backend.calls] == [prompt] * 4  # the chat template, encoded without special tokens
    assert all(call[1].max_tokens == 5 for call in backend.calls)
    assert len(answer.choices) == 4 and [c.index for c in answer.choices] == [0, 1, 2, 3]
    assert answer.object == "chat.completion" and answer.model == str(tiny_model) and answer.id.startswith("chatcmpl-")
    for choice in answer.choices:
        assert choice.message.role == "assistant" and choice.message.content == "Hi th"
        assert choice.finish_reason == "length"
        content = choice.logprobs.content
        assert [c.token for c in content] == list("Hi th") and [c.bytes for c in content] == [
            [ord(ch)] for ch in "Hi th"
        ]
        assert [c.logprob for c in content] == pytest.approx([-0.1, -0.2, -0.3, -0.4, -0.5])
        # only the sampled token's log-prob is known: it is the single top entry
        assert [[(t.token, t.logprob) for t in c.top_logprobs] for c in content] == [
            [(c.token, c.logprob)] for c in content
        ]
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (
        len(prompt), 20, len(prompt) + 20,
    )  # fmt: skip
    assert endpoint.ledger.version_of(prompt + backend.reply[:5]) == VERSION
    assert endpoint.stats["completions"] == 4 and endpoint.stats["requests"] == 1

    # no logprobs asked: none answered; whole reply: EOS dropped from the text, finish "stop"
    answer = asyncio.run(client.chat_completion(messages=messages, max_tokens=16))
    assert answer.choices[0].message.content == REPLY and answer.choices[0].finish_reason == "stop"
    assert answer.choices[0].logprobs is None and answer.usage.completion_tokens == len(backend.reply)


def test_completion_stop_logprobs_prompt_forms_and_seed(
    endpoint: InferenceEndpoint, backend: Scripted, tok: Any, tiny_model: Path
) -> None:
    client = vllm_client(endpoint, tiny_model)
    answer = asyncio.run(client.completion(prompt="abc", n=2, max_tokens=16, stop=[" B", "."], logprobs=1, seed=11))
    assert [call[0] for call in backend.calls] == [tok.encode("abc")] * 2
    assert sorted(call[1].seed for call in backend.calls) == [11, 12]  # the i-th of n samples: seed + i (vLLM)
    assert answer.object == "text_completion" and len(answer.choices) == 2
    kept = backend.reply[:9]  # "Hi there.": the token that completed the first stop string ends the completion
    for choice in answer.choices:
        assert choice.text == "Hi there" and choice.finish_reason == "stop"
        assert choice.model_extra["stop_reason"] == "."
        assert choice.logprobs.tokens == list("Hi there.")
        assert choice.logprobs.token_logprobs == pytest.approx([-(j + 1) / 10 for j in range(9)])
        assert choice.logprobs.top_logprobs == [{ch: pytest.approx(-(j + 1) / 10)} for j, ch in enumerate("Hi there.")]
        assert choice.logprobs.text_offset == list(range(9))
    assert answer.usage.completion_tokens == 18
    # the ledger records the tokens of the text the env got back ("Hi there"), which it re-tokenises for training
    assert endpoint.ledger.version_of(tok.encode("abc") + kept[:8]) == VERSION
    assert endpoint.ledger.version_of(tok.encode("abc") + kept) is None

    async def more() -> list[Any]:
        oa = openai_client(endpoint)
        return [
            await oa.completions.create(model=str(tiny_model), prompt=[5, 6, 7], max_tokens=2, stop="Hi"),
            await oa.completions.create(model=str(tiny_model), prompt=["xy"], max_tokens=3, temperature=0),
            await oa.completions.create(
                model=str(tiny_model), prompt=[[5, 6]], max_tokens=9, stop=".", extra_body={
                    "include_stop_str_in_output": True, "return_tokens_as_token_ids": True}, logprobs=0,
            ),
        ]  # fmt: skip

    backend.calls.clear()
    by_ids, by_text_list, kept_stop = asyncio.run(more())
    assert [call[0] for call in backend.calls] == [[5, 6, 7], tok.encode("xy"), [5, 6]]
    assert by_ids.choices[0].text == "" and by_ids.choices[0].finish_reason == "stop"  # "Hi" stops at once
    assert by_ids.usage.completion_tokens == 2 and by_text_list.choices[0].text == "Hi " and by_text_list.usage
    assert backend.calls[1][1].temperature == 0.0 and backend.calls[1][1].seed is None
    assert kept_stop.choices[0].text == "Hi there." and kept_stop.choices[0].finish_reason == "stop"
    assert kept_stop.choices[0].logprobs.tokens == [f"token_id:{t}" for t in kept]
    assert endpoint.ledger.version_of([5, 6] + kept) == VERSION  # the stop string was answered: recorded too
    assert endpoint.ledger.version_of([5, 6, 7]) == VERSION  # "Hi" stopped it at once: an empty answer


def test_max_tokens_capped_and_counted_like_generate(
    endpoint: InferenceEndpoint, backend: Scripted, tiny_model: Path
) -> None:
    async def ask() -> list[Any]:
        oa = openai_client(endpoint)
        messages = [{"role": "user", "content": "x"}]
        return [
            await oa.chat.completions.create(
                model=str(tiny_model),
                messages=messages,
                max_tokens=100,
                temperature=0.5,
                top_p=0.9,
                extra_body={"top_k": 5},
            ),  # fmt: skip
            await oa.chat.completions.create(model=str(tiny_model), messages=messages, max_completion_tokens=3),
            await oa.completions.create(model=str(tiny_model), prompt="x", max_tokens=40, extra_body={"top_k": 0}),
            await oa.completions.create(model=str(tiny_model), prompt="x"),  # none: the cap, not counted
        ]

    answers = asyncio.run(ask())
    assert [call[1].max_tokens for call in backend.calls] == [16, 3, 16, 16]
    assert endpoint.stats["capped_max_tokens"] == 2
    first, third = backend.calls[0][1], backend.calls[2][1]
    assert (first.temperature, first.top_p, first.top_k) == (0.5, 0.9, 5)
    assert (third.temperature, third.top_p, third.top_k) == (1.0, 1.0, -1)  # defaults; top_k 0 is off, as -1
    assert answers[1].choices[0].finish_reason == "length" and answers[1].choices[0].message.content == "Hi "
    assert answers[0].choices[0].finish_reason == "stop"  # the reply (14 tokens) fits the cap


def test_models_wrong_model_and_refused_options_through_the_openai_client(
    endpoint: InferenceEndpoint, backend: Scripted, tok: Any, tiny_model: Path
) -> None:
    from atroposlib.envs.server_handling.openai_server import OpenAIServer

    async def run() -> None:
        oa = openai_client(endpoint)
        models = await oa.models.list()
        assert [m.id for m in models.data] == [str(tiny_model)] and models.data[0].object == "model"
        messages = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            await oa.chat.completions.create(model="gpt-4o", messages=messages)
        with pytest.raises(openai.UnprocessableEntityError, match="echo"):
            await oa.completions.create(model=str(tiny_model), prompt="x", echo=True)
        with pytest.raises(openai.UnprocessableEntityError, match="presence_penalty"):
            await oa.chat.completions.create(model=str(tiny_model), messages=messages, presence_penalty=0.5)
        with pytest.raises(openai.UnprocessableEntityError, match="prompts in one request"):
            await oa.completions.create(model=str(tiny_model), prompt=["a", "b"])
        with pytest.raises(openai.UnprocessableEntityError, match="tool calls are not parsed"):
            await oa.chat.completions.create(model=str(tiny_model), messages=messages, tools=[{"type": "function",
                "function": {"name": "f", "parameters": {}}}])  # fmt: skip
        with pytest.raises(openai.AuthenticationError):
            await openai_client(endpoint, api_key="wrong").models.list()
        # neutral values of the refused options are fine; content as text parts too
        parts = [{"role": "user", "content": [{"type": "text", "text": "h"}, {"type": "text", "text": "i"}]}]
        ok = await oa.chat.completions.create(model=str(tiny_model), messages=parts, presence_penalty=0, max_tokens=2)
        assert ok.choices[0].message.content == "Hi"
        # atroposlib's plain OpenAI server type, against the same URL
        server = OpenAIServer(atropos_config(endpoint, tiny_model, server_type="openai"))
        answer = await server.chat_completion(messages=messages, n=2, max_tokens=4)
        assert [c.message.content for c in answer.choices] == ["Hi t", "Hi t"]

    asyncio.run(run())
    assert backend.calls[0][0] == chat_prompt_ids(tok, "h\ni")
    assert endpoint.stats["failed_requests"] == 5 and endpoint.stats["completions"] == 3


def test_a_chat_request_waits_for_a_weight_update_and_is_recorded_with_the_new_version(
    endpoint: InferenceEndpoint, backend: Scripted, tok: Any, tiny_model: Path
) -> None:
    endpoint.pause()
    result: dict[str, Any] = {}
    body = {"model": str(tiny_model), "messages": [{"role": "user", "content": "q"}], "n": 2, "max_tokens": 3}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    url = f"{env_url(endpoint)}/chat/completions"
    thread = threading.Thread(
        target=lambda: result.update(r=requests.post(url, json=body, headers=headers, timeout=30))
    )
    thread.start()
    thread.join(0.5)
    assert thread.is_alive() and not backend.calls  # held by the gate
    endpoint.resume(VERSION + 1)
    thread.join(30)
    assert result["r"].status_code == 200 and len(result["r"].json()["choices"]) == 2
    assert endpoint.ledger.version_of(chat_prompt_ids(tok, "q") + backend.reply[:3]) == VERSION + 1


def test_generate_and_managed_server_unchanged_under_the_env_prefix(
    endpoint: InferenceEndpoint, backend: Scripted, tok: Any, tiny_model: Path
) -> None:
    from atroposlib.envs.server_handling.managed_server import ManagedServer

    client = vllm_client(endpoint, tiny_model)
    prompt_ids, tokens, logprobs, reasons = asyncio.run(
        client.tokens_and_logprobs_completion(input_ids=[9, 3], n=3, max_tokens=4)
    )
    assert prompt_ids == [9, 3] and tokens == [backend.reply[:4]] * 3 and reasons == ["length"] * 3
    assert logprobs == [pytest.approx([-0.1, -0.2, -0.3, -0.4])] * 3
    body = {"prompt": {"prompt_token_ids": [1, 2]}, "n": 1, "max_tokens": 2}
    plain = requests.post(f"{endpoint.url}/generate", json=body, headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert plain == {
        "text": ["Hi"], "prompt": tok.decode([1, 2]), "prompt_token_ids": [1, 2], "token_ids": [backend.reply[:2]],
        "logprobs": [[[{str(backend.reply[0]): -0.1}], [{str(backend.reply[1]): -0.2}]]], "finish_reasons": ["length"],
        "policy_version": VERSION, "policy_versions": [VERSION],
    }  # fmt: skip

    async def managed() -> Any:
        server = ManagedServer(client, tokenizer=tok)
        answer = await server.chat_completion(messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=16)
        return answer, server.get_state()

    answer, state = asyncio.run(managed())
    assert [c.message.content for c in answer.choices] == [REPLY, REPLY]
    node = state["nodes"][0]
    prompt = chat_prompt_ids(tok, "hi")
    assert node.tokens == prompt + backend.reply and node.logprobs[len(prompt) :] == pytest.approx(
        [-(j + 1) / 10 for j in range(len(backend.reply))]
    )
    assert endpoint.ledger.version_of(node.tokens) == VERSION
    envs = requests.get(f"{endpoint.url}/health", timeout=5).json()["stats"]["envs"]
    assert envs["testenv"]["completions"] == 3 + 2 and envs["testenv"]["routes"] == {"/generate": {"200": 2}}


def test_routes_and_envs_counted_in_health(endpoint: InferenceEndpoint, tiny_model: Path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    chat = {"model": str(tiny_model), "messages": [{"role": "user", "content": "hi"}], "n": 2, "max_tokens": 2}
    base = endpoint.url
    assert requests.post(f"{base}/env/testenv/v1/chat/completions", json=chat, timeout=10).status_code == 401
    answer = requests.post(f"{base}/env/testenv/v1/chat/completions", json=chat, headers=auth, timeout=10)
    assert answer.status_code == 200
    assert len(ChatCompletion.model_validate(answer.json(), strict=True).choices) == 2  # the openai types, validated
    assert requests.post(f"{base}/env/testenv/v1/nope", json={}, headers=auth, timeout=10).status_code == 404
    assert requests.get(f"{base}/env/testenv/health", timeout=10).status_code == 200  # open, and not counted
    body = {"prompt": {"prompt_token_ids": [1]}, "n": 3, "max_tokens": 1}
    assert requests.post(f"{base}/generate", json=body, headers=auth, timeout=10).status_code == 200
    assert requests.get(f"{base}/v1/models", headers=auth, timeout=10).status_code == 200
    completion = {"model": str(tiny_model), "prompt": "x", "max_tokens": 3, "logprobs": 1, "stop": " "}
    answer = requests.post(f"{base}/v1/completions", json=completion, headers=auth, timeout=10)
    assert Completion.model_validate(answer.json(), strict=True).choices[0].text == "Hi"
    wrong = {"model": "nope", "prompt": "x"}
    assert requests.post(f"{base}/env/eval/v1/completions", json=wrong, headers=auth, timeout=10).status_code == 404
    assert requests.get(f"{base}/env/my%20env/v1/models", headers=auth, timeout=10).status_code == 200

    health = requests.get(f"{base}/health", timeout=10).json()
    assert {"status", "policy_version", "paused", "final", "stats"} <= set(health)
    stats = health["stats"]
    assert stats["routes"] == {
        "/v1/chat/completions": {"401": 1, "200": 1},
        "/v1/nope": {"404": 1},
        "/generate": {"200": 1},
        "/v1/models": {"200": 2},
        "/v1/completions": {"200": 1, "404": 1},
    }
    assert stats["envs"] == {
        "testenv": {"routes": {"/v1/chat/completions": {"401": 1, "200": 1}, "/v1/nope": {"404": 1}}, "completions": 2},
        "eval": {"routes": {"/v1/completions": {"404": 1}}, "completions": 0},
        "my env": {"routes": {"/v1/models": {"200": 1}}, "completions": 0},
    }
    assert (stats["requests"], stats["completions"], stats["failed_requests"]) == (4, 6, 1)
    assert stats["unauthorized_requests"] == 1
    assert all(isinstance(v, int | float) for v in endpoint.counters().values())  # per-step metrics stay numbers

    with requests.Session() as session:  # at most 64 distinct paths; the rest count under "other"
        for i in range(70):
            session.get(f"{base}/env/x/junk{i}", headers=auth, timeout=10)
    stats = requests.get(f"{base}/health", timeout=10).json()["stats"]
    assert len(stats["routes"]) == 65 and stats["routes"]["other"] == {"404": 70 - (64 - 5)}
    assert stats["routes"]["/v1/chat/completions"] == {"401": 1, "200": 1}  # known paths keep counting
    assert len(stats["envs"]["x"]["routes"]) == 65


# ---- the real hf_cpu backend ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_cpu_backend(tiny_model: Path) -> Iterator[Any]:
    import ray

    from recipe.atropos.cpu.hf_cpu import HFCPURolloutServer
    from recipe.atropos.endpoint.backends import RayReplicaBackend

    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        server = HFCPURolloutServer.remote(str(tiny_model), 8)
        ray.get(server.stats.remote())
        tok = AutoTokenizer.from_pretrained(tiny_model)
        yield RayReplicaBackend([server], [tok.eos_token_id])
    finally:
        ray.shutdown()


def test_chat_and_completions_through_the_real_hf_cpu_backend(hf_cpu_backend: Any, tok: Any, tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    from tests.integration.test_runtime import forward_logprobs

    endpoint = InferenceEndpoint(
        hf_cpu_backend, port=0, max_tokens_cap=8, eos_token_ids=[tok.eos_token_id], tokenizer=tok, policy_version=3,
        served_model_name=str(tiny_model),
    ).start()  # fmt: skip

    async def run() -> tuple[Any, Any]:
        oa = openai.AsyncClient(base_url=f"{endpoint.url}/env/real/v1", api_key="x", max_retries=0)
        chat = await oa.chat.completions.create(
            model=str(tiny_model), messages=[{"role": "user", "content": "hi"}], n=4, max_tokens=20, logprobs=True,
            extra_body={"return_tokens_as_token_ids": True, "skip_special_tokens": False},
        )  # fmt: skip
        completion = await oa.completions.create(model=str(tiny_model), prompt=[257, 84], max_tokens=5, logprobs=1)
        return chat, completion

    try:
        chat, completion = asyncio.run(run())
    finally:
        endpoint.stop()
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    prompt = chat_prompt_ids(tok, "hi")
    assert len(chat.choices) == 4
    for choice in chat.choices:
        ids = [int(c.token.split(":", 1)[1]) for c in choice.logprobs.content]
        assert 1 <= len(ids) <= 8  # capped at max_tokens_cap
        assert choice.message.content == tok.decode(ids)
        assert choice.finish_reason == ("stop" if ids[-1] == tok.eos_token_id else "length")
        served = [c.logprob for c in choice.logprobs.content]
        assert served == pytest.approx(forward_logprobs(model, prompt, ids, 1.0), abs=1e-4)
        assert endpoint.ledger.version_of(prompt + ids) == 3
    assert chat.usage.completion_tokens == sum(len(c.logprobs.content) for c in chat.choices)
    assert len(completion.choices[0].logprobs.tokens) == completion.usage.completion_tokens <= 5
    assert endpoint.stats["capped_max_tokens"] == 1 and endpoint.stats["completions"] == 5
    assert endpoint.traffic.snapshot()["envs"]["real"]["completions"] == 5


def test_each_refusal_reason_is_logged_once(
    endpoint: InferenceEndpoint, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The console's 422 hint sends the user to the trainer's log: each distinct reason is there, once."""
    body = {"model": str(tiny_model), "prompt": ""}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with caplog.at_level(logging.WARNING, logger="recipe.atropos.endpoint.server"):
        for _ in range(3):
            answer = requests.post(f"{env_url(endpoint)}/completions", json=body, headers=headers, timeout=5)
            assert answer.status_code == 422
    refusals = [r.getMessage() for r in caplog.records if "refused a request" in r.getMessage()]
    assert refusals == ["inference endpoint refused a request (422) /v1/completions: prompt: empty (logged once)"]
