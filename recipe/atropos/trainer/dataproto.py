"""Atropos ScoredData groups → verl DataProto.

Per sequence (``tokens`` [L], ``masks`` [L] with -100 on untrained positions):

- prompt = every token before the first position whose mask is not -100; response window = the rest;
- ``prompts`` [N, P] left-padded to ``max_prompt_length`` (longer prompts lose their *left* part);
- ``responses`` [N, R] right-padded to ``max_response_length`` (longer responses lose their *right* part);
- ``response_mask`` [N, R] = 1 exactly where the original mask is not -100 inside the response window, so the tokens
  an environment or tool inserted between assistant turns are never trained;
- ``token_level_scores`` [N, R] = the score on the last response-mask token;
- ``token_level_advantages`` [N, R] (env advantages aligned to responses) and ``has_env_advantages`` [N] (bool);
- ``rollout_log_probs`` [N, R] from ``inference_logprobs`` when every sequence has them (0 outside the mask);
- non-tensor: ``uid`` (one per group), ``env_id``, ``advantage_zeroed`` (``overrides[i]["set_advantage_to_zero"]``).

Truncations and empty responses are counted in ``meta_info["atropos_metrics"]``, never silent.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from verl import DataProto

from recipe.atropos.schema import IGNORE_INDEX, ScoredGroup, validate_group


def _as_group(group: ScoredGroup | dict[str, Any]) -> ScoredGroup:
    return group if isinstance(group, ScoredGroup) else validate_group(group)


def first_trained_position(mask: Sequence[int]) -> int:
    """Index of the first mask entry that is not -100 (``len(mask)`` when none is)."""
    return next((i for i, m in enumerate(mask) if m != IGNORE_INDEX), len(mask))


def scored_data_to_dataproto(
    groups: Sequence[ScoredGroup | dict[str, Any]],
    *,
    max_prompt_length: int,
    max_response_length: int,
    pad_token_id: int,
) -> DataProto:
    """Convert whole groups to one DataProto of N = total sequences (see the module docstring for every field)."""
    parsed = [_as_group(g) for g in groups]
    n = sum(g.size for g in parsed)
    if n == 0:
        raise ValueError("scored_data_to_dataproto: no sequences (groups is empty)")
    P, R = max_prompt_length, max_response_length
    prompts = torch.full((n, P), pad_token_id, dtype=torch.long)
    prompt_attn = torch.zeros((n, P), dtype=torch.long)
    responses = torch.full((n, R), pad_token_id, dtype=torch.long)
    response_attn = torch.zeros((n, R), dtype=torch.long)
    response_mask = torch.zeros((n, R), dtype=torch.long)
    scores = torch.zeros((n, R), dtype=torch.float32)
    env_adv = torch.zeros((n, R), dtype=torch.float32)
    has_env_adv = torch.zeros(n, dtype=torch.bool)
    rollout_lp = torch.zeros((n, R), dtype=torch.float32)
    has_rollout_lp = torch.zeros(n, dtype=torch.bool)
    uids, env_ids, zeroed = [], [], []
    counts = {"truncated_prompts": 0, "truncated_responses": 0, "empty_response_count": 0}

    row = 0
    for group in parsed:
        uid = uuid.uuid4().hex
        for i, (tokens, mask) in enumerate(zip(group.tokens, group.masks, strict=True)):
            start = first_trained_position(mask)
            prompt, response, resp_mask = tokens[:start], tokens[start:], mask[start:]
            if len(prompt) > P:
                counts["truncated_prompts"] += 1
                prompt = prompt[len(prompt) - P :]
            if len(response) > R:
                counts["truncated_responses"] += 1
            response, resp_mask = response[:R], resp_mask[:R]
            if prompt:
                prompts[row, P - len(prompt) :] = torch.tensor(prompt)
                prompt_attn[row, P - len(prompt) :] = 1
            trained = torch.tensor([m != IGNORE_INDEX for m in resp_mask], dtype=torch.long)
            if response:
                responses[row, : len(response)] = torch.tensor(response)
                response_attn[row, : len(response)] = 1
                response_mask[row, : len(response)] = trained
            if trained.sum() == 0:
                counts["empty_response_count"] += 1
            else:
                last = int(torch.nonzero(trained)[-1])
                scores[row, last] = float(group.scores[i])
            if group.advantages is not None:
                adv = torch.tensor(group.advantages[i][start : start + len(response)], dtype=torch.float32)
                env_adv[row, : len(response)] = adv * response_mask[row, : len(response)]
                has_env_adv[row] = True
            if group.inference_logprobs is not None:
                lp = torch.tensor(group.inference_logprobs[i][start : start + len(response)], dtype=torch.float32)
                rollout_lp[row, : len(response)] = lp * response_mask[row, : len(response)]
                has_rollout_lp[row] = True
            overrides = group.overrides[i] if group.overrides else {}
            zeroed.append(bool(overrides.get("set_advantage_to_zero", False)))
            uids.append(uid)
            env_ids.append(-1 if group.env_id is None else int(group.env_id))
            row += 1

    attention_mask = torch.cat([prompt_attn, response_attn], dim=1)
    position_ids = torch.clamp(torch.cumsum(attention_mask, dim=1) - 1, min=0)
    tensors: dict[str, torch.Tensor] = {
        "prompts": prompts,
        "responses": responses,
        "input_ids": torch.cat([prompts, responses], dim=1),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
        "response_mask": response_mask,
        "token_level_scores": scores,
        "token_level_advantages": env_adv,
        "has_env_advantages": has_env_adv,
    }
    if bool(has_rollout_lp.all()):
        tensors["rollout_log_probs"] = rollout_lp
    else:
        tensors["has_rollout_log_probs"] = has_rollout_lp
    non_tensors = {
        "uid": np.array(uids, dtype=object),
        "env_id": np.array(env_ids, dtype=object),
        "advantage_zeroed": np.array(zeroed, dtype=bool),
    }
    meta = {"atropos_metrics": {f"atropos/{k}": float(v) for k, v in counts.items()}}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=meta)
