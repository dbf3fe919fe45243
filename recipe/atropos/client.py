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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

if TYPE_CHECKING:
    from recipe.atropos.spool import GroupSpool

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
    # Set by the trainer's spool (recipe.atropos.spool) once the group is on disk; never sent or spooled itself.
    spool_id: int | None = Field(default=None, exclude=True)

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


def validate_group(raw: Any, *, vocab_size: int | None = None, batch_size: int | None = None) -> ScoredGroup:
    """A :class:`ScoredGroup`, or :class:`GroupValidationError` naming the first bad field.

    With ``vocab_size``, every token id must be below it (an id past the embedding crashes the trainer). With
    ``batch_size``, the group's size must divide it (otherwise the API can never pack the group into a batch).
    """
    if not isinstance(raw, dict):
        raise GroupValidationError("group", f"expected a JSON object, got {type(raw).__name__}")
    try:
        group = ScoredGroup.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, GroupValidationError):
            raise cause from None
        field = str(err["loc"][0]) if err.get("loc") else "group"
        raise GroupValidationError(field, err["msg"]) from None
    if vocab_size is not None:
        for i, seq in enumerate(group.tokens):
            if max(seq) >= vocab_size:
                raise GroupValidationError(
                    "tokens", f"sequence {i} has token id {max(seq)} >= the model's vocabulary size {vocab_size}"
                )
    if batch_size is not None and batch_size > 0 and batch_size % group.size:
        raise GroupValidationError(
            "group_size",
            f"{group.size} sequences do not divide the batch size {batch_size}: the API could never pack this group "
            "into a batch (use a group size that divides data.train_batch_size)",
        )
    return group


class AtroposClient:
    """Trainer-side client: register, poll whole batches, status; counts and keeps rejected groups.

    Second line of defence behind the guarded API: groups are validated again here (vocabulary size included). When
    the API answers "not registered" (it was restarted), the client registers again at ``current_step()`` and
    counts it. With a ``spool`` every fetched group is written to disk before it is handed out.
    """

    def __init__(
        self,
        api_url: str,
        *,
        request_timeout_s: float = 30.0,
        retries: int = 3,
        rejected_groups_file: str | None = None,
        max_kept_rejected: int = 1000,
        vocab_size: int | None = None,
        poll_interval_s: float = 0.05,
        poll_max_interval_s: float = 2.0,
        error_log_interval_s: float = 30.0,
        current_step: Callable[[], int] | None = None,
        spool: GroupSpool | None = None,
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
        self.vocab_size = vocab_size
        self.poll_interval_s = poll_interval_s
        self.poll_max_interval_s = poll_max_interval_s
        self.error_log_interval_s = error_log_interval_s
        self.current_step = current_step
        self.spool = spool
        self.reregistrations = 0
        self.fetched_groups = 0
        self._registration: dict[str, Any] | None = None

    @classmethod
    def from_config(
        cls,
        atropos_cfg: Any,
        *,
        vocab_size: int | None,
        current_step: Callable[[], int] | None = None,
        spool: GroupSpool | None = None,
    ) -> AtroposClient:
        """The client as the trainer configures it (``atropos.*`` keys)."""
        return cls(
            atropos_cfg.api_url,
            request_timeout_s=float(atropos_cfg.request_timeout_s),
            rejected_groups_file=atropos_cfg.get("rejected_groups_file"),
            vocab_size=vocab_size,
            poll_interval_s=float(atropos_cfg.get("poll_interval_s", 0.05)),
            poll_max_interval_s=float(atropos_cfg.get("poll_max_interval_s", 2.0)),
            error_log_interval_s=float(atropos_cfg.get("error_log_interval_s", 30.0)),
            current_step=current_step,
            spool=spool,
        )

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
        self._registration = body
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

    def _reregister_if_needed(self, error: AtroposAPIError) -> bool:
        """After an API restart, register again at the trainer's current step; True when that happened."""
        if self._registration is None or "not registered" not in str(error).lower():
            return False
        body = dict(self._registration)
        if self.current_step is not None:
            body["starting_step"] = int(self.current_step())
        self._request("POST", "/register", json=body)
        self.reregistrations += 1
        logger.warning(
            "the Atropos API at %s had lost the trainer's registration (restarted?): registered again at step %d "
            "(re-registration %d)",
            self.api_url,
            body["starting_step"],
            self.reregistrations,
        )
        return True

    def get_batch(self) -> list[ScoredGroup] | None:
        """One ``GET /batch``: the valid groups of a batch, or None when the API has none ready.

        With a spool, each valid group is on disk (``group.spool_id``) before this returns.
        """
        try:
            body = self._request("GET", "/batch")
        except AtroposAPIError as error:
            if not self._reregister_if_needed(error):
                raise
            body = self._request("GET", "/batch")
        raw_groups = body.get("batch") if isinstance(body, dict) else None
        if raw_groups is None:
            return None
        groups = []
        for raw in raw_groups:
            try:
                groups.append(validate_group(raw, vocab_size=self.vocab_size))
            except GroupValidationError as error:
                self._reject(raw, error)
        self.fetched_groups += len(groups)
        if self.spool is not None:
            step = int(self.current_step()) if self.current_step is not None else 0
            for group in groups:
                self.spool.put(group, fetched_step=step)
        return groups

    def drain(self, max_sequences: int) -> list[ScoredGroup]:
        """Batches the API has ready, without waiting, until ``max_sequences`` sequences are held (bounded drain)."""
        out: list[ScoredGroup] = []
        while sum(g.size for g in out) < max_sequences:
            try:
                groups = self.get_batch()
            except AtroposAPIError as exc:
                logger.warning("drain stopped: %s", exc)
                break
            if groups is None:
                break
            out.extend(groups)
        return out

    def why_no_batch(self) -> str:
        """What the API's queue holds and whether a batch can form from it (guarded API), else ''."""
        try:
            report = self._request("GET", "/guard/stats")
        except AtroposAPIError:
            try:
                status = self._request("GET", "/status")
            except AtroposAPIError:
                return ""
            queued = status.get("queue_size", 0)
            return f"the API holds {queued} queued groups but formed no batch" if queued else ""
        if not report.get("queue_groups"):
            return ""
        sizes = report.get("queue_group_sizes")
        if report.get("can_form_batch") is False:
            return (
                f"the API's queue holds {report['queue_groups']} groups ({report['queue_sequences']} sequences, "
                f"group sizes {sizes}) but they cannot pack into a batch of {report['batch_size']}: group sizes must "
                "divide data.train_batch_size"
            )
        return f"the API's queue holds {report['queue_groups']} groups (group sizes {sizes}), fewer than a batch"

    def poll_batch(
        self, timeout: float, interval: float | None = None, max_interval: float | None = None
    ) -> list[ScoredGroup]:
        """Wait for the next batch, riding out API restarts; its valid groups (may be empty).

        While the API answers with no batch yet, it is asked again every ``interval`` s (a local call of ~1 ms, so a
        batch is seen within ``interval`` of forming); while the API fails, the wait doubles up to ``max_interval``.
        Errors and waits are logged every ``error_log_interval_s`` s, each time with the count and the API's own
        explanation when its queue is not empty. Raises :class:`AtroposAPIError` after ``timeout`` s without a batch.
        """
        interval = self.poll_interval_s if interval is None else interval
        max_interval = self.poll_max_interval_s if max_interval is None else max_interval
        start = time.monotonic()
        wait, last_error, errors, last_log = interval, None, 0, start
        while True:
            try:
                groups = self.get_batch()
                if groups is not None:
                    self.last_poll_wait_s = time.monotonic() - start
                    if errors:
                        logger.info("the Atropos API answers again after %d failed polls", errors)
                    return groups
                wait = interval  # the API answers: no back-off
            except AtroposAPIError as exc:
                if last_error is None:
                    logger.warning("%s; retrying until the poll timeout (%.0f s)", exc, timeout)
                last_error, errors = exc, errors + 1
                wait = min(wait * 2, max_interval) if errors > 1 else interval
            now = time.monotonic()
            elapsed = now - start
            if now - last_log >= self.error_log_interval_s:
                last_log = now
                if last_error is not None:
                    logger.warning("no batch for %.0f s, %d failed polls; last error: %s", elapsed, errors, last_error)
                else:
                    logger.info("no batch for %.0f s. %s", elapsed, self.why_no_batch() or "The API's queue is empty.")
            if elapsed >= timeout:
                why = self.why_no_batch()
                if why:
                    hint = why
                elif last_error:
                    hint = f"last error: {last_error}"
                else:
                    hint = (
                        "the API's queue stayed empty. Are environments running and pointed at this API, and is the "
                        "batch size a multiple of their group size?"
                    )
                raise AtroposAPIError(f"no batch from {self.api_url} within {timeout:.0f} s: {hint}")
            time.sleep(min(wait, timeout - elapsed))

    def metrics(self) -> dict[str, float]:
        """Cumulative counters for the step's metrics."""
        out = {"atropos/rejected_groups": float(sum(self.rejected.values()))}
        out.update({f"atropos/rejected_groups/{field}": float(n) for field, n in self.rejected.items()})
        out["atropos/reregistrations"] = float(self.reregistrations)
        out["atropos/fetched_groups"] = float(self.fetched_groups)
        try:
            guard = self._request("GET", "/guard/stats")
        except AtroposAPIError:
            guard = None
        if guard is not None:
            out["atropos/api_accepted_groups"] = float(guard.get("accepted_groups", 0))
            out["atropos/api_rejected_groups"] = float(guard.get("rejected_groups", 0))
            out.update({f"atropos/api_rejected_groups/{k}": float(v) for k, v in guard.get("rejected", {}).items()})
            out["atropos/api_restarts"] = float(max(0, int(guard.get("starts", 1)) - 1))
            out["atropos/api_queue_groups"] = float(guard.get("queue_groups", 0))
        if self.spool is not None:
            out.update(self.spool.metrics())
        return out
