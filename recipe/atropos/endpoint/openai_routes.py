"""The OpenAI routes of the inference endpoint, once over the token-level backend protocol (every backend serves them).

Stock Atropos environments call ``self.server.chat_completion(...)`` / ``self.server.completion(...)``; atroposlib's
``vllm`` server type sends those through the ``openai`` client to ``{base_url}/chat/completions`` and
``{base_url}/completions``. :class:`OpenAIRoutes` turns such a request into a :class:`Job` (prompt token ids,
:class:`~recipe.atropos.endpoint.backends.SamplingParams`, ``n``) the endpoint generates like ``/generate`` (same
gate, ledger and counters: :mod:`recipe.atropos.endpoint.server`), and the completions into the answer vLLM's
OpenAI server would give (it parses as the ``openai`` client's ``ChatCompletion`` / ``Completion``):

- chat: ``messages`` through the tokenizer's chat template (``add_generation_prompt`` true unless asked otherwise,
  ``continue_final_message``, ``chat_template_kwargs``), the text encoded without special tokens (vLLM's default);
  content given as a list of text parts is joined with newlines. ``tools`` are rendered by the template only with
  ``tool_choice: "none"``: tool calls are not parsed (422 otherwise).
- completions: ``prompt`` a string (encoded with special tokens, vLLM's default), a list of token ids, or a list
  holding one of those; ``echo`` and ``suffix`` are refused (422).
- sampling: ``n``, ``max_completion_tokens`` / ``max_tokens`` (the former wins; capped at the endpoint's
  ``max_tokens_cap`` and counted as ``/generate`` does), ``temperature``, ``top_p``, ``top_k`` (vLLM's extra; 0 and -1
  switch it off), ``seed`` (the i-th of ``n`` samples gets ``seed + i`` as in vLLM; only the ``vllm_http`` backend
  passes it on, the Ray backends ignore it). ``stop`` (a string or a list): the text is cut before the first stop
  string (``include_stop_str_in_output`` keeps it), ``finish_reason`` is ``"stop"`` and ``stop_reason`` names it; the
  completion's tokens end with the token that completed the stop string (what ``usage`` counts and ``logprobs``
  answer, as in vLLM). The backend generates to EOS or ``max_tokens`` meanwhile: the tail is discarded.
- ledger: one record per completion, under the gate's policy version, of the tokens whose text the env got back (all
  of them unless a stop string cut the text; then those before it): the env re-tokenises that text for training.
- logprobs: chat ``logprobs: true`` answers ``choices[i].logprobs.content = [{token, logprob, bytes,
  top_logprobs}]``, completions ``logprobs: k`` answers ``{tokens, token_logprobs, top_logprobs, text_offset}``.
  Backends give the sampled token's log-prob only: it is the single ``top_logprobs`` entry whatever ``k``
  (``top_logprobs`` is empty for chat without ``top_logprobs``). ``return_tokens_as_token_ids`` spells tokens
  ``"token_id:<id>"`` as vLLM does.
- ``model``: the served name (absent: that one); another name answers 404 as vLLM does.
- parameters that would change sampling without being honoured (penalties, ``logit_bias``, ``min_p``, ``min_tokens``,
  ``ignore_eos``, ``stop_token_ids``, ``response_format``, ``best_of``, ``stream``) are refused with 422 unless they
  hold their neutral value; other unknown keys are ignored (vLLM's ``extra="allow"``).

Errors answer ``{"error": {"message", "type", "param", "code"}}`` (vLLM's shape); invalid requests get 422.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from recipe.atropos.endpoint.backends import Completion, SamplingParams

MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs
# Parameters served only at their neutral value (None: absent): they would change what is sampled.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "stream": (False,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "repetition_penalty": (1,),
    "logit_bias": ({},),
    "min_p": (0,),
    "min_tokens": (0,),
    "ignore_eos": (False,),
    "stop_token_ids": ([],),
    "response_format": ({"type": "text"},),
    "best_of": (1,),
    "prompt_logprobs": (),
    "functions": (),
    "function_call": (),
}
COMPLETION_NEUTRAL = {**NEUTRAL, "echo": (False,), "suffix": ("",)}
_KINDS = {404: "NotFoundError", 499: "ClientClosedRequest", 500: "InternalServerError", 501: "NotImplementedError"}

TokenId = Annotated[int, Field(ge=0)]


class RouteError(Exception):
    """A request answered with HTTP ``status`` and ``message`` (``param``: the request field at fault)."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """vLLM's error answer: ``{"error": {"message", "type", "param", "code"}}``."""
    kind = _KINDS.get(status, "BadRequestError")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _unchanged(out: Completion) -> Completion:
    return out


def _all_tokens(out: Completion) -> list[int]:
    return out.token_ids


@dataclass(frozen=True)
class Job:
    """What one request asks of the endpoint: ``n`` samples of ``prompt_ids`` with ``params``. ``finish`` makes each
    backend completion the one answered (a stop string cuts it); ``ledger_ids`` are the token ids the ledger records
    for it; ``respond(completions, policy_versions)`` is the answer's body; ``prepare``, when given, runs before the
    samples under the same policy version (``/generate``'s ``prompt_logprobs``)."""

    prompt_ids: list[int]
    params: SamplingParams
    n: int
    respond: Callable[[list[Completion], list[int]], dict[str, Any]]
    finish: Callable[[Completion], Completion] = _unchanged
    ledger_ids: Callable[[Completion], list[int]] = _all_tokens
    prepare: Callable[[], Awaitable[None]] | None = None

    def sample_params(self, i: int) -> SamplingParams:
        """The params of the ``i``-th sample: with a seed, ``seed + i`` (vLLM's children of an ``n > 1`` request)."""
        return self.params if self.params.seed is None else replace(self.params, seed=self.params.seed + i)


class _SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    neutral: ClassVar[dict[str, tuple[Any, ...]]] = NEUTRAL

    model: str | None = None
    n: int = Field(1, ge=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)
    stop: str | list[str] | None = None
    seed: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    return_tokens_as_token_ids: bool = False

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        """``"n": null``, ``"logprobs": null`` ...: the field's default (the ``openai`` client sends a None given)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in cls.model_fields}
        return data

    @model_validator(mode="after")
    def _only_neutral_values(self) -> _SamplingRequest:
        for name, value in (self.model_extra or {}).items():
            if name in self.neutral and value is not None and value not in self.neutral[name]:
                raise ValueError(f"{name}={value!r} is not supported by this endpoint")
        return self

    @property
    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class ChatCompletionRequest(_SamplingRequest):
    """Body of ``POST /v1/chat/completions`` (OpenAI's, with vLLM's extras that apply here)."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _plain_messages(cls, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [_plain_message(m) for m in messages]

    @model_validator(mode="after")
    def _served_options(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tools and self.tool_choice != "none":
            raise ValueError(
                "tools: tool calls are not parsed by this endpoint; send tool_choice='none' to have the chat template "
                "render them, or use atroposlib's managed_server with a tool_parser"
            )
        return self


class CompletionRequest(_SamplingRequest):
    """Body of ``POST /v1/completions`` (OpenAI's, with vLLM's extras that apply here)."""

    neutral: ClassVar[dict[str, tuple[Any, ...]]] = COMPLETION_NEUTRAL

    prompt: str | list[TokenId] | list[str] | list[list[TokenId]]
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    add_special_tokens: bool = True


def _plain_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message with text content: a list of ``{"type": "text", "text": ...}`` parts joined by newlines."""
    if not isinstance(message.get("role"), str):
        raise ValueError("each message needs a 'role' (a string)")
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text":
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"content part of type {kind!r}: only text is served")
        texts.append(str(part.get("text", "")))
    return {**message, "content": "\n".join(texts)}


def describe(exc: ValidationError) -> str:
    """One line per error: ``field.path: message``."""
    return "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())


def _first_stop(text: str, stops: list[str]) -> tuple[int, str] | None:
    hits = [(text.find(s), -len(s), s) for s in stops if s in text]
    if not hits:
        return None
    at, _, stop = min(hits)
    return at, stop


class OpenAIRoutes:
    """Request bodies → :class:`Job`; completions → OpenAI answers. ``max_tokens(requested)`` is the endpoint's cap
    (it counts capped requests); ``tokenizer`` the endpoint's (None: these routes answer 501)."""

    def __init__(self, tokenizer: Any, served_model_name: str, max_tokens: Callable[[int | None], int]) -> None:
        self.tokenizer = tokenizer
        self.served_model_name = served_model_name
        self.max_tokens = max_tokens
        self.created = int(time.time())
        self._token_texts: dict[int, str] = {}  # token id -> its text alone (the log-probs' "token"), at most the vocab

    def models(self) -> dict[str, Any]:
        """``GET /v1/models``: the one model served."""
        name = self.served_model_name
        card = {"id": name, "object": "model", "created": self.created, "owned_by": "atropos-verl", "root": name}
        return {"object": "list", "data": [{**card, "parent": None, "permission": []}]}

    # ---- requests -------------------------------------------------------------------------------------------
    def chat(self, body: Any) -> Job:
        req = self._validate(ChatCompletionRequest, body)
        model = self._model(req.model)
        kwargs = dict(req.chat_template_kwargs or {})
        if req.tools:
            kwargs["tools"] = req.tools
        if req.continue_final_message:
            kwargs["continue_final_message"] = True
        try:
            rendered = self.tokenizer.apply_chat_template(
                req.messages, add_generation_prompt=req.add_generation_prompt, tokenize=False, **kwargs
            )
        except Exception as exc:  # jinja's TemplateError, transformers' ValueError: the request's fault
            raise RouteError(422, f"messages: the chat template failed: {exc}", "messages") from None
        prompt_ids = self._encode(rendered, req.add_special_tokens)

        def respond(outs: list[Completion], versions: list[int]) -> dict[str, Any]:
            choices = []
            for i, out in enumerate(outs):
                text, stop = self._text(out, req)
                message = {"role": "assistant", "content": text}
                logprobs = {"content": self._chat_logprobs(out, req)} if req.logprobs else None
                choice = {"index": i, "message": message, "finish_reason": out.finish_reason, "logprobs": logprobs}
                choices.append({**choice, "stop_reason": stop})
            return self._answer("chatcmpl", "chat.completion", model, choices, prompt_ids, outs)

        return self._job(prompt_ids, req, respond)

    def completion(self, body: Any) -> Job:
        req = self._validate(CompletionRequest, body)
        model = self._model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise RouteError(422, f"prompt: {len(prompt)} prompts in one request; send one per request", "prompt")
            prompt = prompt[0]
        prompt_ids = self._encode(prompt, req.add_special_tokens) if isinstance(prompt, str) else prompt
        if not prompt_ids:
            raise RouteError(422, "prompt: empty", "prompt")

        def respond(outs: list[Completion], versions: list[int]) -> dict[str, Any]:
            choices = []
            for i, out in enumerate(outs):
                text, stop = self._text(out, req)
                logprobs = self._completion_logprobs(out, req) if req.logprobs is not None else None
                choice = {"index": i, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason}
                choices.append({**choice, "stop_reason": stop})
            return self._answer("cmpl", "text_completion", model, choices, prompt_ids, outs)

        return self._job(list(prompt_ids), req, respond)

    def _job(self, prompt_ids: list[int], req: _SamplingRequest, respond: Callable[..., dict[str, Any]]) -> Job:
        finish, ledger_ids = partial(self._cut_at_stop, req=req), partial(self._answered_ids, req=req)
        return Job(prompt_ids, self._sampling(req), req.n, respond, finish, ledger_ids)

    def _validate(self, model: type[_SamplingRequest], body: Any) -> Any:
        if self.tokenizer is None:
            raise RouteError(501, "this endpoint has no tokenizer: the OpenAI routes need one (use /generate)")
        try:
            return model.model_validate(body)
        except ValidationError as exc:
            raise RouteError(422, f"invalid request: {describe(exc)}") from None

    def _model(self, requested: str | None) -> str:
        if requested is not None and requested != self.served_model_name:
            raise RouteError(404, f"The model `{requested}` does not exist.", "model")
        return self.served_model_name

    def _encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _sampling(self, req: _SamplingRequest) -> SamplingParams:
        return SamplingParams(
            max_tokens=self.max_tokens(req.max_completion_tokens or req.max_tokens),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            top_k=-1 if not req.top_k else req.top_k,
            seed=req.seed,
        )

    # ---- completions ----------------------------------------------------------------------------------------
    def _decode(self, token_ids: list[int], req: _SamplingRequest) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=req.skip_special_tokens)

    def _cut_at_stop(self, out: Completion, req: _SamplingRequest) -> Completion:
        """``out`` up to the token that completes the first stop string (``finish_reason`` "stop"), else ``out``.
        The shortest such prefix is found by bisection (a decoded prefix is a prefix of the decoded whole)."""
        stops, ids = req.stops, out.token_ids
        if not stops or _first_stop(self._decode(ids, req), stops) is None:
            return out
        lo, hi = 1, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop(self._decode(ids[:mid], req), stops) is None:
                lo = mid + 1
            else:
                hi = mid
        return replace(out, token_ids=ids[:lo], log_probs=out.log_probs[:lo], finish_reason="stop")

    def _answered_ids(self, out: Completion, req: _SamplingRequest) -> list[int]:
        """The ids the ledger records: the longest prefix of ``out``'s tokens whose text lies within the answered
        text. All of them unless a stop string cut the text; then the tokens before the stop string where it starts on
        a token boundary (what the env gets back and re-tokenises; the ledger matches spans by ids or text)."""
        ids = out.token_ids
        if not req.stops:  # nothing cut: no need to decode the text again
            return ids
        text, stop = self._text(out, req)
        if stop is None:
            return ids
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if text.startswith(self._decode(ids[:mid], req)):
                lo = mid
            else:
                hi = mid - 1
        return ids[:lo]

    def _text(self, out: Completion, req: _SamplingRequest) -> tuple[str, str | None]:
        """The answered text (cut before the first stop string, or after it with ``include_stop_str_in_output``)
        and the stop string that ended it."""
        text = self._decode(out.token_ids, req)
        hit = _first_stop(text, req.stops)
        if hit is None:
            return text, None
        at, stop = hit
        return text[: at + len(stop) if req.include_stop_str_in_output else at], stop

    def _token(self, token_id: int, req: _SamplingRequest) -> str:
        if req.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        text = self._token_texts.get(token_id)
        if text is None:  # decoded once per token id: a decode call per answered token cost ~15 us
            text = self._token_texts[token_id] = self.tokenizer.decode([token_id])
        return text

    def _chat_logprobs(self, out: Completion, req: ChatCompletionRequest) -> list[dict[str, Any]]:
        content = []
        for token_id, logprob in zip(out.token_ids, out.log_probs, strict=True):
            token = self._token(token_id, req)
            entry = {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8", errors="replace"))}
            content.append({**entry, "top_logprobs": [entry] if req.top_logprobs else []})
        return content

    def _completion_logprobs(self, out: Completion, req: CompletionRequest) -> dict[str, Any]:
        tokens = [self._token(t, req) for t in out.token_ids]
        return {
            "tokens": tokens,
            "token_logprobs": list(out.log_probs),
            "top_logprobs": [{t: lp} for t, lp in zip(tokens, out.log_probs, strict=True)],
            "text_offset": list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=0)) if tokens else [],
        }

    @staticmethod
    def _answer(
        prefix: str, kind: str, model: str, choices: list[dict], prompt_ids: list[int], outs: list[Completion]
    ) -> dict[str, Any]:
        completion_tokens = sum(len(o.token_ids) for o in outs)
        usage = {
            "prompt_tokens": len(prompt_ids),
            "completion_tokens": completion_tokens,
            "total_tokens": len(prompt_ids) + completion_tokens,
        }
        return {
            "id": f"{prefix}-{uuid.uuid4().hex}",
            "object": kind,
            "created": int(time.time()),
            "model": model,
            "choices": choices,
            "usage": usage,
        }
