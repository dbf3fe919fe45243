"""A frozen teacher endpoint: the recipe's inference endpoint serving a model that is never trained, for environments
that distil (:mod:`recipe.atropos.envs.distill`: ``--env.teacher_base_url {url}/v1``).

Two backends:

- ``hf`` (:class:`HFTeacherBackend`): the model in this process with the hf_cpu rollout's generator (HF transformers,
  float32, CPU): ``prompt_logprobs`` is one forward pass per sequence;
- ``vllm_http``: a vLLM OpenAI server you started (``vllm serve TEACHER``), asked through
  :class:`~recipe.atropos.endpoint.backends.VLLMCompletionsBackend` (its ``prompt_logprobs`` parameter).

Run: ``python -m recipe.atropos.endpoint.teacher --model TEACHER_DIR [--port 8002] [--ready-file F]``, or
``--backend vllm_http --vllm-address 127.0.0.1:8000``. The teacher must share the student's tokenizer.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import threading
from collections.abc import Sequence

from recipe.atropos.endpoint.backends import (
    Completion,
    PromptLogprobs,
    SamplingParams,
    VLLMCompletionsBackend,
    finish_reason,
    from_verl_prompt_logprobs,
)
from recipe.atropos.endpoint.server import InferenceEndpoint

logger = logging.getLogger(__name__)


class HFTeacherBackend:
    """The hf_cpu rollout's generator in this process, one request at a time (a lock: HF generation is not
    re-entrant)."""

    def __init__(self, model_path: str, response_length: int = 64, num_threads: int | None = None) -> None:
        from recipe.atropos.cpu.hf_cpu import HFGenerator

        self.generator = HFGenerator(model_path, response_length, num_threads=num_threads)
        self._lock = asyncio.Lock()

    @property
    def eos_ids(self) -> list[int]:
        return self.generator.eos_ids

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        from recipe.atropos.cpu.hf_cpu import SamplingKey

        key = SamplingKey(params.temperature, params.top_p, params.top_k)
        async with self._lock:
            [(ids, lps)] = await asyncio.to_thread(
                self.generator.generate_batch, [prompt_ids], key, [params.max_tokens]
            )
        return Completion(ids, lps, finish_reason(ids, params.max_tokens, self.generator.eos_ids))

    async def prompt_logprobs(self, prompt_ids: list[int], k: int) -> PromptLogprobs:
        async with self._lock:
            rows = await asyncio.to_thread(self.generator.prompt_logprobs, prompt_ids, k)
        return from_verl_prompt_logprobs(
            prompt_ids, rows["prompt_ids"], rows["prompt_logprobs"], rows["prompt_token_logprobs"], k
        )


def teacher_endpoint(
    *,
    model: str,
    backend: str = "hf",
    vllm_address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    max_tokens: int = 64,
    api_key: str | None = None,
    ready_file: str | None = None,
) -> InferenceEndpoint:
    """The teacher's endpoint, not started (``.start()`` serves it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    if backend == "hf":
        engine = HFTeacherBackend(model, response_length=max_tokens)
        eos: Sequence[int] = engine.eos_ids
    elif backend == "vllm_http":
        if not vllm_address:
            raise ValueError("--backend vllm_http needs --vllm-address HOST:PORT (a vLLM OpenAI server)")
        engine, eos = VLLMCompletionsBackend([vllm_address]), [tokenizer.eos_token_id]
    else:
        raise ValueError(f"--backend {backend!r}: use 'hf' or 'vllm_http'")
    return InferenceEndpoint(
        engine,
        host=host,
        port=port,
        max_tokens_cap=max_tokens,
        eos_token_ids=eos,
        tokenizer=tokenizer,
        ready_file=ready_file,
        api_key=api_key,
        served_model_name=model,
    )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the teacher's model directory (its tokenizer too)")
    parser.add_argument("--backend", default="hf", choices=("hf", "vllm_http"))
    parser.add_argument("--vllm-address", default=None, help="HOST:PORT of a vLLM OpenAI server (vllm_http)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens a /generate sample may have")
    parser.add_argument("--api-key", default=None, help="a bearer token to ask of callers (needed beyond loopback)")
    parser.add_argument("--ready-file", default=None, help="written with {url} once serving")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    endpoint = teacher_endpoint(
        model=args.model, backend=args.backend, vllm_address=args.vllm_address, host=args.host, port=args.port,
        max_tokens=args.max_tokens, api_key=args.api_key, ready_file=args.ready_file,
    ).start()  # fmt: skip
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    logger.info("teacher endpoint for %s at %s/v1 (environments: --env.teacher_base_url)", args.model, endpoint.url)
    stop.wait()
    endpoint.stop()


if __name__ == "__main__":
    main()
