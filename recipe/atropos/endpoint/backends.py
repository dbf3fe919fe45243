"""Generation backends behind the inference endpoint: verl's rollout replicas, called two ways.

- :class:`RayReplicaBackend` calls verl's replicas through ``replica.server_handle.generate`` (token in, token out) —
  the interface of verl's vLLM/SGLang servers and of the CPU ``hf_cpu`` server alike.
- :class:`VLLMCompletionsBackend` forwards to the replicas' vLLM HTTP servers (``/v1/completions`` with prompt token
  ids, ``logprobs`` and ``return_tokens_as_token_ids``).

Both return a :class:`Completion` whose ``log_probs`` are those of the sampled tokens, and answer
``prompt_logprobs(prompt_ids, k)`` as vLLM does (:data:`PromptLogprobs`): what a teacher endpoint serves to
atroposlib's ``server.get_logprobs(input_ids=..., top_k=k)``.
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None  # passed on by VLLMCompletionsBackend; RayReplicaBackend ignores it (see its docstring)


@dataclass(frozen=True)
class Completion:
    """One sampled continuation: ``token_ids`` [L], ``log_probs`` [L] (sampled tokens), why it stopped, and the policy
    version that produced it when the rollout tags completions (``None``: the endpoint's current version)."""

    token_ids: list[int]
    log_probs: list[float]
    finish_reason: str
    policy_version: int | None = None


# vLLM's ``prompt_logprobs`` of one prompt: position 0 None (nothing predicts the first token), position p the model's
# log-probs at p given prompt[:p]: its k most likely tokens, and prompt[p] too when it is not among them.
PromptLogprobs = list[dict[int, float] | None]


class GenerationBackend(Protocol):
    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion: ...


class PromptLogprobsBackend(Protocol):
    async def prompt_logprobs(self, prompt_ids: list[int], k: int) -> PromptLogprobs: ...


def from_verl_prompt_logprobs(
    prompt_ids: Sequence[int],
    ranked_ids: Sequence[Sequence[int]],
    ranked_lps: Sequence[Sequence[float]],
    token_lps: Sequence[float],
    k: int,
) -> PromptLogprobs:
    """verl's rollout-server contract (``extra_fields`` ``prompt_ids`` / ``prompt_logprobs``, as its vLLM server's
    ``extract_prompt_logprobs`` fills them: row j for the token at j + 1, ranked, a dummy last row) with the prompt
    tokens' own log-probs ``token_lps`` (same rows) → vLLM's :data:`PromptLogprobs`."""
    out: PromptLogprobs = [None]
    for p in range(1, len(prompt_ids)):
        row = p - 1
        entry = {int(t): float(lp) for t, lp in zip(ranked_ids[row][:k], ranked_lps[row][:k], strict=True)} if k else {}
        entry.setdefault(int(prompt_ids[p]), float(token_lps[row]))
        out.append(entry)
    return out


def finish_reason(token_ids: Sequence[int], max_tokens: int, eos_token_ids: Sequence[int]) -> str:
    """``"stop"`` when the completion ended on EOS or before its budget, else ``"length"`` (vLLM's convention)."""
    if token_ids and token_ids[-1] in eos_token_ids:
        return "stop"
    return "length" if len(token_ids) >= max_tokens else "stop"


class RayReplicaBackend:
    """Round-robin over verl rollout servers' Ray handles (``generate(prompt_ids, sampling_params, request_id)``).

    ``SamplingParams.seed`` is not passed on: the servers behind these handles differ in what they accept (vLLM takes
    ``seed``; SGLang builds its own ``SamplingParams`` from the dict and fails on a key it does not know; hf_cpu has no
    per-request seed)."""

    def __init__(self, server_handles: Sequence[Any], eos_token_ids: Sequence[int]) -> None:
        if not server_handles:
            raise ValueError("RayReplicaBackend needs at least one rollout server handle (none were created)")
        self._handles = itertools.cycle(list(server_handles))
        self._eos = list(eos_token_ids)

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        sampling = {
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "max_tokens": params.max_tokens,
            "logprobs": True,
        }
        out = await next(self._handles).generate.remote(
            prompt_ids=prompt_ids, sampling_params=sampling, request_id=uuid.uuid4().hex
        )
        if out.log_probs is None or len(out.log_probs) != len(out.token_ids):
            raise RuntimeError(
                f"rollout server returned {len(out.token_ids)} tokens but "
                f"{None if out.log_probs is None else len(out.log_probs)} log-probs; "
                "set actor_rollout_ref.rollout.calculate_log_probs=true"
            )
        version = (out.extra_fields or {}).get("policy_version")
        return Completion(
            list(out.token_ids),
            list(out.log_probs),
            finish_reason(out.token_ids, params.max_tokens, self._eos),
            None if version is None else int(version),
        )

    async def _prompt_rows(self, handle: Any, prompt_ids: list[int], k: int) -> dict[str, Any]:
        sampling = {"max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k, "logprobs": True, "detokenize": False}
        out = await handle.generate.remote(prompt_ids=prompt_ids, sampling_params=sampling, request_id=uuid.uuid4().hex)
        fields = out.extra_fields or {}
        if "prompt_logprobs" not in fields:
            raise RuntimeError("the rollout server did not answer prompt_logprobs (verl's teacher contract)")
        return fields

    async def prompt_logprobs(self, prompt_ids: list[int], k: int) -> PromptLogprobs:
        """verl's teacher contract (``sampling_params["prompt_logprobs"]``, what its teacher manager asks of vLLM and
        SGLang servers): the top-k rows, and the prompt tokens' own log-probs from the server's
        ``prompt_token_logprobs`` (hf_cpu) or a second request with ``prompt_logprobs=0``."""
        handle = next(self._handles)
        fields = await self._prompt_rows(handle, prompt_ids, k)
        ranked_ids, ranked_lps = fields["prompt_ids"], fields["prompt_logprobs"]
        token_lps = fields.get("prompt_token_logprobs")
        if token_lps is None:
            own = ranked_lps if k == 0 else (await self._prompt_rows(handle, prompt_ids, 0))["prompt_logprobs"]
            token_lps = [row[0] for row in own]
        return from_verl_prompt_logprobs(prompt_ids, ranked_ids, ranked_lps, token_lps, k)


class VLLMCompletionsBackend:
    """Forwards to vLLM OpenAI-compatible servers: ``POST {address}/v1/completions`` with token-id prompts.

    ``model_name=None`` (the default) asks each server for the name it serves (``GET /v1/models``) on first use:
    verl starts vLLM with ``model_config.local_path`` (which differs from ``model.path`` with ``use_shm``, a hub name
    or Prometheus' ``served_model_name``), and a wrong name gets 404.
    """

    def __init__(self, addresses: Sequence[str], model_name: str | None = None, timeout_s: float = 600.0) -> None:
        if not addresses:
            raise ValueError("VLLMCompletionsBackend needs at least one vLLM server address")
        self._urls = itertools.cycle([a if a.startswith("http") else f"http://{a}" for a in addresses])
        self._model = model_name
        self._served: dict[str, str] = {}  # server URL -> the model name it serves
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)

    async def served_model(self, session: aiohttp.ClientSession, url: str) -> str:
        """The configured name, else the first model id the server lists at ``/v1/models`` (cached per server)."""
        if self._model:
            return self._model
        if url not in self._served:
            async with session.get(f"{url}/v1/models") as r:
                body = await r.json(content_type=None)
                if r.status >= 400 or not body.get("data"):
                    raise RuntimeError(f"vLLM {url}/v1/models answered {r.status}: {body}")
                self._served[url] = str(body["data"][0]["id"])
        return self._served[url]

    def request_body(self, prompt_ids: list[int], params: SamplingParams, model: str | None = None) -> dict[str, Any]:
        seed = {} if params.seed is None else {"seed": params.seed}
        return {
            **seed,
            "model": model or self._model,
            "prompt": prompt_ids,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "n": 1,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        }

    @staticmethod
    def parse_choice(choice: dict[str, Any]) -> Completion:
        """One ``choices[i]`` of a vLLM completions response (tokens spelled ``"token_id:<id>"``)."""
        lp = choice.get("logprobs") or {}
        tokens, token_logprobs = lp.get("tokens"), lp.get("token_logprobs")
        if tokens is None or token_logprobs is None:
            raise RuntimeError("vLLM response has no logprobs.tokens/token_logprobs: was logprobs requested?")
        ids = [int(t.split(":", 1)[1]) for t in tokens]
        return Completion(ids, [float(x) for x in token_logprobs], str(choice.get("finish_reason") or "stop"))

    async def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        url = next(self._urls)
        async with aiohttp.ClientSession(timeout=self._timeout) as session:
            body = {**body, "model": await self.served_model(session, url)}
            async with session.post(f"{url}/v1/completions", json=body) as r:
                answer = await r.json(content_type=None)
                if r.status >= 400:
                    raise RuntimeError(f"vLLM /v1/completions answered {r.status}: {answer}")
        return answer

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        body = await self._post(self.request_body(prompt_ids, params))
        return self.parse_choice(body["choices"][0])

    @staticmethod
    def parse_prompt_logprobs(choice: dict[str, Any]) -> PromptLogprobs:
        """``choices[i].prompt_logprobs`` of a vLLM completions response (``{"<id>": {"logprob", "rank", ...}}`` per
        position, None first) as :data:`PromptLogprobs`."""
        rows = choice.get("prompt_logprobs")
        if rows is None:
            raise RuntimeError("vLLM response has no prompt_logprobs: was prompt_logprobs requested?")
        out: PromptLogprobs = []
        for row in rows:
            if row is None:
                out.append(None)
                continue
            out.append({int(t): float(v["logprob"] if isinstance(v, dict) else v) for t, v in row.items()})
        return out

    async def prompt_logprobs(self, prompt_ids: list[int], k: int) -> PromptLogprobs:
        """vLLM's own ``prompt_logprobs`` (its OpenAI completions extra parameter): top-k and the prompt token."""
        body = {"prompt": prompt_ids, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": k}
        answer = await self._post(body)
        return self.parse_prompt_logprobs(answer["choices"][0])
