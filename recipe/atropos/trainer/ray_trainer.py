"""RayAtroposTrainer: verl's RayPPOTrainer whose rollouts come from Atropos environments.

Each step (``_train_step``): the group source hands one batch of scored groups → convert to a DataProto →
(colocated: pause the inference endpoint, sleep the replicas) → old log-probs (or the rollout's, in bypass mode) →
reference log-probs when KL is on → advantages (env token-level where given, verl GRPO elsewhere) → actor update →
checkpoint → push weights → resume the endpoint on the new policy version. With split placement
(``actor_rollout_ref.hybrid_engine=false``, :mod:`recipe.atropos.trainer.split_workers`) the replicas run on their own
resources and keep serving environments through the whole step; only the weight swap at its end touches them. Every
stage is a method so other recipes can override one without copying the loop; where groups come from is a
:class:`~recipe.atropos.sources.GroupSource` (``_make_group_source``). Groups carrying a teacher's ``distill_*``
train with verl's distillation loss (:mod:`recipe.atropos.trainer.distillation`); with ``distillation.teacher_models``
verl's teacher replicas answer for every row after conversion (``_ask_teacher``, :mod:`recipe.atropos.trainer.teacher`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm
from verl import DataProto
from verl.trainer.ppo.metric_utils import compute_data_metrics, compute_throughout_metrics, compute_timing_metrics
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, apply_kl_penalty
from verl.utils.debug import marked_timer
from verl.utils.metric import reduce_metrics
from verl.utils.tracking import Tracking

from recipe.atropos.access import inference_token
from recipe.atropos.algos.advantages import combine_advantages
from recipe.atropos.algos.losses import is_weight_metrics
from recipe.atropos.config.atropos_config import AtroposConfig
from recipe.atropos.config.checks import check_atropos_config, share_rollout_correction_with_actor
from recipe.atropos.endpoint.backends import RayReplicaBackend, VLLMCompletionsBackend
from recipe.atropos.endpoint.ledger import CompletionLedger
from recipe.atropos.endpoint.server import InferenceEndpoint
from recipe.atropos.metrics_file import append_metrics_row, held_out_points, read_metrics, wait_for_evaluation
from recipe.atropos.schema import ScoredGroup
from recipe.atropos.setup.assets import model_vocab_size
from recipe.atropos.sources import GroupSource, make_group_source
from recipe.atropos.sources.jsonl import JsonlGroupSource, offline_training_steps
from recipe.atropos.spool import ledger_file
from recipe.atropos.trainer.checkpoints import resume_step
from recipe.atropos.trainer.dataproto import scored_data_to_dataproto
from recipe.atropos.trainer.distillation import (
    attach_teacher,
    distill_step_metrics,
    install_distillation_loss,
    take_distillation,
    verl_update_flags,
)
from recipe.atropos.trainer.split_workers import HybridEngineFlag, init_split_workers, swap_holds_requests
from recipe.atropos.trainer.step_metrics import (
    OverlapMeter,
    group_score_metrics,
    promote_actor_is_metrics,
    rollout_logprob_diff,
    rollout_server_metrics,
)
from recipe.atropos.trainer.teacher import VerlTeacher, env_field_rows
from recipe.atropos.waiting import read_env_names

logger = logging.getLogger(__name__)


def await_evaluation(atropos: AtroposConfig, knob: str, version: int, otherwise: str) -> None:
    """Wait, at most ``atropos.<knob>`` seconds, until an env's evaluation of policy ``version`` is in
    ``atropos.metrics_file``; when none comes, a warning naming the knob and what happens ``otherwise``."""
    wait_s = float(getattr(atropos, knob))
    if not wait_for_evaluation(Path(atropos.metrics_file), version, wait_s):
        logger.warning(
            "no environment evaluated policy version %d within atropos.%s=%.0f s; %s", version, knob, wait_s, otherwise
        )


class RayAtroposTrainer(RayPPOTrainer):
    """GRPO on Atropos environments; constructor as RayPPOTrainer's (datasets are not used)."""

    def __init__(self, config: DictConfig, *args: Any, **kwargs: Any) -> None:
        self.atropos = check_atropos_config(config)  # typed and checked once; verl's __init__ builds the source
        share_rollout_correction_with_actor(config)  # before the workers copy the config
        # verl's distillation loss in the actor; the teacher: the envs' distill_* fields (verl's teacher manager kept
        # off) or verl's teacher replicas (distillation.teacher_models: verl's init builds them, _ask_teacher asks)
        self.distillation = take_distillation(config)
        self.teacher: VerlTeacher | None = None
        ledger_path = ledger_file(self.atropos, config.trainer)  # kept beside the spool: resumed lags are exact
        # Served completions expire one version past the lag cap: a span matching nothing is bounded by the oldest
        # completion not yet claimed (recipe.atropos.endpoint.ledger), and data older than the cap is stale anyway.
        cap = self.atropos.max_policy_lag
        horizon = None if cap is None else cap + 1
        self.ledger = CompletionLedger(self.atropos.inference.max_tracked_completions, ledger_path, horizon=horizon)
        self.endpoint: InferenceEndpoint | None = None
        self.swap_holds_requests = swap_holds_requests(config)
        self.overlap = OverlapMeter(count_replica_holds=not self.swap_holds_requests)
        with HybridEngineFlag(config) as split:
            super().__init__(config, *args, **kwargs)
        self.ledger.decode = self._decode_completion  # text matching of re-tokenised spans (OpenAI routes)
        self.split, self.hybrid_engine = split, not split

    def _decode_completion(self, token_ids: Any) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    # ---- verl hooks -------------------------------------------------------------------------------------------
    def init_workers(self) -> None:
        """Start the source first, then verl's workers: with the live API the trainer registers now, so environments
        are admitted and queue their first requests at the endpoint's ``/health`` while the workers start. The step
        is the one ``_load_checkpoint`` will resume at (the source checks the two agree in ``resume``)."""
        self.global_steps = resume_step(self.config.trainer)  # fit() sets it again (0, then the checkpoint's)
        self.source.start(self.global_steps)
        if self.split:
            init_split_workers(self)
        else:
            super().init_workers()
        if self.distillation is not None:
            install_distillation_loss(self.actor_rollout_wg, self.config, self.distillation)
        if self.distillation is not None and self.distillation.verl_teacher:  # built by RayPPOTrainer.init_workers
            self.teacher = VerlTeacher(self.config, self.teacher_model_manager)

    def _create_dataloader(self, train_dataset: Any, val_dataset: Any, collate_fn: Any, train_sampler: Any) -> None:
        """verl's dataloader slot holds the group source (so checkpoints keep its state); no validation set."""
        self.source = self._make_group_source()
        self.train_dataloader, self.val_dataloader = self.source, None
        requested = self.config.trainer.get("total_training_steps")
        if isinstance(self.source, JsonlGroupSource):  # saved groups: the data may end the run first
            self.total_training_steps = offline_training_steps(requested, self.source)
        else:
            available = None if self.source.online else self.source.steps_available()
            self.total_training_steps = int(requested) if available is None else min(int(requested), available)
        with open_dict(self.config):
            self.config.actor_rollout_ref.actor.optim.total_training_steps = self.total_training_steps
            if "critic" in self.config and "optim" in self.config.critic:
                self.config.critic.optim.total_training_steps = self.total_training_steps

    def _make_group_source(self) -> GroupSource:
        """Where each step's groups come from (``atropos.source``); override to feed groups another way.

        Called inside verl's ``RayPPOTrainer.__init__`` (from ``_create_dataloader``): a subclass's attributes set
        after ``super().__init__()`` do not exist yet. Set them before calling ``super().__init__()``, or read the
        config here (``self.config``, ``self.atropos``, ``self.tokenizer`` are set)."""
        return make_group_source(
            self.config,
            self.atropos,
            version_of=self.ledger.sequence_version,
            current_step=lambda: int(self.global_steps),
            vocab_size=model_vocab_size(str(self.config.actor_rollout_ref.model.path)),
        )

    def _update_actor(self, batch: DataProto) -> DataProto:
        """verl's update (with the env distillation's flags when on); a batch that lost groups
        (fallback_to_grpo=false) trains as one smaller mini-batch."""
        actor = self.config.actor_rollout_ref.actor
        configured = int(actor.ppo_mini_batch_size)
        with verl_update_flags(self, self.distillation):
            if len(batch) >= configured:
                return super()._update_actor(batch)
            with open_dict(self.config):
                actor.ppo_mini_batch_size = len(batch)
            try:
                return super()._update_actor(batch)
            finally:
                with open_dict(self.config):
                    actor.ppo_mini_batch_size = configured

    def _save_checkpoint(self) -> None:
        """verl's checkpoint, then the source forgets what it includes (the spool deletes trained groups)."""
        super()._save_checkpoint()
        self.source.checkpointed(int(self.global_steps))

    def _validate(self, merged: bool = False) -> dict[str, float]:
        return {}  # Atropos environments evaluate themselves (BaseEnv.evaluate)

    # ---- stages ---------------------------------------------------------------------------------------------
    def _start_inference_endpoint(self) -> InferenceEndpoint:
        """Expose verl's rollout replicas to Atropos environments at atropos.inference.{host,port}."""
        icfg = self.atropos.inference
        eos = self.tokenizer.eos_token_id
        eos_ids = list(eos) if isinstance(eos, list | tuple) else [eos]
        if icfg.backend == "ray":
            backend = RayReplicaBackend(self.llm_server_manager.server_handles, eos_ids)
        else:  # vllm_http; null name: ask each server (verl serves model_config.local_path, not model.path)
            backend = VLLMCompletionsBackend(self.llm_server_manager.server_addresses, icfg.served_model_name)
        endpoint = InferenceEndpoint(
            backend,
            host=icfg.host,
            port=icfg.port,
            max_tokens_cap=int(self.config.data.max_response_length),
            eos_token_ids=eos_ids,
            tokenizer=self.tokenizer,
            policy_version=self.global_steps,
            ledger=self.ledger,
            ready_file=icfg.ready_file,
            versions_from_rollout=not self.swap_holds_requests,
            api_key=inference_token(icfg.api_key),
            served_model_name=str(self.config.actor_rollout_ref.model.path),  # the envs' openai.model_name
        )
        return endpoint.start()

    def _poll_groups(self, metrics: dict[str, float]) -> list[ScoredGroup]:
        """Exactly data.train_batch_size sequences of whole groups for this step, from the source."""
        return self.source.next_groups(int(self.global_steps), metrics)

    def _to_dataproto(self, groups: Sequence[Any], metrics: dict[str, float]) -> DataProto:
        cfg = self.config.data
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        batch = scored_data_to_dataproto(
            groups,
            max_prompt_length=int(cfg.max_prompt_length),
            max_response_length=int(cfg.max_response_length),
            pad_token_id=int(pad),
        )
        metrics.update(batch.meta_info.pop("atropos_metrics", {}))
        metrics.update(group_score_metrics(groups))
        if self.distillation is not None and not self.distillation.verl_teacher:  # the groups' distill_* as verl's
            metrics.update(attach_teacher(batch, groups, self.distillation, int(pad)))  # teacher_ids / _logprobs
        batch.meta_info["global_token_num"] = torch.sum(batch.batch["attention_mask"], dim=-1).tolist()
        batch.meta_info["images_seqlens"] = []
        batch.meta_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
        return batch

    def _ask_teacher(
        self, batch: DataProto, groups: Sequence[Any], metrics: dict[str, float], timing: dict[str, float]
    ) -> None:
        """verl's way (``distillation.teacher_models``): verl's teacher replicas answer for every row of the converted
        batch, into its ``teacher_ids`` / ``teacher_logprobs`` / ``teacher_mask``
        (:class:`~recipe.atropos.trainer.teacher.VerlTeacher`); seconds in ``timing_s/teacher``. Rows whose group
        carried an env's ``distill_*`` fields get verl's teacher too (counted). Nothing without a teacher."""
        if self.teacher is None:
            return
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        with marked_timer("teacher", timing):
            metrics.update(self.teacher.attach(batch, int(pad), read_env_names(self.atropos.env_ids_file)))
        metrics["atropos/distill/env_field_rows_ignored"] = float(env_field_rows(groups))
        metrics.update(self.teacher.memory_metrics())

    def _compute_log_probs(self, batch: DataProto, metrics: dict[str, float], timing: dict[str, float]) -> DataProto:
        rollout_corr = self.config.algorithm.get("rollout_correction", None)
        has_rollout_lp = "rollout_log_probs" in batch.batch.keys()
        bypass = rollout_corr is not None and rollout_corr.get("bypass_mode", False)
        if bypass:
            # Rows whose env sent no inference_logprobs (most envs on the OpenAI routes): their old log-probs are
            # recomputed below, so the batch trains without the staleness correction (IS weight min(pi/pi_old, C)
            # against the policy at the step's start); their lag is still measured and capped (atropos.max_policy_lag).
            without = 0.0 if has_rollout_lp else float((~batch.batch["has_rollout_log_probs"]).sum())
            metrics["atropos/rows_without_rollout_logprobs"] = without
        if bypass and has_rollout_lp:
            # The behaviour policy's log-probs stand in for the old policy's (no old-log-prob pass); the actor's loss
            # applies the truncated IS weights from its own copy of rollout_correction (config.checks).
            batch.batch["old_log_probs"] = batch.batch["rollout_log_probs"]
        else:
            with marked_timer("old_log_prob", timing):
                old_log_prob, _mfu = self._compute_old_log_prob(batch)
                old_log_prob.batch.pop("entropys")
                batch = batch.union(old_log_prob)
            if has_rollout_lp:
                from verl.utils.debug.metrics import calculate_debug_metrics

                metrics.update(calculate_debug_metrics(batch))
                metrics.update(rollout_logprob_diff(batch))
        if self.use_reference_policy:
            with marked_timer("ref", timing):
                batch = batch.union(self._compute_ref_log_prob(batch))
        metrics.update(distill_step_metrics(batch))
        return batch

    def _compute_advantages(self, batch: DataProto, metrics: dict[str, float]) -> DataProto:
        """KL-in-reward and the decoupled IS weights (verl's), then the combined advantages
        (:func:`~recipe.atropos.algos.advantages.combine_advantages`); rows of dropped groups leave the batch."""
        if self.config.algorithm.use_kl_in_reward:
            batch, kl_metrics = apply_kl_penalty(batch, self.kl_ctrl_in_reward, self.config.algorithm.kl_penalty)
            metrics.update(kl_metrics)
        else:
            batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
        rollout_corr = self.config.algorithm.get("rollout_correction", None)
        decoupled = rollout_corr is not None and not rollout_corr.get("bypass_mode", False)
        if decoupled and "rollout_log_probs" in batch.batch.keys():
            from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch

            batch, is_metrics = compute_rollout_correction_and_add_to_batch(batch, rollout_corr)
            metrics.update(is_metrics)
            metrics.update(is_weight_metrics(is_metrics))
        tensors, extra = batch.batch, batch.non_tensor_batch
        combined = combine_advantages(
            env_advantages=tensors["token_level_advantages"],
            has_env_advantages=tensors["has_env_advantages"],
            rewards=tensors["token_level_rewards"],
            response_mask=tensors["response_mask"],
            group_ids=extra["uid"],
            zeroed=extra["advantage_zeroed"],
            use_env_advantages=self.atropos.use_env_advantages,
            fallback_to_grpo=self.atropos.fallback_to_grpo,
            norm_adv_by_std_in_grpo=bool(self.config.algorithm.get("norm_adv_by_std_in_grpo", True)),
            normalize=self.atropos.advantage.normalize,
            clip=self.atropos.advantage.clip_range,
        )
        batch.batch["advantages"] = combined.advantages
        batch.batch["returns"] = combined.advantages.clone()
        metrics.update(combined.metrics)
        if not bool(combined.keep.all()):
            batch = batch.select_idxs(combined.keep.numpy())
        return batch

    def _wait_for_evaluation(self, timing: dict[str, float]) -> None:
        """With ``atropos.eval_wait_s`` > 0: before the update, wait (at most that long) until an env's evaluation of
        the policy version the endpoint serves is in the metrics file, so that no evaluation straddles a weight push
        (``timing_s/eval_wait``); a warning when none came. Offline, or 0: nothing."""
        if self.endpoint is None or self.atropos.eval_wait_s <= 0 or not self.atropos.metrics_file:
            return
        with marked_timer("eval_wait", timing):
            await_evaluation(
                self.atropos,
                "eval_wait_s",
                self.endpoint.policy_version,
                "updating anyway (it waits for an env that evaluates at every step, steps_per_eval 1, writing to "
                "atropos.metrics_file)",
            )

    def _hold_rollout(self, timing: dict[str, float]) -> None:
        """Stop the replicas serving environments while the actor trains. Colocated (the hybrid engine) they share
        the device with the actor and the next completions must come from the updated weights: the endpoint is
        drained and paused (new requests wait) and the replicas sleep. Split placement and offline: nothing."""
        if self.endpoint is None or self.split:
            return
        with marked_timer("pause_endpoint", timing):
            self.endpoint.pause(self.atropos.inference.drain_timeout_s)
        self.checkpoint_manager.sleep_replicas()

    def _update_policy(self, batch: DataProto, metrics: dict[str, Any], timing: dict[str, float]) -> None:
        """The actor update (verl's ``_update_actor``) and its metrics; the overlap meter counts the completions the
        endpoint served meanwhile."""
        self.overlap.update_started(self._completions_served())
        with marked_timer("update_actor", timing):
            actor_output = self._update_actor(batch)
        self.overlap.update_ended(self._completions_served())
        metrics.update(reduce_metrics(actor_output.meta_info["metrics"]))
        promote_actor_is_metrics(metrics)

    def _should_save_checkpoint(self) -> bool:
        """Whether this step ends with a checkpoint: every ``trainer.save_freq`` steps and at the last step."""
        save_freq = int(self.config.trainer.save_freq)
        last = self.global_steps == self.total_training_steps
        return save_freq > 0 and (self.global_steps % save_freq == 0 or last)

    def _push_weights(self, metrics: dict[str, float]) -> None:
        """Weights of the just-trained actor to every replica. Split with a rollout that cannot tag completions with
        their version, the endpoint is drained and held for the transfer; colocated, it has been held since
        ``_hold_rollout``."""
        if self.split and self.swap_holds_requests:
            self.endpoint.pause(self.atropos.inference.drain_timeout_s)
        metrics.update(self.checkpoint_manager.update_weights(self.global_steps) or {})

    def _release_rollout(self) -> None:
        """The endpoint serves environments again, on the new policy version (``self.global_steps``)."""
        self.endpoint.resume(self.global_steps)

    def _completions_served(self) -> float:
        return float(self.endpoint.stats["completions"]) if self.endpoint is not None else 0.0

    def _collect_step_metrics(self, batch: DataProto, timing: dict[str, float], metrics: dict[str, Any]) -> None:
        """The source's, the rollout servers', the endpoint's and the overlap metrics, then verl's data, timing and
        throughput metrics (in place)."""
        metrics.update(self.source.metrics())
        server_metrics = rollout_server_metrics(self.llm_server_manager.server_handles)
        metrics.update(server_metrics)
        if self.endpoint is not None:
            counters = self.endpoint.counters()
            metrics["atropos/policy_version"] = float(self.endpoint.policy_version)
            metrics.update({f"atropos/endpoint/{k}": float(v) for k, v in counters.items()})
            metrics.update(self.endpoint.env_counters())
            metrics.update(self.overlap.step_metrics(timing, counters, server_metrics))
        metrics["training/global_step"] = self.global_steps
        metrics.update(compute_data_metrics(batch=batch, use_critic=False))
        metrics.update(compute_timing_metrics(batch=batch, timing_raw=timing))
        n_gpus = self.resource_pool_manager.get_n_gpus()
        metrics.update(compute_throughout_metrics(batch=batch, timing_raw=timing, n_gpus=n_gpus))

    # ---- the loop -------------------------------------------------------------------------------------------
    def fit(self) -> None:
        tracking = Tracking(
            project_name=self.config.trainer.project_name,
            experiment_name=self.config.trainer.experiment_name,
            default_backend=self.config.trainer.logger,
            config=OmegaConf.to_container(self.config, resolve=True),
        )
        self.global_steps = 0
        self._load_checkpoint()
        # Offline nothing generates: no endpoint and no weight pushes; the replicas verl started stay asleep
        # (init_workers ends with sleep_replicas).
        if self.source.online:
            self.checkpoint_manager.update_weights(self.global_steps)
            self.endpoint = self._start_inference_endpoint()
        succeeded = False
        try:
            self.source.resume(int(self.global_steps))
            self._train_loop(tracking)
            self._wait_for_final_evaluation()
            succeeded = True
        finally:
            if self.endpoint is not None:
                self.endpoint.stop()
            tracking.finish(exit_code=0 if succeeded else 1)

    def _wait_for_final_evaluation(self) -> None:
        """Keep serving the final policy until an env's evaluation of it is in the metrics file (at most
        ``atropos.final_eval_wait_s``), so a run's last held-out score is its final checkpoint's. Only when some env
        has evaluated during the run (an env that never evaluates is not waited for)."""
        path = self.atropos.metrics_file
        if self.endpoint is None or self.atropos.final_eval_wait_s <= 0 or not path:
            return
        if not held_out_points(read_metrics(Path(path))):
            return  # nothing to wait for: no environment has evaluated during this run
        self.endpoint.final = True  # /health says so: the bundled env evaluates a final policy it has not evaluated
        await_evaluation(self.atropos, "final_eval_wait_s", self.endpoint.policy_version, "exiting unevaluated")

    def _train_loop(self, tracking: Tracking) -> None:
        progress = tqdm(total=self.total_training_steps, initial=self.global_steps, desc="Training Progress")
        self.global_steps += 1
        while self.global_steps <= self.total_training_steps:
            metrics: dict[str, Any] = {}
            timing: dict[str, float] = {}
            with marked_timer("step", timing):
                batch = self._train_step(metrics, timing)
            self._collect_step_metrics(batch, timing, metrics)
            self._log_step(tracking, metrics)
            progress.update(1)
            self.global_steps += 1
        progress.close()

    def _train_step(self, metrics: dict[str, Any], timing: dict[str, float]) -> DataProto:
        """One training step (``self.global_steps``), stage by stage; returns the trained batch. Each stage adds its
        metrics to ``metrics`` and its seconds to ``timing``."""
        with marked_timer("poll", timing):
            groups = self._poll_groups(metrics)
        batch = self._to_dataproto(groups, metrics)
        self._ask_teacher(batch, groups, metrics, timing)
        self._wait_for_evaluation(timing)
        self._hold_rollout(timing)
        batch = self._compute_log_probs(batch, metrics, timing)
        with marked_timer("adv", timing):
            batch = self._compute_advantages(batch, metrics)
        self._update_policy(batch, metrics, timing)
        self.source.trained(groups, self.global_steps)
        if self._should_save_checkpoint():
            with marked_timer("save_checkpoint", timing):
                self._save_checkpoint()
        if self.endpoint is not None:  # None offline: nothing generates, no weights to push
            with marked_timer("update_weights", timing):
                self._push_weights(metrics)
                self._release_rollout()
        self.source.prefetch(self.global_steps)
        return batch

    def _log_step(self, tracking: Tracking, metrics: dict[str, Any]) -> None:
        """The step's metrics to verl's tracking (console, wandb, ...) and to ``atropos.metrics_file``."""
        tracking.log(data=metrics, step=self.global_steps)
        if self.atropos.metrics_file:
            append_metrics_row(Path(self.atropos.metrics_file), {"step": self.global_steps, **metrics})
