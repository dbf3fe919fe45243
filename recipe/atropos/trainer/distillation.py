"""On-policy distillation the environments' way: the teacher is the groups' ``distill_token_ids`` /
``distill_logprobs``, and verl's own distillation losses train on them.

The user switches it on with verl's keys: ``distillation.enabled=true``, no teacher model, and the loss chosen by
``distillation.distillation_loss.*`` (``loss_mode`` k1/k3/... or ``forward_kl_topk``, ``topk``,
``use_policy_gradient``, ``use_task_rewards``, ``distillation_loss_coef``). verl's trainer must not see the switch
(it would reserve a teacher resource pool, start teacher replicas and give the agent loop a teacher client): the
driver hides it once (:func:`take_distillation`); the actor workers get verl's distillation loss through their
public ``set_loss_fn`` (:func:`install_distillation_loss`), with a :class:`~verl.workers.config.DistillationConfig`
whose one teacher is a stand-in that is never started.

With ``distillation.teacher_models.*.model_path`` set it is verl's way instead: verl's teacher replicas answer for
every row (:mod:`recipe.atropos.trainer.teacher`), into the same tensors, with the same installed loss.

What the actor needs in the batch (verl 0.9.1, ``workers/utils/padding.py`` and ``trainer/distillation``), built by
:func:`teacher_tensors` exactly as verl's agent loop pads its teacher's answer (``_pad_teacher_outputs``):

- ``teacher_ids`` [N, P + R, K] int32 and ``teacher_logprobs`` [N, P + R, K] float32, in the layout of
  ``input_ids`` (prompt left-padded to P, response right-padded to R): row ``j`` of a sequence holds the teacher's
  answer for the token at ``j + 1`` (vLLM's ``prompt_logprobs`` shifted by one, as verl's ``extract_prompt_logprobs``
  does), the sequence's last real row a dummy (id 0, log-prob 0), padding rows ``pad_token_id`` / 0;
- ``K`` = ``distillation_loss.topk`` with ``forward_kl_topk`` (the teacher's top-k, highest first), 1 with the
  single-sample estimators (k1, k3, ...: the teacher's log-prob of the sampled token, id = that token);
- ``teacher_mask`` [N, R] float32 (the recipe's): 1 where response token r is trained and has a teacher. The
  distillation term is restricted to it (:mod:`recipe.atropos.algos.distillation`).

How a mixed batch is weighted: rows without a teacher (groups without the fields, positions the env left empty, a
sampled token the env's top-k does not hold in the estimator modes) contribute exactly zero to the distillation term
and no gradient through it, and train by the RL loss as before. verl aggregates the term with ``loss_agg_mode`` over
every trained token of the mini-batch, so with ``token-mean`` it is ``coef * sum over teacher tokens of the
per-token loss / all trained tokens`` = ``coef * teacher_token_share * (mean over teacher tokens)``;
``atropos/distill/teacher_token_share`` reports that share every step. With ``use_task_rewards=false`` verl drops the
RL term: rows without a teacher then train nothing.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from verl import DataProto
from verl.utils.config import omega_conf_to_dataclass
from verl.workers.config import DistillationConfig

from recipe.atropos.algos.distillation import teacher_masked_distillation_ppo_loss
from recipe.atropos.config.checks import DISTILLATION_TAKEN_KEY
from recipe.atropos.schema import IGNORE_INDEX, ScoredGroup, validate_group
from recipe.atropos.setup.cpu_runtime import should_use_cpu_runtime
from recipe.atropos.trainer.dataproto import first_trained_position
from recipe.atropos.trainer.teacher_config import (
    apply_cpu_teacher,
    check_verl_teacher,
    configured_teachers,
    cpu_teacher_block,
)

ENV_TEACHER = "atropos-env-distill-fields"  # the stand-in teacher's model_path: never started, never read
TAKEN_KEY = DISTILLATION_TAKEN_KEY  # set in the distillation block once the switch is hidden from verl's trainer
SUPERVISED_REFUSED = ("kl", "k1")  # gradient of lp - teacher_lp does not depend on the teacher (verl refuses k1)


@dataclass(frozen=True)
class DistillationPlan:
    """Distillation switched on, as the actor workers get it: verl's distillation config, and who the teacher is."""

    config: DistillationConfig
    verl_teacher: bool = False  # True: verl's teacher replicas answer for every row (recipe.atropos.trainer.teacher)

    @property
    def use_topk(self) -> bool:
        return bool(self.config.distillation_loss.loss_settings.use_topk)

    @property
    def top_k(self) -> int | None:
        """K of the teacher tensors with a top-k loss; None with an estimator loss (K = 1, the sampled token)."""
        return int(self.config.distillation_loss.topk) if self.use_topk else None


def _verl_config(worker: dict[str, Any], where: str) -> DistillationConfig:
    """verl's ``DistillationConfig`` of a plain ``distillation`` block; its checks' errors as one ``ValueError``
    headed ``where`` (the keys the user set)."""
    try:
        return omega_conf_to_dataclass(OmegaConf.create(worker))
    except Exception as exc:  # verl's checks raise ValueError, through Hydra's instantiation its wrapper
        cause = exc.__cause__ or exc
        raise ValueError(f"{where}: {cause}") from None


def _on_cpu(config: DictConfig) -> bool:
    """Whether the run is (or will be: ``main_atropos`` checks before switching) on the CPU runtime."""
    if OmegaConf.select(config, "trainer.device", default=None) == "cpu":
        return True
    return should_use_cpu_runtime(str(OmegaConf.select(config, "atropos.runtime", default="auto")))


def distillation_plan(config: DictConfig) -> DistillationPlan | None:
    """The plan when ``distillation.enabled`` (or already taken by :func:`take_distillation`), else None: verl's
    teacher replicas when ``distillation.teacher_models`` names a model, else the environments' ``distill_*`` fields.
    ``ValueError`` naming the key and the fix for a combination that cannot work; verl's own checks of the block run
    here too (its ``DistillationConfig``, with the CPU runtime's teacher settings on CPU)."""
    block = config.get("distillation")
    if block is None or not (block.get("enabled") or block.get(TAKEN_KEY)):
        return None
    loss = block.get("distillation_loss") or {}
    if loss.get("loss_mode") in SUPERVISED_REFUSED and not loss.get("use_policy_gradient"):
        raise ValueError(
            f"distillation.distillation_loss.loss_mode={loss.get('loss_mode')} with use_policy_gradient=false: its "
            "gradient does not depend on the teacher. Use use_policy_gradient=true, or loss_mode=k3 / forward_kl_topk"
        )
    worker = OmegaConf.to_container(block, resolve=True)
    worker.pop(TAKEN_KEY, None)
    if configured_teachers(worker) and not block.get(TAKEN_KEY):
        on_cpu = _on_cpu(config)
        if on_cpu:
            worker = cpu_teacher_block(worker)
        check_verl_teacher(config, worker, on_cpu)
        return DistillationPlan(_verl_config(worker, "distillation"), verl_teacher=True)
    teacher = dict(worker["teacher_models"]["teacher_model"])
    # A stand-in so verl's DistillationConfig validates: no replicas (pool 0 x 0), never started. vllm only answers
    # verl's top-k check of a teacher's engine; nothing is served.
    teacher.update(model_path=ENV_TEACHER, num_replicas=0)
    teacher["inference"] = {**(teacher.get("inference") or {}), "name": "vllm"}
    worker.update(enabled=True, n_gpus_per_node=0, nnodes=0, teacher_models={"teacher_model": teacher})
    return DistillationPlan(_verl_config(worker, "distillation.distillation_loss"))


def take_distillation(config: DictConfig) -> DistillationPlan | None:
    """:func:`distillation_plan`, and the config made ready for it (idempotent; on the driver before verl reads the
    config, and again in the trainer). The environments' way: verl's trainer no longer sees the switch
    (``distillation.enabled=false``, the block marked taken). verl's way: the switch stays on (verl's init builds the
    teacher) and on CPU the teachers get the hf_cpu settings and their Ray devices
    (:func:`~recipe.atropos.trainer.teacher_config.apply_cpu_teacher`)."""
    plan = distillation_plan(config)
    if plan is not None and plan.verl_teacher:
        if OmegaConf.select(config, "trainer.device", default=None) == "cpu":
            apply_cpu_teacher(config)
    elif plan is not None:
        with open_dict(config):
            config.distillation.enabled = False
            config.distillation[TAKEN_KEY] = True
    return plan


def install_distillation_loss(actor_rollout_wg: Any, config: DictConfig, plan: DistillationPlan) -> None:
    """Give the actor workers verl's distillation loss, restricted to ``teacher_mask``
    (:func:`~recipe.atropos.algos.distillation.teacher_masked_distillation_ppo_loss`), through verl's
    ``ActorRolloutRefWorker.set_loss_fn``."""
    actor_config = omega_conf_to_dataclass(config.actor_rollout_ref.actor)
    loss_fn = partial(teacher_masked_distillation_ppo_loss, config=actor_config, distillation_config=plan.config)
    actor_rollout_wg.set_loss_fn(loss_fn)


@contextlib.contextmanager
def verl_update_flags(trainer: Any, plan: DistillationPlan | None) -> Iterator[None]:
    """Around verl's ``RayPPOTrainer._update_actor``: it reads the switch to tell the workers
    ``distillation_use_topk`` (the top-k loss runs in the model's forward) and ``distillation_only``; shown to it for
    this call only (the environments' way; verl's way keeps the switch on)."""
    if plan is None or plan.verl_teacher:
        yield
        return
    block, saved = trainer.config.distillation, getattr(trainer, "distillation_config", None)
    with open_dict(trainer.config):
        block.enabled = True
    trainer.distillation_config = plan.config
    try:
        yield
    finally:
        with open_dict(trainer.config):
            block.enabled = False
        trainer.distillation_config = saved


@dataclass(frozen=True)
class TeacherTensors:
    """verl's teacher inputs for N rows (module docstring) and the recipe's mask and counts."""

    ids: torch.Tensor  # [N, P + R, K] int32
    logprobs: torch.Tensor  # [N, P + R, K] float32
    mask: torch.Tensor  # [N, R] float32
    metrics: dict[str, float]


def _row_entries(
    env_ids: Sequence[Sequence[int]], env_lps: Sequence[Sequence[float]], positions: range, k_env: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The env's entries at ``positions`` as ``ids`` [T, k_env], ``lps`` [T, k_env] (-inf where empty) and
    ``given`` [T] bool (the schema holds every entry at ``[]`` or ``k_env`` long)."""
    given = np.array([len(env_ids[q]) == k_env > 0 for q in positions], dtype=bool)
    blank_ids, blank_lps = [0] * k_env, [-math.inf] * k_env
    ids = np.array([env_ids[q] if ok else blank_ids for q, ok in zip(positions, given, strict=True)], dtype=np.int64)
    lps = np.array([env_lps[q] if ok else blank_lps for q, ok in zip(positions, given, strict=True)], dtype=np.float64)
    return ids.reshape(len(positions), k_env), lps.reshape(len(positions), k_env), given


def teacher_tensors(
    groups: Sequence[ScoredGroup],
    *,
    max_prompt_length: int,
    max_response_length: int,
    pad_token_id: int,
    top_k: int | None,
) -> TeacherTensors:
    """The teacher tensors of ``groups``' rows in :func:`~recipe.atropos.trainer.dataproto.scored_data_to_dataproto`'s
    order and layout (same prompt/response split and truncation).

    ``top_k`` int: each row holds the env's ``top_k`` most likely entries, highest first; a position with fewer is not
    trained by the distillation term. ``top_k`` None: one entry, the sampled token and the teacher's log-prob of it; a
    position whose entries do not hold the sampled token is not trained by the term. Entry ``p`` of an env's
    ``[L][k]`` lists is the teacher at token ``p`` given ``tokens[:p]``; it lands in row ``p - 1`` (verl's alignment).
    """
    P, R = max_prompt_length, max_response_length
    K = 1 if top_k is None else top_k
    n = sum(g.size for g in groups)
    ids = torch.full((n, P + R, K), pad_token_id, dtype=torch.int32)
    logprobs = torch.zeros((n, P + R, K), dtype=torch.float32)
    mask = torch.zeros((n, R), dtype=torch.float32)
    rows_with = trained = covered = with_entry = short = 0
    row = -1
    for group in groups:
        k_env = group.distill_top_k or 0
        for i, (tokens, masks) in enumerate(zip(group.tokens, group.masks, strict=True)):
            row += 1
            start = first_trained_position(masks)
            p, r = min(start, P), min(len(tokens) - start, R)
            resp_trained = np.array([m != IGNORE_INDEX for m in masks[start : start + r]], dtype=bool)
            trained += int(resp_trained.sum())
            if group.distill_token_ids is None or group.distill_logprobs is None:
                continue
            rows_with += 1
            first, last = P - p, P + r - 1  # the row's first real column; its last: verl's dummy (id 0, log-prob 0)
            positions = range(start - p + 1, start + r)  # the tokens columns first .. last-1 predict
            if last < 0:
                continue
            ids[row, last] = 0  # logprobs stay 0
            if not positions:
                continue
            env_ids, env_lps, given = _row_entries(
                group.distill_token_ids[i], group.distill_logprobs[i], positions, k_env
            )
            targets = np.array([tokens[q] for q in positions], dtype=np.int64)
            hit = (env_ids == targets[:, None]) & given[:, None]
            if top_k is None:
                ok = hit.any(1)
                out_ids = targets[:, None]
                out_lps = np.where(hit, env_lps, 0.0).sum(1, keepdims=True)
            else:
                ok = given & (k_env >= top_k)
                short += int(0 < k_env < top_k)
                out_ids = np.full((len(positions), top_k), pad_token_id, dtype=np.int64)
                out_lps = np.zeros((len(positions), top_k), dtype=np.float64)
                if k_env >= top_k:
                    order = np.argsort(-env_lps, axis=1, kind="stable")[:, :top_k]
                    out_ids = np.where(ok[:, None], np.take_along_axis(env_ids, order, 1), out_ids)
                    out_lps = np.where(ok[:, None], np.take_along_axis(env_lps, order, 1), out_lps)
            ids[row, first:last] = torch.from_numpy(out_ids.astype(np.int32))
            logprobs[row, first:last] = torch.from_numpy(out_lps.astype(np.float32))
            # column c predicts response token c - P + 1 (< 0: a prompt token)
            resp = np.arange(first, last) - P + 1
            on = resp >= 0
            resp_rows, trained_here = resp[on], resp_trained[resp[on]]
            with_entry += int((given[on] & trained_here).sum())
            covered += int((hit.any(1)[on] & trained_here).sum())
            mask[row, resp_rows] = torch.from_numpy((ok[on] & trained_here).astype(np.float32))
    metrics = {
        "atropos/distill/rows_with_teacher": rows_with / max(n, 1),
        "atropos/distill/teacher_token_share": float(mask.sum()) / max(trained, 1),
        "atropos/distill/sampled_token_coverage": covered / max(with_entry, 1),
        "atropos/distill/rows_short_top_k": float(short),
    }
    return TeacherTensors(ids, logprobs, mask, metrics)


def attach_teacher(
    batch: DataProto, groups: Sequence[ScoredGroup | dict[str, Any]], plan: DistillationPlan, pad_token_id: int
) -> dict[str, float]:
    """Put ``teacher_ids``, ``teacher_logprobs`` and ``teacher_mask`` of ``groups`` (the groups ``batch`` was built
    from, in order) into ``batch``; returns the step's ``atropos/distill/*`` counts."""
    P, R = batch.batch["prompts"].shape[1], batch.batch["responses"].shape[1]
    parsed = [g if isinstance(g, ScoredGroup) else validate_group(g) for g in groups]
    built = teacher_tensors(
        parsed, max_prompt_length=P, max_response_length=R, pad_token_id=pad_token_id, top_k=plan.top_k
    )
    batch.batch["teacher_ids"] = built.ids
    batch.batch["teacher_logprobs"] = built.logprobs
    batch.batch["teacher_mask"] = built.mask
    return built.metrics


def sampled_token_teacher_logprobs(batch: DataProto) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's log-prob of each sampled response token [N, R] and where it is known [N, R] bool (trained, with
    a teacher, the token among the teacher's ids), read from the batch's teacher tensors."""
    tensors = batch.batch
    P = tensors["prompts"].shape[1]
    R = tensors["responses"].shape[1]
    ids = tensors["teacher_ids"][:, P - 1 : P - 1 + R].long()  # row P-1+r predicts response token r
    lps = tensors["teacher_logprobs"][:, P - 1 : P - 1 + R]
    match = ids == tensors["responses"].unsqueeze(-1)
    known = match.any(-1) & tensors["response_mask"].bool() & tensors["teacher_mask"].bool()
    return (lps * match).sum(-1), known


def distill_step_metrics(batch: DataProto) -> dict[str, float]:
    """``atropos/distill/reverse_kl_sampled``: mean over trained teacher tokens of ``log pi(y) - log teacher(y)`` on
    the sampled tokens y (the k1 estimate of KL(policy || teacher)), with the batch's ``old_log_probs`` (the policy at
    the step's start; the rollout's in bypass mode). Call after the log-probs are in the batch."""
    if "teacher_ids" not in batch.batch.keys() or "old_log_probs" not in batch.batch.keys():
        return {}
    teacher, known = sampled_token_teacher_logprobs(batch)
    if not bool(known.any()):
        return {"atropos/distill/reverse_kl_sampled": 0.0}
    gap = (batch.batch["old_log_probs"].float() - teacher)[known]
    return {"atropos/distill/reverse_kl_sampled": float(gap.mean())}
