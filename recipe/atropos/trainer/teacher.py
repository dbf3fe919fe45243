"""On-policy distillation verl's way: verl's teacher replicas (``distillation.teacher_models``) answer for every row
of the Atropos batch, and the losses of the environments' way (:mod:`recipe.atropos.trainer.distillation`) train on
their answer.

Who builds what (verl 0.9.1):

- **verl's own init builds the teacher.** The switch stays on (``distillation.enabled=true``), the task runner maps
  ``Role.TeacherModel`` with verl's ``BaseTaskRunner.add_teacher_model_resource_pool`` (``trainer/main_ppo_v0.py``
  114-121) and ``init_resource_pool_mgr`` sizes the ``teacher_pool`` from ``distillation.n_gpus_per_node`` x
  ``nnodes`` (main_ppo_v0.py 87-95); ``RayPPOTrainer.init_workers`` then builds ``MultiTeacherModelManager`` on it
  (``trainer/ppo/ray_trainer.py`` 925-937), one ``TeacherModelManager`` per teacher whose replicas come from verl's
  ``RolloutReplicaRegistry`` by ``inference.name`` (``experimental/teacher_loop/teacher_model.py`` 68-114,
  ``init_colocated`` on the teacher's sub-pool). Only the colocated layout runs that init: split placement is
  refused (:func:`~recipe.atropos.trainer.teacher_config.check_verl_teacher`).
- **The trainer asks it after conversion** (``RayAtroposTrainer._ask_teacher``): verl's
  ``AsyncTeacherLLMServerManager`` (``teacher_loop/teacher_manager.py`` 88) over ``teacher_model_manager.get_client()``,
  one ``compute_teacher_logprobs_single(prompt + response, routing_key=...)`` per row as verl's agent loop does
  (``experimental/agent_loop/agent_loop.py`` 1031-1055), each answer padded by verl's ``_pad_teacher_outputs``
  (teacher_manager.py 66; agent_loop.py 834-846) into the batch's ``teacher_ids`` / ``teacher_logprobs``, the layout
  the environments' way builds too; ``teacher_mask`` = the trained response tokens (every row has a teacher).
- **The same loss**: the workers get verl's distillation loss restricted by ``teacher_mask``
  (:func:`~recipe.atropos.trainer.distillation.install_distillation_loss`), and verl's ``_update_actor`` reads the
  switch itself (it is on).

On CPU (:func:`~recipe.atropos.trainer.teacher_config.apply_cpu_teacher`) every teacher runs on the recipe's
``hf_cpu`` rollout (:class:`~recipe.atropos.cpu.hf_cpu.HFCPUReplica`, which answers verl's ``prompt_logprobs``
contract): one process per replica, one logical Ray device each. On GPU the teacher is verl's vLLM replica with
verl's keys (not run here).

Routing: with several teachers verl routes a row by the value of its ``distillation.teacher_key`` field; the recipe's
rows carry the env's name under :data:`ROUTING_KEY` (``env_name``, from the launcher's ``env_ids.json``), so each
teacher's ``key`` is an env's name (``atropos.launcher.envs[].name``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from verl import DataProto

from recipe.atropos.trainer.distillation import TeacherTensors, sampled_token_teacher_logprobs
from recipe.atropos.trainer.teacher_config import ROUTING_KEY

logger = logging.getLogger(__name__)


def sequence_lengths(batch: DataProto) -> tuple[list[int], list[int]]:
    """Per row the real prompt and response lengths (``attention_mask`` over ``prompts`` [N, P] left-padded and
    ``responses`` [N, R] right-padded)."""
    P = batch.batch["prompts"].shape[1]
    attention = batch.batch["attention_mask"]
    return attention[:, :P].sum(1).tolist(), attention[:, P:].sum(1).tolist()


def teacher_sequences(batch: DataProto) -> list[list[int]]:
    """Per row the unpadded sequence the teacher reads: the prompt's real tokens, then the response's (what verl's
    agent loop sends, ``prompt_ids + response_ids``)."""
    P = batch.batch["prompts"].shape[1]
    prompt_lens, response_lens = sequence_lengths(batch)
    ids = batch.batch["input_ids"]
    return [ids[i, P - p : P + r].tolist() for i, (p, r) in enumerate(zip(prompt_lens, response_lens, strict=True))]


def routing_keys(env_ids: Sequence[Any], names: Mapping[str, str]) -> list[str | None]:
    """Each row's env name from its ``env_id`` (``names``: env id → name, the launcher's ``env_ids.json``); None
    where the env is not named (offline data, an env started by hand)."""
    return [names.get(str(env_id)) for env_id in env_ids]


def padded_teacher_tensors(
    answers: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    prompt_lengths: Sequence[int],
    response_lengths: Sequence[int],
    prompt_width: int,
    response_width: int,
    pad_token_id: int,
    response_mask: torch.Tensor,
) -> TeacherTensors:
    """verl's per-row teacher answers (``ids`` / ``logprobs`` [p + r, K], row j the teacher at token j + 1, the last a
    dummy) → the batch's ``teacher_ids`` [N, P + R, K] int32, ``teacher_logprobs`` [N, P + R, K] float32 through
    verl's ``_pad_teacher_outputs`` (prompt left-padded to P, response right-padded to R: pad id / 0), and
    ``teacher_mask`` [N, R] = ``response_mask`` (every trained token has a teacher)."""
    from verl.experimental.teacher_loop.teacher_manager import _pad_teacher_outputs

    ids, lps = [], []
    for (row_ids, row_lps), p, r in zip(answers, prompt_lengths, response_lengths, strict=True):
        padded_ids, padded_lps = _pad_teacher_outputs(
            row_ids, row_lps, prompt_width, response_width, int(p), int(r), pad_token_id
        )
        ids.append(padded_ids)
        lps.append(padded_lps)
    mask = response_mask.float()
    metrics = {
        "atropos/distill/rows_with_teacher": 1.0,
        "atropos/distill/teacher_token_share": 1.0 if bool(mask.any()) else 0.0,
    }
    return TeacherTensors(torch.cat(ids).to(torch.int32), torch.cat(lps).to(torch.float32), mask, metrics)


def sampled_token_coverage(batch: DataProto) -> float:
    """Share of the trained teacher tokens whose sampled token is among the teacher's ids (1 with the single-sample
    estimators, whose one id is the sampled token; the top-k coverage with ``forward_kl_topk``)."""
    _, known = sampled_token_teacher_logprobs(batch)
    total = (batch.batch["response_mask"].bool() & batch.batch["teacher_mask"].bool()).sum()
    return float(known.sum()) / max(int(total), 1)


def env_field_rows(groups: Sequence[Any]) -> int:
    """Rows of ``groups`` that carry an env's ``distill_*`` fields (verl's teacher answers for them instead)."""

    def fields(g: Any) -> Any:
        return g.get("distill_token_ids") if isinstance(g, dict) else getattr(g, "distill_token_ids", None)

    return sum(len(g["tokens"] if isinstance(g, dict) else g.tokens) for g in groups if fields(g) is not None)


class VerlTeacher:
    """verl's teacher client for the trainer: built from ``RayPPOTrainer.teacher_model_manager`` once the workers
    are up; :meth:`attach` fills a converted batch."""

    def __init__(self, config: DictConfig, teacher_model_manager: Any) -> None:
        from verl.experimental.teacher_loop.teacher_manager import AsyncTeacherLLMServerManager

        self.client = AsyncTeacherLLMServerManager(config=config, teacher_client=teacher_model_manager.get_client())
        self.server_handles: dict[str, list[Any]] = dict(teacher_model_manager.server_handles)
        self.teacher_key = str(config.distillation.teacher_key)
        self.several = len(self.client.teacher_model_configs) > 1

    async def _ask_all(self, sequences: list[list[int]], keys: list[str | None]) -> list[tuple[torch.Tensor, ...]]:
        return await asyncio.gather(
            *(
                self.client.compute_teacher_logprobs_single(sequence_ids=seq, routing_key=key)
                for seq, key in zip(sequences, keys, strict=True)
            )
        )

    def _keys(self, batch: DataProto, names: Mapping[str, str]) -> list[str | None]:
        extra = batch.non_tensor_batch
        if self.teacher_key not in extra:
            extra[ROUTING_KEY] = np.array(routing_keys(extra["env_id"], names), dtype=object)
        keys = [None if k is None else str(k) for k in extra.get(self.teacher_key, [None] * len(batch))]
        if self.several and None in keys:
            row = keys.index(None)
            raise ValueError(
                f"row {row} (env id {extra['env_id'][row]}) has no {self.teacher_key!r} to route it to a teacher: "
                "several teachers need the launcher's env names (atropos.env_ids_file); start the envs with the "
                "launcher, or use one teacher"
            )
        return keys

    def attach(self, batch: DataProto, pad_token_id: int, names: Mapping[str, str]) -> dict[str, float]:
        """Ask the teacher for every row of ``batch`` and put ``teacher_ids`` / ``teacher_logprobs`` /
        ``teacher_mask`` into it; returns the ``atropos/distill/*`` counts."""
        prompt_lens, response_lens = sequence_lengths(batch)
        answers = asyncio.run(self._ask_all(teacher_sequences(batch), self._keys(batch, names)))
        built = padded_teacher_tensors(
            answers,
            prompt_lengths=prompt_lens,
            response_lengths=response_lens,
            prompt_width=batch.batch["prompts"].shape[1],
            response_width=batch.batch["responses"].shape[1],
            pad_token_id=pad_token_id,
            response_mask=batch.batch["response_mask"],
        )
        batch.batch["teacher_ids"] = built.ids
        batch.batch["teacher_logprobs"] = built.logprobs
        batch.batch["teacher_mask"] = built.mask
        return {**built.metrics, "atropos/distill/sampled_token_coverage": sampled_token_coverage(batch)}

    def memory_metrics(self) -> dict[str, float]:
        """``atropos/distill/teacher_rss_mb``: the resident memory of the teacher servers that report it (hf_cpu's
        ``stats()``), summed; {} when none does (verl's vLLM servers)."""
        import ray

        total, seen = 0.0, False
        for handles in self.server_handles.values():
            for handle in handles:
                if not hasattr(handle, "stats"):  # Ray handles raise AttributeError for methods the actor lacks
                    continue
                stats = ray.get(handle.stats.remote())
                if "rss_mb" in stats:
                    total, seen = total + float(stats["rss_mb"]), True
        return {"atropos/distill/teacher_rss_mb": total} if seen else {}
