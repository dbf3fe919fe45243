"""HTTP client for the Atropos trajectory API (``run-api``), with ScoredData validated on arrival.

A malformed group never crashes the run: it is rejected with a reason naming the field, logged, counted
(``atropos/rejected_groups`` and ``atropos/rejected_groups/<field>``) and kept (in memory, or appended to
``rejected_groups_file``) so no data is lost silently.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import requests
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class AtroposAPIError(RuntimeError):
    """The API is unreachable past the timeout, or answered with an error payload."""


class GroupValidationError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _check_shape(name: str, rows: list[list[Any]] | None, lengths: list[int]) -> None:
    if rows is None:
        return
    if len(rows) != len(lengths):
        raise GroupValidationError(name, f"{len(rows)} sequences, but tokens has {len(lengths)}")
    for i, (row, n) in enumerate(zip(rows, lengths, strict=True)):
        if len(row) != n:
            raise GroupValidationError(name, f"sequence {i} has {len(row)} values, tokens has {n}")


class ScoredGroup(BaseModel):
    """One GRPO group as environments post it (atroposlib ``ScoredData``); shapes are checked, not just types."""

    model_config = ConfigDict(extra="allow")

    tokens: list[list[int]]
    masks: list[list[int]]
    scores: list[float]
    advantages: list[list[float]] | None = None
    inference_logprobs: list[list[float]] | None = None
    ref_logprobs: list[list[float]] | None = None
    overrides: list[dict[str, Any]] | None = None
    group_overrides: dict[str, Any] | None = None
    messages: list[Any] | None = None
    env_id: int | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ScoredGroup:
        if not self.tokens:
            raise GroupValidationError("tokens", "empty group (need at least one sequence)")
        lengths = [len(t) for t in self.tokens]
        for i, seq in enumerate(self.tokens):
            if not seq:
                raise GroupValidationError("tokens", f"sequence {i} is empty")
            if min(seq) < 0:
                raise GroupValidationError("tokens", f"sequence {i} has a negative token id {min(seq)}")
        _check_shape("masks", self.masks, lengths)
        for i, (mask, seq) in enumerate(zip(self.masks, self.tokens, strict=True)):
            if any(m != IGNORE_INDEX and m != t for m, t in zip(mask, seq, strict=True)):
                raise GroupValidationError("masks", f"sequence {i}: values must be -100 or the token id")
        if len(self.scores) != len(lengths):
            raise GroupValidationError("scores", f"{len(self.scores)} scores for {len(lengths)} sequences")
        if not all(math.isfinite(s) for s in self.scores):
            raise GroupValidationError("scores", "non-finite score (nan/inf)")
        for name in ("advantages", "inference_logprobs", "ref_logprobs"):
            rows = getattr(self, name)
            _check_shape(name, rows, lengths)
            if rows is not None and not all(math.isfinite(v) for row in rows for v in row):
                raise GroupValidationError(name, "non-finite value (nan/inf)")
        if self.overrides is not None and len(self.overrides) != len(lengths):
            raise GroupValidationError("overrides", f"{len(self.overrides)} entries for {len(lengths)} sequences")
        return self

    @property
    def size(self) -> int:
        return len(self.tokens)


def validate_group(raw: Any) -> ScoredGroup:
    """A :class:`ScoredGroup`, or :class:`GroupValidationError` naming the first bad field."""
    if not isinstance(raw, dict):
        raise GroupValidationError("group", f"expected a JSON object, got {type(raw).__name__}")
    try:
        return ScoredGroup.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, GroupValidationError):
            raise cause from None
        field = str(err["loc"][0]) if err.get("loc") else "group"
        raise GroupValidationError(field, err["msg"]) from None


class AtroposClient:
    """Trainer-side client: register, poll whole batches, status; counts and keeps rejected groups."""

    def __init__(
        self,
        api_url: str,
        *,
        request_timeout_s: float = 30.0,
        retries: int = 3,
        rejected_groups_file: str | None = None,
        max_kept_rejected: int = 1000,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self.request_timeout_s = request_timeout_s
        retry = Retry(
            total=retries,
            backoff_factor=0.2,
            status_forcelist=(500, 502, 503, 504),
            allowed_methods=None,  # /register only takes effect once, so retrying POSTs is safe here
            raise_on_status=False,
        )
        self.session = requests.Session()
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))
        self.rejected: Counter[str] = Counter()
        self.rejected_groups: deque[dict[str, Any]] = deque(maxlen=max_kept_rejected)
        self.rejected_groups_file = Path(rejected_groups_file) if rejected_groups_file else None
        self.last_poll_wait_s = 0.0

    # ---- HTTP -------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        url = f"{self.api_url}{path}"
        try:
            response = self.session.request(method, url, timeout=self.request_timeout_s, **kwargs)
        except requests.ConnectionError as exc:
            raise AtroposAPIError(f"Atropos API unreachable at {url}: is `run-api` running there?") from exc
        if response.status_code >= 400:
            raise AtroposAPIError(f"Atropos API {method} {path} answered {response.status_code}: {response.text[:300]}")
        body = response.json()
        if isinstance(body, dict) and body.get("status") == "error":
            raise AtroposAPIError(f"Atropos API {method} {path} answered an error: {body}")
        return body

    def register(
        self,
        *,
        batch_size: int,
        max_token_len: int,
        starting_step: int,
        num_steps: int,
        wandb_group: str = "atropos_verl",
        wandb_project: str = "atropos_verl",
        checkpoint_dir: str = "",
        save_checkpoint_interval: int = -1,
    ) -> dict[str, Any]:
        """Register the trainer (only the API's first registration counts: start a fresh run-api per run)."""
        body = {
            "wandb_group": wandb_group,
            "wandb_project": wandb_project,
            "batch_size": batch_size,
            "max_token_len": max_token_len,
            "checkpoint_dir": checkpoint_dir,
            "save_checkpoint_interval": save_checkpoint_interval,
            "starting_step": starting_step,
            "num_steps": num_steps,
        }
        answer = self._request("POST", "/register", json=body)
        logger.info(
            "registered with %s at step %d (batch size %d): %s", self.api_url, starting_step, batch_size, answer
        )
        return answer

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/status")

    def info(self) -> dict[str, Any]:
        return self._request("GET", "/info")

    # ---- batches ----------------------------------------------------------------------------------------
    def _reject(self, raw: Any, error: GroupValidationError) -> None:
        self.rejected[error.field] += 1
        record = {"reason": str(error), "field": error.field, "group": raw, "time": time.time()}
        self.rejected_groups.append(record)
        logger.warning("rejected a ScoredData group: %s", error)
        if self.rejected_groups_file is not None:
            self.rejected_groups_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self.rejected_groups_file, "a") as fh:
                fh.write(json.dumps(record, default=str) + "\n")

    def get_batch(self) -> list[ScoredGroup] | None:
        """One ``GET /batch``: the valid groups of a batch, or None when the API has none ready."""
        body = self._request("GET", "/batch")
        raw_groups = body.get("batch") if isinstance(body, dict) else None
        if raw_groups is None:
            return None
        groups = []
        for raw in raw_groups:
            try:
                groups.append(validate_group(raw))
            except GroupValidationError as error:
                self._reject(raw, error)
        return groups

    def poll_batch(self, timeout: float, interval: float = 0.2, max_interval: float = 2.0) -> list[ScoredGroup]:
        """Wait (with back-off, riding out API restarts) for the next batch; its valid groups (may be empty).

        Raises :class:`AtroposAPIError` after ``timeout`` s without a batch.
        """
        start = time.monotonic()
        wait, last_error = interval, None
        while True:
            try:
                groups = self.get_batch()
                if groups is not None:
                    self.last_poll_wait_s = time.monotonic() - start
                    return groups
            except AtroposAPIError as exc:
                if last_error is None:
                    logger.warning("%s; retrying until the poll timeout (%.0f s)", exc, timeout)
                last_error = exc
            elapsed = time.monotonic() - start
            if elapsed >= timeout:
                hint = f"last error: {last_error}" if last_error else "the API answered but had no batch"
                raise AtroposAPIError(
                    f"no batch from {self.api_url} within {timeout:.0f} s ({hint}). Are environments running and "
                    "pointed at this API, and is the batch size a multiple of their group size?"
                )
            time.sleep(min(wait, timeout - elapsed))
            wait = min(wait * 2, max_interval)

    def metrics(self) -> dict[str, float]:
        """Cumulative counters for the step's metrics."""
        out = {"atropos/rejected_groups": float(sum(self.rejected.values()))}
        out.update({f"atropos/rejected_groups/{field}": float(n) for field, n in self.rejected.items()})
        return out
