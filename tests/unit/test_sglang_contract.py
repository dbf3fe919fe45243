"""verl 0.9.1's SGLang rollout server keeps the generate() contract RayReplicaBackend calls.

verl's ``async_sglang_server`` imports ``sglang`` at module level, and sglang (a GPU-only dependency) is not installed
on CPU machines. So where it is missing, the installed verl module is imported with an empty stand-in for the
``sglang`` package (every name it imports from sglang is a placeholder; nothing of sglang runs), and verl's own
``SGLangHttpServer.generate`` is then called the way our backend calls it, on a stand-in engine that records the
request verl builds and answers like SGLang. Where sglang is installed, the real module is imported the same way.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.abc
import importlib.machinery
import inspect
import sys
import types
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from verl.workers.rollout.replica import RolloutReplicaRegistry, TokenOutput

from recipe.atropos.endpoint.backends import Completion, RayReplicaBackend, SamplingParams
from tests.factories import CONFIG_DIR

SERVER_MODULE = "verl.workers.rollout.sglang_rollout.async_sglang_server"
PROMPT = [1, 2, 3]


class Placeholder:
    """Any class or function imported from the stand-in sglang: keeps the keywords it was built with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.__dict__.update(kwargs)


class _StandInSglang(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finder of last resort for ``sglang`` and its submodules: empty packages whose every name is a Placeholder."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "sglang" and not name.startswith("sglang."):
            return None
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = types.ModuleType(spec.name)

        def placeholder(attr: str) -> Any:
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (Placeholder,), {})

        module.__getattr__ = placeholder  # type: ignore[method-assign]
        module.__path__ = []
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        pass


@pytest.fixture(scope="module")
def sglang_server() -> Iterator[types.ModuleType]:
    """verl's installed ``async_sglang_server`` module; what this import added to ``sys.modules`` (sglang's stand-in
    and verl's sglang modules) is removed afterwards, so no later test sees them."""
    before = set(sys.modules)
    finder = _StandInSglang()
    sys.meta_path.append(finder)  # last: a real sglang, where installed, is found first
    try:
        yield importlib.import_module(SERVER_MODULE)
    finally:
        sys.meta_path.remove(finder)
        for name in set(sys.modules) - before:
            if "sglang" in name:
                del sys.modules[name]
        rollout = sys.modules.get("verl.workers.rollout")
        if rollout is not None and "verl.workers.rollout.sglang_rollout" not in sys.modules:
            rollout.__dict__.pop("sglang_rollout", None)


class StandInEngine:
    """SGLang's tokenizer manager as verl's server uses it: records each request, answers with ``output``."""

    def __init__(self, output: dict[str, Any]) -> None:
        self.output = output
        self.requests: list[Any] = []

    def generate_request(self, request: Any, _raw: Any) -> Any:
        self.requests.append(request)

        async def answer() -> Any:
            yield self.output

        return answer()


def server_self(engine: StandInEngine) -> SimpleNamespace:
    """The attributes ``SGLangHttpServer.generate`` reads from ``self`` (set by its ``__init__`` in a real server)."""
    config = SimpleNamespace(
        max_model_len=64, prompt_length=48, response_length=16, enable_rollout_routing_replay=False, mtp=None
    )
    return SimpleNamespace(
        _disaggregation_role="null",
        _pd_decode_peers=[],
        config=config,
        lora_as_adapter=False,
        tokenizer_manager=engine,
        replica_rank=0,
        global_steps=3,
    )


class ServerHandle:
    """A Ray handle whose ``generate.remote(**kwargs)`` runs verl's own ``SGLangHttpServer.generate``."""

    def __init__(self, server_class: type, engine: StandInEngine) -> None:
        self.calls: list[dict[str, Any]] = []
        self._server = server_self(engine)
        self._generate = server_class.generate

        async def remote(**kwargs: Any) -> TokenOutput:
            self.calls.append({k: dict(v) if isinstance(v, dict) else v for k, v in kwargs.items()})
            return await self._generate(self._server, **kwargs)

        self.generate = SimpleNamespace(remote=remote)


SGLANG_OUTPUT = {
    "output_ids": [5, 2],
    # SGLang's (log-prob, token id, text) triples of the sampled tokens
    "meta_info": {"finish_reason": {"type": "stop"}, "output_token_logprobs": [(-0.1, 5, None), (-0.2, 2, None)]},
}


def run_backend(server_class: type, params: SamplingParams) -> tuple[Completion, ServerHandle, StandInEngine]:
    engine = StandInEngine(SGLANG_OUTPUT)
    handle = ServerHandle(server_class, engine)
    completion = asyncio.run(RayReplicaBackend([handle], eos_token_ids=[2]).generate(PROMPT, params))
    return completion, handle, engine


def test_sglang_is_a_registered_verl_rollout_served_by_this_module(
    sglang_server: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    """verl's registry resolves ``actor_rollout_ref.rollout.name=sglang`` to this module's replica class."""
    monkeypatch.delenv("SGLANG_USE_CPU_ENGINE", raising=False)  # verl's loader sets and deletes it: restored after
    before = set(sys.modules)
    try:
        replica = RolloutReplicaRegistry.get("sglang")
    finally:  # where vLLM is missing, verl's loader puts stand-in vllm modules in sys.modules: none may outlive this
        for name in set(sys.modules) - before:
            if name == "vllm" or name.startswith("vllm."):
                del sys.modules[name]
    assert replica is sglang_server.SGLangReplica
    assert issubclass(replica, sglang_server.RolloutReplica)


def test_our_generate_call_binds_to_verls_sglang_server_signature(sglang_server: types.ModuleType) -> None:
    sig = inspect.signature(sglang_server.SGLangHttpServer.generate)
    assert list(sig.parameters)[:4] == ["self", "prompt_ids", "sampling_params", "request_id"]
    assert inspect.iscoroutinefunction(sglang_server.SGLangHttpServer.generate)
    _, handle, _ = run_backend(sglang_server.SGLangHttpServer, SamplingParams(max_tokens=8))
    (call,) = handle.calls
    assert set(call) == {"prompt_ids", "sampling_params", "request_id"}
    sig.bind(None, **call)  # TypeError if a keyword we pass is not in verl's signature


def test_verls_sglang_server_translates_the_vllm_style_keys_we_send(sglang_server: types.ModuleType) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.7, top_p=0.9, top_k=-1)
    completion, handle, engine = run_backend(sglang_server.SGLangHttpServer, params)
    sent = handle.calls[0]["sampling_params"]
    assert set(sent) == {"temperature", "top_p", "top_k", "max_tokens", "logprobs"}
    (request,) = engine.requests
    # max_tokens -> SGLang's max_new_tokens, logprobs -> return_logprob; the rest are SGLang's own names, unchanged
    assert request.sampling_params == {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_new_tokens": 8}
    assert request.return_logprob is True
    assert list(request.input_ids) == PROMPT and request.rid == handle.calls[0]["request_id"]
    # the sampled tokens' log-probs come back in TokenOutput.log_probs, which our backend returns with the tokens
    assert completion == Completion([5, 2], [-0.1, -0.2], "stop")


def test_verls_sglang_server_caps_max_tokens_at_the_context_left(sglang_server: types.ModuleType) -> None:
    # max_model_len 64, prompt of 3: at most 64 - 3 - 1 = 60 new tokens, whatever we ask for
    _, _, engine = run_backend(sglang_server.SGLangHttpServer, SamplingParams(max_tokens=500))
    assert engine.requests[0].sampling_params["max_new_tokens"] == 60


def test_gpu_config_with_sglang_passes_and_vllm_http_with_sglang_is_refused() -> None:
    from recipe.atropos.config.checks import check_atropos_config
    from recipe.atropos.launcher.config import load_config

    gpu = CONFIG_DIR / "atropos_grpo_gpu.yaml"
    config = load_config(gpu, ["actor_rollout_ref.rollout.name=sglang"])
    check_atropos_config(config)
    assert config.atropos.inference.backend == "ray"
    bad = load_config(gpu, ["actor_rollout_ref.rollout.name=sglang", "atropos.inference.backend=vllm_http"])
    with pytest.raises(ValueError, match="use atropos.inference.backend=ray"):
        check_atropos_config(bad)
