"""verl's distillation loss with its distillation term restricted to the tokens that have a teacher.

verl 0.9.1's ``distillation_ppo_loss`` (``verl/trainer/distillation/losses.py``) adds the per-token distillation
loss of its registered ``loss_mode`` over every trained token (``response_mask``). In the Atropos loop only some
groups carry a teacher (``distill_token_ids`` / ``distill_logprobs``), so the batch holds ``teacher_mask`` [B, R]
(1: response token r has a teacher; :mod:`recipe.atropos.trainer.distillation`). Where it is 0, this wrapper makes
verl's per-token distillation loss exactly 0 with no gradient, and leaves everything else to verl:

- single-sample estimators (``k3``, ``mse``, ``abs``, ``low_var_kl``; ``k1``/``kl`` with ``use_policy_gradient``):
  the teacher's log-prob there is set to the policy's own, detached, so ``kl_penalty`` is 0 and its gradient 0;
  with ``use_policy_gradient`` the token's advantage ``-loss`` is 0 (``k1``/``kl`` without it are refused at start:
  their gradient ignores the teacher);
- ``forward_kl_topk``: the per-token losses verl's logits processor computed in the forward are multiplied by the
  mask (and its mass/overlap diagnostics, so verl's ``distillation/*`` means count those tokens as 0).

No loss is written here: the per-token loss, its clamping, the policy-gradient or supervised aggregation
(``loss_agg_mode`` over all trained tokens) and the sum with the RL loss (``use_task_rewards``,
``distillation_loss_coef``) are verl's. Without ``teacher_mask`` in the batch it is verl's loss unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from tensordict import TensorDict
from verl.trainer.distillation.losses import distillation_ppo_loss

MASK_KEY = "teacher_mask"  # [B, R] float: 1 where response token r has a teacher
TOPK_OUTPUTS = ("distillation_losses", "student_mass", "teacher_mass", "overlap_count", "overlap_token_advantage")


def _lengths(data: TensorDict) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and response lengths per row, as verl's ``no_padding_2_padding`` reads them."""
    prompts, responses = data["prompts"], data["responses"]
    if prompts.is_nested:
        return prompts.offsets().diff(), responses.offsets().diff()
    attention = data["attention_mask"]
    width = prompts.shape[1]
    return attention[:, :width].sum(dim=1), attention[:, width:].sum(dim=1)


def response_to_sequence_values(per_response: torch.Tensor, data: TensorDict) -> torch.Tensor:
    """[B, R] response-aligned values → [total_nnz] in the order of the model's unpadded outputs: response token r
    of a row lands on the position that predicts it (``seq_end - resp_len - 1 + r``), the inverse of verl's
    ``no_padding_2_padding``; every other position gets 0."""
    if per_response.is_nested:
        per_response = per_response.to_padded_tensor(0.0)
    prompt_lens, response_lens = _lengths(data)
    ends = (prompt_lens + response_lens).cumsum(dim=0)
    out = per_response.new_zeros(int(ends[-1]))
    for row, (resp_len, end) in enumerate(zip(response_lens.tolist(), ends.tolist(), strict=True)):
        out[end - resp_len - 1 : end - 1] = per_response[row, :resp_len]
    return out


def _nested_like(template: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    if template.is_nested:
        return torch.nested.nested_tensor_from_jagged(values, offsets=template.offsets())
    return values


def _values(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.values() if tensor.is_nested else tensor


def teacher_masked_distillation_ppo_loss(
    config: Any,
    distillation_config: Any,
    model_output: dict | None = None,
    data: TensorDict | None = None,
    dp_group: Any = None,
    student_logits: torch.Tensor | None = None,
    data_format: str = "thd",
) -> Any:
    """verl's ``distillation_ppo_loss`` (same signature and return: the logits processor's top-k outputs when
    ``student_logits`` is given, else ``(loss, metrics)``), its distillation term zero where ``teacher_mask`` is 0."""
    if student_logits is not None or data is None or MASK_KEY not in data.keys():
        return distillation_ppo_loss(
            config,
            distillation_config,
            model_output=model_output,
            data=data,
            dp_group=dp_group,
            student_logits=student_logits,
            data_format=data_format,
        )
    keep = response_to_sequence_values(data[MASK_KEY].float(), data).bool()
    model_output = dict(model_output)
    if distillation_config.distillation_loss.loss_settings.use_topk:
        for key in TOPK_OUTPUTS:
            if model_output.get(key) is not None:
                out = model_output[key]
                model_output[key] = _nested_like(out, _values(out) * keep.to(_values(out).dtype))
    else:
        teacher = data["teacher_logprobs"]
        own = _values(model_output["log_probs"]).detach().to(_values(teacher).dtype).unsqueeze(-1)
        masked = torch.where(keep.unsqueeze(-1), _values(teacher), own)
        data = data.copy()
        data["teacher_logprobs"] = _nested_like(teacher, masked)
    return distillation_ppo_loss(config, distillation_config, model_output=model_output, data=data, dp_group=dp_group)
