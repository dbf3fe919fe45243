"""Who gets in (recipe.atropos.access), over real HTTP: the inference endpoint's bearer token (atroposlib's own
``VLLMServer`` sends it from ``--openai.api_key``) and the guarded API's client allow-list, both listening beyond
loopback on this machine's own address; and the refusals to start without them."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from recipe.atropos.access import API_KEY_ENV, inference_token
from recipe.atropos.endpoint.backends import Completion, SamplingParams
from recipe.atropos.endpoint.server import InferenceEndpoint
from recipe.atropos.guard.app import guard_argv
from recipe.atropos.guard.state import GuardSettings
from recipe.atropos.launcher.processes import ManagedProcess, free_port
from tests.helpers import host_address, http_ok, wait_until

TOKEN = "s3cret-token"


class EchoBackend:
    """Answers every prompt with its own first token, log-prob -0.5 (the access checks need no model)."""

    def __init__(self) -> None:
        self.calls = 0

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        self.calls += 1
        return Completion(token_ids=[prompt_ids[0]], log_probs=[-0.5], finish_reason="stop")


def test_token_comes_from_the_config_else_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert inference_token(None) is None
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert inference_token(None) == "from-env"
    assert inference_token("from-config") == "from-config"


def test_endpoint_beyond_loopback_asks_the_token_and_atroposlib_sends_it(
    caplog: pytest.LogCaptureFixture, tiny_model: Path
) -> None:
    from atroposlib.envs.server_handling.openai_server import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    backend = EchoBackend()
    endpoint = InferenceEndpoint(backend, host="0.0.0.0", port=0, max_tokens_cap=4, api_key=TOKEN).start()
    url = f"http://{host_address()}:{endpoint.port}"
    body = {"prompt": {"prompt_token_ids": [7, 8]}, "n": 2, "max_tokens": 4}
    try:
        with caplog.at_level(logging.WARNING, logger="recipe.atropos.access"):
            missing = requests.post(f"{url}/generate", json=body, timeout=10)
            wrong = requests.post(f"{url}/generate", json=body, headers={"Authorization": "Bearer nope"}, timeout=10)
        assert (missing.status_code, wrong.status_code) == (401, 401)
        assert "no Authorization header" in missing.json()["error"] and "wrong bearer token" in wrong.json()["error"]
        assert backend.calls == 0
        assert endpoint.stats["unauthorized_requests"] == 2
        refusals = [r for r in caplog.records if "refused a request" in r.getMessage()]
        assert len(refusals) == 1 and "atropos.inference.api_key" in refusals[0].getMessage()  # once per client

        # /health stays open (liveness, the launcher's wait); the token is accepted where it is sent
        assert requests.get(f"{url}/health", timeout=10).json()["status"] == "ok"
        good = requests.post(f"{url}/generate", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
        assert good.status_code == 200 and good.json()["token_ids"] == [[7], [7]]

        def client(api_key: str) -> VLLMServer:
            config = APIServerConfig(
                server_type="vllm",
                base_url=f"{url}/v1",
                model_name="m",
                tokenizer_name=str(tiny_model),  # the client loads one; a local one keeps the test offline
                api_key=api_key,
                health_check=False,
            )
            return VLLMServer(config)

        _, tokens, logprobs, _ = asyncio.run(
            client(TOKEN).tokens_and_logprobs_completion(input_ids=[9, 3], n=3, max_tokens=4)
        )
        assert tokens == [[9], [9], [9]] and logprobs == [[-0.5]] * 3
        with pytest.raises(Exception):  # noqa: B017 - atroposlib retries, then raises whatever it raises
            asyncio.run(client("x").tokens_and_logprobs_completion(input_ids=[9, 3], n=1, max_tokens=4))
        assert endpoint.stats["unauthorized_requests"] > 2 and backend.calls == 2 + 3
    finally:
        endpoint.stop()


def test_endpoint_refuses_to_listen_beyond_loopback_without_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    endpoint = InferenceEndpoint(EchoBackend(), host="0.0.0.0", port=0, max_tokens_cap=4)
    with pytest.raises(ValueError, match=r"atropos.inference.api_key \(or \$ATROPOS_INFERENCE_API_KEY\)"):
        endpoint.start()
    loopback = InferenceEndpoint(EchoBackend(), host="127.0.0.1", port=0, max_tokens_cap=4).start()
    try:  # on loopback no token is asked
        body = {"prompt": {"prompt_token_ids": [5]}, "max_tokens": 1}
        assert requests.post(f"{loopback.url}/generate", json=body, timeout=10).status_code == 200
    finally:
        loopback.stop()


def test_guarded_api_lets_in_only_its_allow_list(tmp_path: Path, no_leftovers: list[ManagedProcess]) -> None:
    outside = host_address()
    port = free_port("0.0.0.0")
    stats = tmp_path / "stats.json"
    argv = guard_argv(
        port, GuardSettings(vocab_size=100, batch_size=8, stats_file=stats), host="0.0.0.0", allow=["198.51.100.0/24"]
    )
    api = ManagedProcess("guarded-api", argv, tmp_path / "api.log").start()
    no_leftovers.append(api)
    wait_until(http_ok(f"http://127.0.0.1:{port}/status"), 60, "the guarded API", proc=api)

    assert requests.get(f"http://127.0.0.1:{port}/status", timeout=10).status_code == 200  # loopback: always in
    for _ in range(3):
        refused = requests.get(f"http://{outside}:{port}/status", timeout=10)
        assert refused.status_code == 403 and "allow-list" in refused.json()["error"]
    posted = requests.post(f"http://{outside}:{port}/register", json={"batch_size": 8}, timeout=10)
    assert posted.status_code == 403
    assert requests.get(f"http://127.0.0.1:{port}/guard/stats", timeout=10).json()["refused_requests"] == 4
    api.stop()
    log = api.log_path.read_text()
    assert log.count(f"refused a request from {outside}") == 1, log  # logged once per client
    assert "set atropos.launcher.api_allow" in log


def test_guarded_api_lets_in_a_listed_network(tmp_path: Path, no_leftovers: list[ManagedProcess]) -> None:
    outside = host_address()
    port = free_port("0.0.0.0")
    argv = guard_argv(port, GuardSettings(vocab_size=100, batch_size=8), host="0.0.0.0", allow=[f"{outside}/32"])
    api = ManagedProcess("guarded-api", argv, tmp_path / "api.log").start()
    no_leftovers.append(api)
    wait_until(http_ok(f"http://127.0.0.1:{port}/status"), 60, "the guarded API", proc=api)
    assert requests.get(f"http://{outside}:{port}/status", timeout=10).status_code == 200
    api.stop()


def test_guarded_api_refuses_to_listen_beyond_loopback_without_an_allow_list(tmp_path: Path) -> None:
    argv = guard_argv(free_port(), GuardSettings(vocab_size=100, batch_size=8), host="0.0.0.0")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "set atropos.launcher.api_allow" in done.stderr
    bad = guard_argv(free_port(), GuardSettings(vocab_size=100, batch_size=8), host="0.0.0.0", allow=["10.0.0.300/8"])
    done = subprocess.run(bad, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "'10.0.0.300/8' is not a network" in done.stderr
    assert sys.executable == argv[0]
