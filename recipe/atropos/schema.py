"""The wire schema: one scored group as Atropos environments post it (atroposlib ``ScoredData``), and its checks.

Used alike by the API guard (before a group is queued), the trainer's client (after ``GET /batch``), the offline JSONL
reader and the spool (on resume). No I/O, no torch: importing it costs pydantic only.

Invariants a valid group holds (each violation raises :class:`GroupValidationError` naming the field):

- at least one sequence, none empty, no negative token id (below ``vocab_size`` when given);
- ``masks`` [n][L_i] with every value -100 (untrained) or equal to the token at that position;
- ``scores`` [n] finite; ``advantages`` / ``inference_logprobs`` / ``ref_logprobs``, when given, [n][L_i] and finite;
- ``overrides``, when given, one dict per sequence;
- ``distill_token_ids`` / ``distill_logprobs`` (a teacher's top-k for on-policy distillation), when given, both given,
  ``[n][L_i][k]``: position ``p`` holds the teacher's log-probs of its ``k`` most likely tokens at ``p`` given
  ``tokens[:p]`` (vLLM's ``prompt_logprobs`` alignment); an empty ``[]`` position has no teacher (vLLM gives none for
  the first token); every other position holds the same ``k`` ids and ``k`` log-probs across the group; ids are
  not negative (below ``vocab_size`` when given), log-probs finite and <= 0;
- an empty list in ``advantages`` / ``inference_logprobs`` / ``ref_logprobs`` / ``overrides`` / ``messages`` /
  ``distill_token_ids`` / ``distill_logprobs`` means "not given": atroposlib's ``BaseEnv.collect_trajectories`` sends
  ``[]`` for each a group's items did not fill (every stock env built on ``collect_trajectory``, e.g. blackjack);
- with ``batch_size``, the group size divides it (else the API can never pack the group into a batch).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

IGNORE_INDEX = -100  # mask value of a position that is not trained (prompt, env or tool tokens)


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


def _check_distill(
    ids: list[list[list[int]]] | None, logprobs: list[list[list[float]]] | None, lengths: list[int]
) -> None:
    """The teacher fields' invariants (module docstring); the first violation names its field."""
    if ids is None and logprobs is None:
        return
    if ids is None or logprobs is None:
        given, missing = (
            ("distill_logprobs", "distill_token_ids") if ids is None else ("distill_token_ids", "distill_logprobs")
        )
        raise GroupValidationError(missing, f"missing: {given} is given, and the two go together")
    _check_shape("distill_token_ids", ids, lengths)
    _check_shape("distill_logprobs", logprobs, lengths)
    top_k: int | None = None
    for i, (id_row, lp_row) in enumerate(zip(ids, logprobs, strict=True)):
        for p, (entry, lps) in enumerate(zip(id_row, lp_row, strict=True)):
            if len(lps) != len(entry):
                raise GroupValidationError(
                    "distill_logprobs",
                    f"sequence {i} position {p} has {len(lps)} values, distill_token_ids {len(entry)}",
                )
            if not entry:
                continue
            if top_k is None:
                top_k = len(entry)
            elif len(entry) != top_k:
                raise GroupValidationError(
                    "distill_token_ids",
                    f"sequence {i} position {p} has {len(entry)} entries, the group's top_k is {top_k}",
                )
            if min(entry) < 0:
                raise GroupValidationError(
                    "distill_token_ids", f"sequence {i} position {p} has a negative id {min(entry)}"
                )
            if not all(math.isfinite(v) and v <= 0.0 for v in lps):
                bad = next(v for v in lps if not (math.isfinite(v) and v <= 0.0))
                raise GroupValidationError(
                    "distill_logprobs", f"sequence {i} position {p} has {bad}: log-probs must be finite and <= 0"
                )


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
    distill_token_ids: list[list[list[int]]] | None = None  # [n][L_i][k] a teacher's top-k token ids per position
    distill_logprobs: list[list[list[float]]] | None = None  # [n][L_i][k] their log-probs

    @field_validator(
        "advantages",
        "inference_logprobs",
        "ref_logprobs",
        "overrides",
        "messages",
        "distill_token_ids",
        "distill_logprobs",
        mode="before",
    )
    @classmethod
    def _empty_is_absent(cls, value: Any) -> Any:
        return None if isinstance(value, list) and not value else value

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
        _check_distill(self.distill_token_ids, self.distill_logprobs, lengths)
        return self

    @property
    def distill_top_k(self) -> int | None:
        """The ``k`` of the group's teacher entries (None: no distillation fields, or every position empty)."""
        rows = self.distill_token_ids or []
        return next((len(entry) for row in rows for entry in row if entry), None)

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
        top = max((max(e) for row in group.distill_token_ids or [] for e in row if e), default=-1)
        if top >= vocab_size:
            raise GroupValidationError(
                "distill_token_ids", f"teacher token id {top} >= the model's vocabulary size {vocab_size}"
            )
    if batch_size is not None and batch_size > 0 and batch_size % group.size:
        raise GroupValidationError(
            "group_size",
            f"{group.size} sequences do not divide the batch size {batch_size}: the API could never pack this group "
            "into a batch (use a group size that divides data.train_batch_size)",
        )
    return group


def group_tokens(group: ScoredGroup | dict[str, Any]) -> list[list[int]]:
    """The ``tokens`` of a group, validated or as a plain dict (the API's own queue holds dicts)."""
    return list(group["tokens"] if isinstance(group, dict) else group.tokens)


def group_masks(group: ScoredGroup | dict[str, Any]) -> list[list[int]] | None:
    """The ``masks`` of a group, validated or as a plain dict (None when a raw dict has none)."""
    masks = group.get("masks") if isinstance(group, dict) else group.masks
    return None if masks is None else list(masks)


def group_scores(group: ScoredGroup | dict[str, Any]) -> list[float]:
    """The ``scores`` of a group, validated or as a plain dict."""
    return list(group["scores"] if isinstance(group, dict) else group.scores)


def group_env_id(group: ScoredGroup | dict[str, Any]) -> int | None:
    """The ``env_id`` the API stamped on a group (None when the env did not register)."""
    return group.get("env_id") if isinstance(group, dict) else group.env_id


# The id the guarded API gives each group it accepts (its journal's), carried to the trainer inside the group.
# atroposlib's API rebuilds every queued group from its ScoredData fields (extra keys are dropped), so the id travels in
# ``group_overrides``, which it keeps as posted. The trainer acknowledges ids and de-duplicates by them.
GROUP_ID_KEY = "atropos_verl_group_id"


def group_id(group: ScoredGroup | dict[str, Any]) -> str | None:
    """The guard's id of ``group`` (None: it did not come through a guarded API with a journal)."""
    overrides = group.get("group_overrides") if isinstance(group, dict) else group.group_overrides
    value = overrides.get(GROUP_ID_KEY) if isinstance(overrides, dict) else None
    return str(value) if value is not None else None
