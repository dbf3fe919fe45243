"""The CPU runtime: platform answers, the hf_cpu rollout server (in a real Ray actor), and the inference endpoint
on top of it (real HTTP, atroposlib's own client)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray
import requests
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from recipe.atropos.config import AtroposConfig
from recipe.atropos.cpu.hf_cpu import HFCPURolloutServer, HFGenerator, SamplingKey
from recipe.atropos.cpu.platform import PlatformCPU, dedupe_backend
from recipe.atropos.endpoint.backends import RayReplicaBackend
from recipe.atropos.endpoint.server import InferenceEndpoint
from recipe.atropos.setup.cpu_runtime import (
    apply_cpu_runtime,
    cpu_runtime_env,
    cpu_runtime_overrides,
    should_use_cpu_runtime,
)
from tests.helpers import wait_until


def test_platform_answers() -> None:
    platform = PlatformCPU()
    assert (platform.device_name, platform.communication_backend_name(), platform.current_device()) == (
        "cpu",
        "gloo",
        "cpu",
    )
    module = platform.device_module
    assert module.memory_allocated() == 0 and module.max_memory_reserved() == 0 and module.mem_get_info() == (0, 0)
    assert module.get_device_name() == "CPU" and module.is_available()
    state = module.get_rng_state()
    first = torch.rand(1)
    module.set_rng_state(state)
    assert torch.equal(torch.rand(1), first)


def test_duplicate_gloo_backend_is_collapsed() -> None:
    assert dedupe_backend("cpu:gloo,cpu:gloo") == "gloo"
    assert dedupe_backend("cpu:gloo,cuda:nccl") == "cpu:gloo,cuda:nccl"


def test_runtime_switches() -> None:
    assert should_use_cpu_runtime("cpu") and not should_use_cpu_runtime("cuda")
    assert should_use_cpu_runtime("auto") == (not torch.cuda.is_available())
    with pytest.raises(ValueError, match="atropos.runtime='tpu'"):
        AtroposConfig(runtime="tpu")  # the typed config is where the value is checked
    env = cpu_runtime_env(["my.module"])
    assert env["VERL_USE_EXTERNAL_MODULES"].split(",") == [
        "recipe.atropos.cpu.platform",
        "recipe.atropos.cpu.hf_cpu",
        "my.module",
    ]
    assert "++actor_rollout_ref.rollout.name=hf_cpu" in cpu_runtime_overrides()


def test_apply_cpu_runtime_sets_the_config(monkeypatch: pytest.MonkeyPatch) -> None:
    from omegaconf import OmegaConf

    for key in cpu_runtime_env():  # apply_cpu_runtime exports these: setenv records them, so they are restored
        monkeypatch.setenv(key, "")
    monkeypatch.setenv("VERL_USE_EXTERNAL_MODULES", "user.module")
    config = OmegaConf.create({"trainer": {"device": "cuda"}, "actor_rollout_ref": {"rollout": {"name": "vllm"}}})
    apply_cpu_runtime(config, extra_modules=["recipe.atropos.algos.extensions"])
    assert config.trainer.device == "cpu" and config.actor_rollout_ref.rollout.name == "hf_cpu"
    assert config.ray_kwargs.ray_init.num_gpus == 1
    import os

    assert os.environ["VERL_USE_EXTERNAL_MODULES"].endswith("recipe.atropos.algos.extensions,user.module")
    assert os.environ["VERL_PLATFORM"] == "cpu"


def forward_logprobs(model: torch.nn.Module, prompt: list[int], completion: list[int], temperature: float) -> list:
    """log softmax(logits / T) of each completion token, from one plain forward pass."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return torch.log_softmax(logits, dim=-1)[torch.arange(len(completion)), torch.tensor(completion)].tolist()


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_generator_logprobs_equal_a_direct_forward_pass(tiny_model: Path, temperature: float) -> None:
    torch.manual_seed(0)
    gen = HFGenerator(str(tiny_model), response_length=12)
    prompts = [[257, 84, 82, 68], [257, 70, 71, 72, 73, 74, 75]]  # different lengths: left padding is exercised
    results = gen.generate_batch(prompts, SamplingKey(temperature, 1.0, -1), [12, 5])
    assert len(results[1][0]) <= 5
    for prompt, (ids, lps) in zip(prompts, results, strict=True):
        expected = forward_logprobs(gen.model, prompt, ids, temperature if temperature > 0 else 1.0)
        assert lps == pytest.approx(expected, abs=1e-4)


@pytest.fixture(scope="module")
def rollout_server(tiny_model: Path) -> Iterator[ray.actor.ActorHandle]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        server = HFCPURolloutServer.remote(str(tiny_model), 8)
        ray.get(server.stats.remote())
        yield server
    finally:
        ray.shutdown()


def generate(server: ray.actor.ActorHandle, prompt: list[int], temperature: float = 0.0):
    params = {"temperature": temperature, "max_tokens": 8, "logprobs": True}
    return ray.get(server.generate.remote(prompt_ids=prompt, sampling_params=params, request_id="r"))


def test_concurrent_requests_share_batches(rollout_server: ray.actor.ActorHandle) -> None:
    before = ray.get(rollout_server.stats.remote())
    params = {"temperature": 1.0, "max_tokens": 8, "logprobs": True}
    refs = [
        rollout_server.generate.remote(prompt_ids=[257, 80 + i], sampling_params=params, request_id=str(i))
        for i in range(8)
    ]
    outs = ray.get(refs)
    after = ray.get(rollout_server.stats.remote())
    assert all(len(o.token_ids) == len(o.log_probs) > 0 for o in outs)
    assert after["n_requests"] - before["n_requests"] == 8
    assert after["n_batches"] - before["n_batches"] < 8
    assert after["max_batch_seen"] > 1


def test_weight_load_changes_outputs_and_bumps_the_policy_version(
    rollout_server: ray.actor.ActorHandle, tiny_model: Path
) -> None:
    first = generate(rollout_server, [257, 84, 82])
    assert first.extra_fields["policy_version"] == 0
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(3)
    state = {k: v + 0.5 * torch.randn_like(v) for k, v in model.state_dict().items()}
    assert ray.get(rollout_server.load_weights.remote(state, policy_version=5)) == 5
    second = generate(rollout_server, [257, 84, 82])
    assert second.extra_fields["policy_version"] == 5
    assert second.log_probs != first.log_probs
    assert ray.get(rollout_server.stats.remote())["n_weight_updates"] == 1


def test_endpoint_serves_atroposlib_and_holds_requests_during_a_weight_update(
    rollout_server: ray.actor.ActorHandle, tiny_model: Path
) -> None:
    from atroposlib.envs.server_handling.openai_server import APIServerConfig
    from atroposlib.envs.server_handling.vllm_server import VLLMServer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    backend = RayReplicaBackend([rollout_server], [tok.eos_token_id])
    endpoint = InferenceEndpoint(
        backend, port=0, max_tokens_cap=8, eos_token_ids=[tok.eos_token_id], tokenizer=tok, policy_version=5
    ).start()
    try:
        client = VLLMServer(
            APIServerConfig(
                server_type="vllm",
                base_url=f"{endpoint.url}/v1",
                model_name="m",
                tokenizer_name=str(tiny_model),
                api_key="x",
                health_check=False,
            )
        )
        prompt_ids, tokens, logprobs, reasons = asyncio.run(
            client.tokens_and_logprobs_completion(input_ids=[257, 84, 82], n=3, max_tokens=20)
        )
        assert len(tokens) == len(logprobs) == len(reasons) == 3
        assert all(len(t) <= 8 for t in tokens)  # capped at data.max_response_length
        assert endpoint.stats["capped_max_tokens"] == 1
        assert all(r in ("stop", "length") for r in reasons)
        assert all(endpoint.ledger.version_of(prompt_ids + t) == 5 for t in tokens)

        endpoint.pause()
        with ThreadPoolExecutor(1) as pool:
            body = {"prompt": {"prompt_token_ids": [257, 84]}, "n": 1, "max_tokens": 4, "temperature": 0.0}
            pending = pool.submit(requests.post, f"{endpoint.url}/generate", json=body, timeout=60)
            time.sleep(1.0)
            assert not pending.done()  # held while the weights change
            endpoint.resume(policy_version=6)
            answer = pending.result(timeout=60).json()
        assert answer["policy_version"] == 6
        assert requests.get(f"{endpoint.url}/health", timeout=5).json()["policy_version"] == 6

        bad = requests.post(f"{endpoint.url}/generate", json={"prompt": {"prompt_token_ids": []}}, timeout=5)
        assert bad.status_code == 422 and "prompt_token_ids" in bad.json()["error"]
    finally:
        endpoint.stop()


def test_endpoint_pause_waits_for_in_flight_requests(rollout_server: ray.actor.ActorHandle, tiny_model: Path) -> None:
    backend = RayReplicaBackend([rollout_server], [0])
    endpoint = InferenceEndpoint(backend, port=0, max_tokens_cap=8, policy_version=0).start()
    try:
        body = {"prompt": {"prompt_token_ids": [257, 90]}, "n": 4, "max_tokens": 8}
        seen = ray.get(rollout_server.stats.remote())["n_requests"]
        served = endpoint.stats["completions"]
        thread = threading.Thread(target=requests.post, args=(f"{endpoint.url}/generate",), kwargs={"json": body})
        thread.start()

        def in_flight() -> bool:  # the request reached the rollout server
            return ray.get(rollout_server.stats.remote())["n_requests"] >= seen + 4

        wait_until(in_flight, 60, "the request in flight", interval=0.005)
        endpoint.pause()  # returns only once the in-flight request has its 4 completions
        # (counted, not read from the ledger: the ledger keys distinct sequences, and 4 samples of a random tiny model
        # can repeat one)
        assert endpoint.stats["completions"] == served + 4
        endpoint.resume(1)
        thread.join()
    finally:
        endpoint.stop()


def test_a_request_abandoned_during_a_weight_update_is_never_generated(
    rollout_server: ray.actor.ActorHandle, tiny_model: Path
) -> None:
    """atroposlib cancels env workers (queue full, STOP_TRAIN evaluation): a request whose client left while the gate
    was closed costs no generation; health says paused meanwhile."""
    backend = RayReplicaBackend([rollout_server], [0])
    endpoint = InferenceEndpoint(backend, port=0, max_tokens_cap=8, policy_version=0).start()
    try:
        assert requests.get(f"{endpoint.url}/health", timeout=5).json()["paused"] is False
        endpoint.pause()
        assert requests.get(f"{endpoint.url}/health", timeout=5).json()["paused"] is True
        seen = ray.get(rollout_server.stats.remote())["n_requests"]
        body = {"prompt": {"prompt_token_ids": [257, 91]}, "n": 4, "max_tokens": 8}
        with pytest.raises(requests.exceptions.ReadTimeout):  # the client gives up and closes its connection
            requests.post(f"{endpoint.url}/generate", json=body, timeout=1.0)
        endpoint.resume(1)
        wait_until(lambda: endpoint.stats["abandoned_requests"] >= 1, 10, "the abandoned request", interval=0.05)
        assert endpoint.stats["abandoned_requests"] == 1
        assert ray.get(rollout_server.stats.remote())["n_requests"] == seen  # nothing reached the rollout server
        assert endpoint.stats["completions"] == 0
    finally:
        endpoint.stop()


def test_split_swap_under_running_requests_tags_each_completion_with_its_policy(
    rollout_server: ray.actor.ActorHandle, tiny_model: Path
) -> None:
    """Split placement swaps weights without closing the endpoint: requests arriving before, during and after a load
    are all served, the gate never closes, and each completion is attributed to the policy that produced it — its
    log-probs equal a forward pass of that policy's weights and not of the other's."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    old = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    torch.manual_seed(11)
    new = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    new.load_state_dict({k: v + 0.3 * torch.randn_like(v) for k, v in old.state_dict().items()})
    assert ray.get(rollout_server.load_weights.remote(old.state_dict(), policy_version=20)) == 20
    backend = RayReplicaBackend([rollout_server], [tok.eos_token_id])
    endpoint = InferenceEndpoint(
        backend, port=0, max_tokens_cap=8, eos_token_ids=[tok.eos_token_id], policy_version=20,
        versions_from_rollout=True,
    ).start()  # fmt: skip
    load_s = ray.get(rollout_server.stats.remote())["weight_load_s"]
    try:
        body = {"prompt": {"prompt_token_ids": [257, 84, 82]}, "n": 2, "max_tokens": 8, "temperature": 1.0}
        url = f"{endpoint.url}/generate"
        with ThreadPoolExecutor(8) as pool:
            answers = [pool.submit(requests.post, url, json=body, timeout=120) for _ in range(8)]
            time.sleep(0.2)  # some requests are generating now
            # the endpoint is left open meanwhile
            assert ray.get(rollout_server.load_weights.remote(new.state_dict(), policy_version=21)) == 21
            answers += [pool.submit(requests.post, url, json=body, timeout=120) for _ in range(4)]
            answers = [a.result(timeout=120).json() for a in answers]
        assert endpoint.counters()["paused_s"] == 0.0  # the gate never held a request
        assert endpoint.stats["completions"] == 24
        assert ray.get(rollout_server.stats.remote())["weight_load_s"] > load_s  # the swap held the replica instead
        versions = [v for a in answers for v in a["policy_versions"]]
        assert set(versions) == {20, 21} and versions[-8:] == [21] * 8  # requests sent after the load: new policy
        models, produced_by = {20: old, 21: new}, defaultdict(set)
        for answer in answers:
            for tokens, logprobs, version in zip(
                answer["token_ids"], answer["logprobs"], answer["policy_versions"], strict=True
            ):
                produced_by[tuple(tokens)].add(version)
                if not tokens:
                    continue
                served = [next(iter(lp[0].values())) for lp in logprobs]
                claimed = forward_logprobs(models[version], [257, 84, 82], tokens, 1.0)
                other = forward_logprobs(models[41 - version], [257, 84, 82], tokens, 1.0)
                assert served == pytest.approx(claimed, abs=1e-4)
                assert served != pytest.approx(other, abs=1e-4)
        for tokens, by in produced_by.items():  # the ledger keys sequences: one sampled under both keeps the last
            if len(by) == 1:
                assert endpoint.ledger.version_of([257, 84, 82, *tokens]) == next(iter(by))
    finally:
        endpoint.stop()
