"""HTTP client for the Atropos trajectory API (``run-api``), with ScoredData validated on arrival.

A malformed group never crashes the run: it is rejected with a reason naming the field, logged, counted
(``atropos/rejected_groups`` and ``atropos/rejected_groups/<field>``) and appended to ``rejected_groups_file`` (when
set), so no data is lost silently. The client knows nothing of the spool: the group source that calls it writes each
fetched group to disk before training on it, then acknowledges the groups' ids (:meth:`AtroposClient.ack`, the
guarded API's ``POST /ack``) so the API's journal lets them go. Groups without an id (plain ``run-api``) need no ack.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from recipe.atropos.config import AtroposConfig
from recipe.atropos.records import RejectedGroupLog
from recipe.atropos.schema import GroupValidationError, ScoredGroup, group_id, validate_group

logger = logging.getLogger(__name__)
_DEFAULTS = AtroposConfig()  # the one home of the atropos.* defaults


class AtroposAPIError(RuntimeError):
    """The API is unreachable past the timeout, or answered with an error payload."""


class AtroposClient:
    """Trainer-side client: register, poll whole batches, status; counts and keeps rejected groups.

    Second line of defence behind the guarded API: groups are validated again here (vocabulary size included). When
    the API answers "not registered" (it was restarted), the client registers again at ``current_step()`` and
    counts it.
    """

    def __init__(
        self,
        api_url: str,
        *,
        request_timeout_s: float = _DEFAULTS.request_timeout_s,
        retries: int = 3,
        rejected_groups_file: str | None = None,
        vocab_size: int | None = None,
        poll_interval_s: float = _DEFAULTS.poll_interval_s,
        poll_max_interval_s: float = _DEFAULTS.poll_max_interval_s,
        error_log_interval_s: float = _DEFAULTS.error_log_interval_s,
        current_step: Callable[[], int] | None = None,
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
        self.rejected = RejectedGroupLog(rejected_groups_file)
        self.vocab_size = vocab_size
        self.poll_interval_s = poll_interval_s
        self.poll_max_interval_s = poll_max_interval_s
        self.error_log_interval_s = error_log_interval_s
        self.current_step = current_step
        self.reregistrations = 0
        self.fetched_groups = 0
        self.acked_groups = 0
        self.unacked: list[str] = []  # ids whose ack has not reached the API yet (sent with the next ack)
        self._registration: dict[str, Any] | None = None

    @classmethod
    def from_config(
        cls, atropos: AtroposConfig, *, vocab_size: int | None, current_step: Callable[[], int] | None = None
    ) -> AtroposClient:
        """The client as the trainer configures it (``atropos.*`` keys)."""
        return cls(
            atropos.api_url,
            request_timeout_s=atropos.request_timeout_s,
            rejected_groups_file=atropos.rejected_groups_file,
            vocab_size=vocab_size,
            poll_interval_s=atropos.poll_interval_s,
            poll_max_interval_s=atropos.poll_max_interval_s,
            error_log_interval_s=atropos.error_log_interval_s,
            current_step=current_step,
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
        """One ``GET /batch``: the valid groups of a batch, or None when the API has none ready."""
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
                self.rejected.reject(raw, error)  # set aside here, kept in the rejected-groups file: let it go
                gid = group_id(raw) if isinstance(raw, dict) else None
                if gid:
                    self.ack([gid])
        self.fetched_groups += len(groups)
        return groups

    def ack(self, ids: list[str]) -> int:
        """Tell the guarded API these groups are held durably (with any earlier ids whose ack failed); how many the
        API released. A failed ack is retried with the next one: until then the API keeps the groups and serves
        them again after a restart (the spool drops the duplicates)."""
        self.unacked.extend(ids)
        if not self.unacked:
            return 0
        try:
            answer = self._request("POST", "/ack", json={"ids": self.unacked})
        except AtroposAPIError as exc:
            logger.warning("ack of %d groups failed (sent again with the next one): %s", len(self.unacked), exc)
            return 0
        self.unacked = []
        self.acked_groups += int(answer.get("acked", 0))
        return int(answer.get("acked", 0))

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
        out = self.rejected.metrics("atropos/rejected_groups")
        out["atropos/reregistrations"] = float(self.reregistrations)
        out["atropos/fetched_groups"] = float(self.fetched_groups)
        out["atropos/acked_groups"] = float(self.acked_groups)
        out["atropos/unacked_groups"] = float(len(self.unacked))
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
            out["atropos/api_backlog_groups"] = float(guard.get("backlog_groups", 0))
            out["atropos/api_journal_groups"] = float(guard.get("journal_groups", 0))
        return out
