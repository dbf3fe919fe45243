"""Teacher distillation for any atroposlib environment: a mixin that fills ``distill_token_ids`` / ``distill_logprobs``
of every group the env posts from a teacher endpoint, for the trainer's on-policy distillation
(:mod:`recipe.atropos.trainer.distillation`: verl's distillation losses with ``distillation.enabled=true``).

Use::

    class MyEnvConfig(TeacherConfig): ...            # or TeacherConfig's fields in your own BaseEnvConfig subclass
    class MyEnv(TeacherDistillation, BaseEnv):      # the mixin first, so its handle_send_to_api runs first
        env_config_cls = MyEnvConfig

and run the env with ``--env.teacher_base_url http://HOST:PORT/v1`` (an endpoint answering ``POST /generate`` with
``prompt_logprobs`` as vLLM does: the recipe's inference endpoint serving a frozen model, or vLLM behind Atropos'
``vllm_api_server``) and ``--env.teacher_top_k``:

- ``0`` (default): one entry per position, the sampled token and the teacher's log-prob of it, for verl's
  single-sample losses (``distillation.distillation_loss.loss_mode`` k1 / k3 / ...);
- ``k``: the teacher's ``k`` most likely tokens per position, for ``loss_mode=forward_kl_topk`` with
  ``distillation_loss.topk=k``.

The teacher scores each whole sequence (prompt and completion) in one ``server.get_logprobs(input_ids=tokens,
top_k=...)`` call of atroposlib's own ``VLLMServer`` client. It must share the student's tokenizer (the ids are the
student's). Position 0 and positions the teacher gave nothing for are ``[]`` (no teacher there). A group whose scores
are all equal while ``ensure_scores_are_not_same`` is on is not sent to the teacher (BaseEnv drops it); a group that
already carries the fields keeps them; a group whose teacher call failed is posted without them (it trains as plain
RL) and counted in ``teacher_failures``. No torch here: the module runs in the environments' interpreter.

Started by the launcher with ``atropos.launcher.teacher.model_path`` set, an env gets the teacher it started through
the environment: ``ATROPOS_TEACHER_URL`` ({url}/v1) and ``ATROPOS_TEACHER_TOP_K``, read when the two flags are not
given (a flag wins).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from typing import Any

from atroposlib.envs.base import BaseEnvConfig
from pydantic import Field

logger = logging.getLogger(__name__)

# Set by the launcher for the teacher it starts (recipe.atropos.launcher.env_entries.teacher_environ, which names the
# same two variables: a test holds them equal); the --env.teacher_* flags win over them.
TEACHER_URL_ENV = "ATROPOS_TEACHER_URL"
TEACHER_TOP_K_ENV = "ATROPOS_TEACHER_TOP_K"


class TeacherConfig(BaseEnvConfig):
    """BaseEnv's config plus where the teacher is and how much of it to keep."""

    teacher_base_url: str | None = Field(
        None,
        description="The teacher endpoint's {url}/v1 (POST /generate with prompt_logprobs, vLLM style); None: "
        "$ATROPOS_TEACHER_URL (set by the launcher's atropos.launcher.teacher), else no distillation fields.",
    )
    teacher_top_k: int | None = Field(
        None,
        ge=0,
        description="0: the teacher's log-prob of each sampled token (loss_mode k1/k3/...); k: its k most likely "
        "tokens per position (loss_mode forward_kl_topk with distillation_loss.topk=k); None: "
        "$ATROPOS_TEACHER_TOP_K, else 0.",
    )
    teacher_api_key: str | None = Field(None, description="Bearer token of the teacher endpoint, if it asks one.")
    teacher_model_name: str = Field("teacher", description="The model name sent to the teacher endpoint.")
    teacher_timeout_s: float = Field(600.0, description="Seconds one teacher call may take.")


def teacher_rows(
    tokens: Sequence[int], entry_ids: Sequence[Sequence[int]], entry_lps: Sequence[Sequence[float]], top_k: int
) -> tuple[list[list[int]], list[list[float]]]:
    """atroposlib's ``get_logprobs`` answer for ``tokens`` (per position the teacher's entries, vLLM's: the top-k and
    the token itself when outside it) → the schema's ``[L][k]`` rows: ``top_k`` 0 keeps ``[tokens[p]]`` and its
    log-prob, ``top_k`` k keeps the k most likely (highest first); a position without them is ``[]``."""
    ids_out: list[list[int]] = []
    lps_out: list[list[float]] = []
    for p, token in enumerate(tokens):
        ids = list(entry_ids[p]) if p < len(entry_ids) else []
        lps = list(entry_lps[p]) if p < len(entry_lps) else []
        if top_k == 0:
            hit = [lp for t, lp in zip(ids, lps, strict=True) if t == token][:1]
            ids_out.append([int(token)] if hit else [])
            lps_out.append([min(float(hit[0]), 0.0)] if hit else [])
            continue
        order = sorted(range(len(ids)), key=lambda i: -lps[i])[:top_k]
        keep = len(order) == top_k
        ids_out.append([int(ids[i]) for i in order] if keep else [])
        lps_out.append([min(float(lps[i]), 0.0) for i in order] if keep else [])
    return ids_out, lps_out


class TeacherDistillation:
    """Mixin for an atroposlib ``BaseEnv`` whose config has :class:`TeacherConfig`'s fields (module docstring)."""

    teacher_failures: int = 0
    _teacher: Any = None

    def teacher_url(self) -> str | None:
        """``--env.teacher_base_url``, else ``$ATROPOS_TEACHER_URL``, else None (no teacher)."""
        return self.config.teacher_base_url or os.environ.get(TEACHER_URL_ENV) or None

    def teacher_top_k(self) -> int:
        """``--env.teacher_top_k``, else ``$ATROPOS_TEACHER_TOP_K``, else 0."""
        given = self.config.teacher_top_k
        return int(given) if given is not None else int(os.environ.get(TEACHER_TOP_K_ENV) or 0)

    def teacher_server(self) -> Any:
        """atroposlib's ``VLLMServer`` client of the teacher endpoint, built on first use."""
        if self._teacher is None:
            from atroposlib.envs.server_handling.server_baseline import APIServerConfig
            from atroposlib.envs.server_handling.vllm_server import VLLMServer

            config = self.config
            self._teacher = VLLMServer(
                APIServerConfig(
                    server_type="vllm",
                    base_url=self.teacher_url(),
                    model_name=config.teacher_model_name,
                    tokenizer_name=config.tokenizer_name,  # the student's: the teacher must share it
                    api_key=config.teacher_api_key or "x",
                    timeout=int(config.teacher_timeout_s),
                    health_check=False,
                )
            )
        return self._teacher

    async def teacher_entries(self, tokens: Sequence[int]) -> tuple[list[list[int]], list[list[float]]]:
        """The schema's rows for one sequence (:func:`teacher_rows`) from one teacher call."""
        top_k = self.teacher_top_k()
        payload = await self.teacher_server().get_logprobs(input_ids=list(tokens), top_k=max(top_k, 1), split="train")
        return teacher_rows(tokens, payload["prompt_topk_token_ids"], payload["prompt_topk_logprobs"], top_k)

    def _wants_teacher(self, group: Any) -> bool:
        if not self.teacher_url() or not isinstance(group, dict) or not group.get("tokens"):
            return False
        if group.get("distill_token_ids") and group.get("distill_logprobs"):
            return False  # the env filled them itself
        scores = group.get("scores") or []
        return not (self.config.ensure_scores_are_not_same and len(set(scores)) <= 1)

    async def attach_teacher(self, group: dict[str, Any]) -> bool:
        """Fill ``group``'s two fields from the teacher (every sequence at once); False, and the group unchanged, when
        a call failed."""
        try:
            rows = await asyncio.gather(*(self.teacher_entries(tokens) for tokens in group["tokens"]))
        except Exception as exc:  # the group still trains, as plain RL
            self.teacher_failures += 1
            logger.warning(
                "teacher call failed (%d so far); group posted without distillation: %r", self.teacher_failures, exc
            )
            return False
        group["distill_token_ids"] = [ids for ids, _ in rows]
        group["distill_logprobs"] = [lps for _, lps in rows]
        return True

    async def handle_send_to_api(self, scored_data: Any, item: Any = None, *args: Any, **kwargs: Any) -> Any:
        groups = scored_data if isinstance(scored_data, list) else [scored_data]
        await asyncio.gather(*(self.attach_teacher(g) for g in groups if self._wants_teacher(g)))
        return await super().handle_send_to_api(scored_data, item, *args, **kwargs)
