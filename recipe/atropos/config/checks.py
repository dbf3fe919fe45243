"""Start-up checks of a composed config that span the ``atropos`` block and verl's own keys; each fails before Ray
starts with one message naming the key and the fix. Run by ``main_atropos``, the launcher's pre-flight and
:class:`~recipe.atropos.trainer.RayAtroposTrainer`.

The staleness rules: Atropos environments generate ahead of the trainer, so a group can be trained up to
``atropos.max_policy_lag`` weight updates after the policy that sampled it. That is only correct with truncated
importance sampling (verl's ``algorithm.rollout_correction``), in one of two modes:

- bypass (``bypass_mode: true``): ``old_log_probs`` = the rollout's log-probs, no old-log-prob pass;
  ``advantage_weighted_ce`` weights each token by ``min(π_θ / π_rollout, C)``, ``vanilla`` is PPO-clip against the
  behaviour policy.
- decoupled (``bypass_mode: false``): the actor recomputes ``old_log_probs`` and the trainer adds token weights
  ``min(π_old / π_rollout, C)`` that every policy loss multiplies in.

``advantage_weighted_ce`` (``-A·log π``) has no ratio to the old policy, so it is only correct for a single update per
batch: :func:`check_staleness_config` refuses it with several mini-batches or epochs and names ``vanilla``.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf, open_dict

from recipe.atropos.access import API_KEY_ENV, check_exposure, inference_token
from recipe.atropos.algos.losses import POLICY_LOSS_NAME as ADVANTAGE_WEIGHTED_CE
from recipe.atropos.config.atropos_config import AtroposConfig, atropos_config
from recipe.atropos.setup.placement import is_split
from recipe.atropos.setup.weight_sync import lora_as_adapter

VLLM_ROLLOUTS = ("vllm", "vllm_cpu")  # rollouts that serve vLLM's OpenAI HTTP API (vllm_http backend)
# Set in the distillation block once the environments' way has hidden the switch from verl's trainer
# (recipe.atropos.trainer.distillation.take_distillation): distillation is on although distillation.enabled=false.
DISTILLATION_TAKEN_KEY = "atropos_env_teacher"


def check_atropos_config(config: DictConfig, atropos: AtroposConfig | None = None) -> AtroposConfig:
    """The typed ``atropos`` block (built here unless given), after every check of the whole config; ``ValueError``
    names the key and the fix."""
    atropos = atropos if atropos is not None else atropos_config(config)
    offline_epochs = atropos.source == "jsonl" and atropos.offline.epochs
    if not config.trainer.get("total_training_steps") and not offline_epochs:
        raise ValueError(
            "trainer.total_training_steps is required: data comes from the Atropos API, so there is no dataset to "
            "count epochs over. Pass e.g. trainer.total_training_steps=100"
        )
    if not config.actor_rollout_ref.model.get("path"):
        raise ValueError("actor_rollout_ref.model.path is required: a model directory or hub name")
    estimator = config.algorithm.get("adv_estimator")
    if estimator != "grpo":
        raise ValueError(
            f"algorithm.adv_estimator={estimator}: this recipe trains critic-free with the environments' advantages "
            "where given and GRPO elsewhere; use algorithm.adv_estimator=grpo (atropos.use_env_advantages / "
            "atropos.fallback_to_grpo choose the mix)"
        )
    check_staleness_config(config, atropos)
    check_lora_config(config, atropos)
    check_split_config(config, atropos.max_policy_lag, lora_as_adapter(config))
    check_launcher_teacher(config, atropos)
    inference = atropos.inference
    guarded = bool(inference_token(inference.api_key))
    key = f"atropos.inference.api_key (or ${API_KEY_ENV})"
    check_exposure(inference.host, guarded=guarded, what="the inference endpoint", key=key)
    batch = int(config.data.train_batch_size)
    if atropos.max_queued_sequences(batch) < batch:
        raise ValueError(
            f"atropos.guard.max_queued_sequences={atropos.guard.max_queued_sequences} is below data.train_batch_size="
            f"{batch}: no batch could form in the API's memory; use null (derived) or at least {batch}"
        )
    # vllm_cpu: verl's vLLM replica on the CPU runtime (atropos.cpu_rollout=vllm) serves the same HTTP API.
    if atropos.inference.backend == "vllm_http" and config.actor_rollout_ref.rollout.name not in VLLM_ROLLOUTS:
        raise ValueError(
            f"atropos.inference.backend=vllm_http needs a vLLM rollout, actor_rollout_ref.rollout.name=vllm (got "
            f"{config.actor_rollout_ref.rollout.name!r}): use atropos.inference.backend=ray"
        )
    return atropos


def check_launcher_teacher(config: DictConfig, atropos: AtroposConfig) -> None:
    """A launcher teacher (``atropos.launcher.teacher.model_path``) needs distillation on, the environments' way
    (its answers reach the trainer as the groups' ``distill_*`` fields): refused without ``distillation.enabled`` and
    beside verl's teacher replicas (``distillation.teacher_models``, which would answer for the same rows)."""
    if not atropos.launcher.teacher.model_path:
        return
    block = config.get("distillation") or {}
    if not (block.get("enabled") or block.get(DISTILLATION_TAKEN_KEY)):
        raise ValueError(
            "atropos.launcher.teacher.model_path is set but distillation.enabled=false: the envs' distill_* fields "
            "would train nothing. Set distillation.enabled=true (the loss: distillation.distillation_loss.*), or "
            "atropos.launcher.teacher.model_path=null"
        )
    models = block.get("teacher_models") or {}
    if any((m or {}).get("model_path") for m in models.values()):
        raise ValueError(
            "distillation.teacher_models and atropos.launcher.teacher.model_path are both set: two teachers for the "
            "same rows (verl's replicas answer for every row; the envs' distill_* fields would be ignored). Unset "
            "one: atropos.launcher.teacher.model_path=null (verl's way) or distillation.teacher_models (the envs' way)"
        )


def check_lora_config(config: DictConfig, atropos: AtroposConfig) -> None:
    """With a LoRA adapter push (``lora_rank > 0``, ``lora.merge=false``), refuse the two ways the rollout would keep
    sampling the base model while training goes on, silently:

    - a checkpoint engine other than ``naive``: verl 0.9.1's ``update_weights`` (``verl/workers/engine_workers.py``)
      then calls ``get_per_tensor_param()`` with ``base_sync_done=False`` and drops the ``peft_config``, so only the
      frozen base weights are sent (verl issue 7495); ``lora.merge=true`` sends merged weights on every backend;
    - ``atropos.inference.backend=vllm_http``: verl loads the adapter into vLLM's engine (``add_lora``) and applies it
      only on its own ``generate`` path; vLLM's OpenAI server knows no such model name and serves the base model.
    """
    if not lora_as_adapter(config):
        return
    engine = config.actor_rollout_ref.rollout.get("checkpoint_engine") or {}
    backend = engine.get("backend", "naive") or "naive"
    if backend != "naive":
        raise ValueError(
            f"actor_rollout_ref.rollout.checkpoint_engine.backend={backend} with a LoRA adapter push: verl sends only "
            "the frozen base weights on that path (verl issue 7495), so the rollout would keep sampling the initial "
            "policy. Set actor_rollout_ref.model.lora.merge=true (merged weights) or checkpoint_engine.backend=naive"
        )
    if atropos.inference.backend == "vllm_http":
        raise ValueError(
            "atropos.inference.backend=vllm_http with a LoRA adapter push: verl applies the adapter on its own "
            "generate path only, and vLLM's OpenAI server would serve the base model (a request naming the base "
            "model gets no LoRA). Use atropos.inference.backend=ray, or actor_rollout_ref.model.lora.merge=true"
        )


def check_split_config(config: DictConfig, max_policy_lag: int | None, lora_adapter: bool) -> None:
    """Refuse split-placement combinations that cannot train correctly; ``ValueError`` names the key and the fix."""
    if not is_split(config):
        return
    rollout = config.actor_rollout_ref.rollout
    if int(rollout.get("nnodes", 0) or 0) <= 0 or int(rollout.get("n_gpus_per_node", 0) or 0) <= 0:
        raise ValueError(
            "actor_rollout_ref.hybrid_engine=false puts the rollout on resources of its own: set "
            "actor_rollout_ref.rollout.nnodes and actor_rollout_ref.rollout.n_gpus_per_node (e.g. 1 and 2)"
        )
    if max_policy_lag == 0:
        raise ValueError(
            "atropos.max_policy_lag=0 with a split rollout (actor_rollout_ref.hybrid_engine=false): environments keep "
            "generating while the actor trains, so every group is at least one update old and none could train. "
            "Set atropos.max_policy_lag>=1 (with algorithm.rollout_correction) or hybrid_engine=true"
        )
    if lora_adapter:
        raise ValueError(
            "LoRA with a split rollout sends full weights through the checkpoint engine (verl's "
            "engine_workers.update_weights passes no LoRA config on that path): set "
            "actor_rollout_ref.model.lora.merge=true, or hybrid_engine=true to push the adapter"
        )


def updates_per_step(config: DictConfig) -> int:
    """Optimizer steps the actor takes per training batch: mini-batches × epochs."""
    actor = config.actor_rollout_ref.actor
    batch = int(config.data.train_batch_size)
    mini = int(actor.ppo_mini_batch_size) * int(config.actor_rollout_ref.rollout.get("n", 1) or 1)
    mini_batches = max(1, -(-batch // mini)) if mini > 0 else 1
    return mini_batches * int(actor.get("ppo_epochs", 1) or 1)


def check_staleness_config(config: DictConfig, atropos: AtroposConfig) -> None:
    """Refuse combinations that would train incorrectly on the lags the config allows (see the module docstring)."""
    actor = config.actor_rollout_ref.actor
    loss_mode = str(actor.policy_loss.get("loss_mode", "vanilla"))
    if loss_mode == ADVANTAGE_WEIGHTED_CE and updates_per_step(config) > 1:
        raise ValueError(
            f"actor_rollout_ref.actor.policy_loss.loss_mode={ADVANTAGE_WEIGHTED_CE} takes "
            f"{updates_per_step(config)} updates per batch (data.train_batch_size={config.data.train_batch_size}, "
            f"ppo_mini_batch_size={actor.ppo_mini_batch_size}, ppo_epochs={actor.get('ppo_epochs', 1)}), but -A·log π "
            "has no ratio or clip against the old policy, so every update after the first trains off-policy "
            "uncorrected. Use policy_loss.loss_mode=vanilla (PPO clip) or ppo_mini_batch_size=data.train_batch_size "
            "and ppo_epochs=1."
        )
    max_lag = atropos.max_policy_lag
    corr = config.algorithm.get("rollout_correction") or {}
    bypass = bool(corr.get("bypass_mode", False))
    has_is = corr.get("rollout_is") is not None
    allows_lag = max_lag is None or max_lag > 0
    if allows_lag and not bypass and not has_is:
        raise ValueError(
            f"atropos.max_policy_lag={max_lag} lets groups from older policies into training, but neither "
            "algorithm.rollout_correction.rollout_is nor .bypass_mode is set, so they would train without "
            "importance-sampling correction. Set algorithm.rollout_correction.rollout_is=token (truncated IS from "
            "inference_logprobs) or atropos.max_policy_lag=0."
        )
    if (bypass or has_is) and not config.actor_rollout_ref.rollout.get("calculate_log_probs", False):
        raise ValueError(
            "algorithm.rollout_correction needs the rollout's log-probs: set "
            "actor_rollout_ref.rollout.calculate_log_probs=true"
        )
    if bypass and loss_mode == ADVANTAGE_WEIGHTED_CE and not has_is and allows_lag:
        raise ValueError(
            f"bypass_mode with loss_mode={ADVANTAGE_WEIGHTED_CE} weights tokens by π_θ/π_rollout only when "
            "algorithm.rollout_correction.rollout_is is set: set rollout_is=token, or atropos.max_policy_lag=0"
        )


def share_rollout_correction_with_actor(config: DictConfig) -> None:
    """Copy ``algorithm.rollout_correction`` into ``actor.policy_loss.rollout_correction``.

    The actor workers get their own copy of the config when they are built: this is how the policy loss, running
    there, learns the IS level and threshold it applies in bypass mode. Call before the workers start.
    """
    corr = config.algorithm.get("rollout_correction")
    if corr is None:
        return
    plain = OmegaConf.to_container(corr, resolve=True)
    plain.pop("_target_", None)
    with open_dict(config):
        config.actor_rollout_ref.actor.policy_loss.rollout_correction = plain
