"""verl 0.9.1's SGLang rollout server keeps the generate() contract RayReplicaBackend calls.

verl's ``async_sglang_server`` imports ``sglang`` at module level, which is not installed on CPU machines, so its
source is read with ``ast`` (the installed file, not a copy): our call must bind to the real signature, and the
server must translate the vLLM-style keys we send (``max_tokens``, ``logprobs``). Where ``sglang`` is installed the
class itself is imported and checked the same way.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import verl
from verl.workers.rollout.replica import RolloutReplicaRegistry, TokenOutput

from recipe.atropos.endpoint.server import RayReplicaBackend, SamplingParams

SGLANG_SERVER = Path(verl.__file__).parent / "workers" / "rollout" / "sglang_rollout" / "async_sglang_server.py"


def sglang_generate() -> ast.AsyncFunctionDef:
    tree = ast.parse(SGLANG_SERVER.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SGLangHttpServer")
    return next(n for n in cls.body if isinstance(n, ast.AsyncFunctionDef) and n.name == "generate")


def signature_of(fn: ast.AsyncFunctionDef) -> inspect.Signature:
    """The parameters of ``fn`` (defaults as placeholders), without importing its module."""
    args = fn.args.args[1:]  # drop self
    n_defaults = len(fn.args.defaults)
    params = [
        inspect.Parameter(
            a.arg,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            default=None if i >= len(args) - n_defaults else inspect.Parameter.empty,
        )
        for i, a in enumerate(args)
    ]
    return inspect.Signature(params)


class RecordingHandle:
    """A stand-in Ray handle: records the generate() call and answers like verl's servers do (TokenOutput)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.generate = SimpleNamespace(remote=self._remote)

    async def _remote(self, **kwargs: Any) -> TokenOutput:
        self.calls.append(kwargs)
        return TokenOutput(token_ids=[5, 2], log_probs=[-0.1, -0.2])


def backend_call() -> dict[str, Any]:
    handle = RecordingHandle()
    backend = RayReplicaBackend([handle], eos_token_ids=[2])
    completion = asyncio.run(backend.generate([1, 2, 3], SamplingParams(max_tokens=8, temperature=0.7, top_k=-1)))
    assert completion.token_ids == [5, 2] and completion.finish_reason == "stop"
    return handle.calls[0]


def test_sglang_is_a_registered_verl_rollout() -> None:
    assert "sglang" in RolloutReplicaRegistry._registry


def test_our_generate_call_binds_to_verls_sglang_server_signature() -> None:
    fn = sglang_generate()
    sig = signature_of(fn)
    assert list(sig.parameters)[:3] == ["prompt_ids", "sampling_params", "request_id"]
    assert ast.unparse(fn.returns) == "TokenOutput"
    call = backend_call()
    sig.bind(**call)  # raises TypeError if a keyword we pass is missing from verl's signature
    assert set(call) == {"prompt_ids", "sampling_params", "request_id"}


def test_sglang_server_translates_the_vllm_style_keys_we_send() -> None:
    source = ast.unparse(sglang_generate())
    sent = set(backend_call()["sampling_params"])
    assert sent == {"temperature", "top_p", "top_k", "max_tokens", "logprobs"}
    # verl maps max_tokens -> SGLang's max_new_tokens and logprobs -> return_logprob; the rest are SGLang's own names
    assert "sampling_params.pop('max_tokens')" in source
    assert "sampling_params.pop('logprobs', False)" in source
    assert "output_token_logprobs" in source  # log-probs of the sampled tokens come back in TokenOutput.log_probs


def test_the_real_sglang_server_class_when_sglang_is_installed() -> None:
    pytest.importorskip("sglang", reason="sglang is not installed (GPU-only dependency); checked from source above")
    from verl.workers.rollout.sglang_rollout.async_sglang_server import SGLangHttpServer

    inspect.signature(SGLangHttpServer.generate).bind(None, **backend_call())


def test_gpu_config_with_sglang_passes_and_vllm_http_with_sglang_is_refused() -> None:
    from recipe.atropos.launch_atropos_verl_services import load_config
    from recipe.atropos.trainer import check_atropos_config

    gpu = Path(__file__).resolve().parents[2] / "recipe" / "atropos" / "config" / "atropos_grpo_gpu.yaml"
    config = load_config(gpu, ["actor_rollout_ref.rollout.name=sglang"])
    check_atropos_config(config)
    assert config.atropos.inference.backend == "ray"
    bad = load_config(gpu, ["actor_rollout_ref.rollout.name=sglang", "atropos.inference.backend=vllm_http"])
    with pytest.raises(ValueError, match="use atropos.inference.backend=ray"):
        check_atropos_config(bad)
