"""RayAtroposTrainer: verl's RayPPOTrainer whose rollouts come from Atropos environments.

Each step: poll one batch of scored groups from the Atropos API → convert to a DataProto → (pause the inference
endpoint, sleep the replicas) → old log-probs (or the rollout's, in bypass mode) → reference log-probs when KL is on →
advantages (env token-level where given, verl GRPO elsewhere) → actor update → checkpoint → push weights → resume the
endpoint on the new policy version. Every stage is a method so other recipes can override one without copying the loop.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from tqdm import tqdm
from verl import DataProto
from verl.trainer.ppo.metric_utils import (
    compute_data_metrics,
    compute_throughout_metrics,
    compute_timing_metrics,
)
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, apply_kl_penalty
from verl.utils.debug import marked_timer
from verl.utils.metric import reduce_metrics
from verl.utils.tracking import Tracking

from recipe.atropos.algos.advantages import compute_atropos_advantages
from recipe.atropos.sources.mixture import (
    group_scores,
    mixture_from_config,
)
from recipe.atropos.transport.client import AtroposClient
from recipe.atropos.config.checks import check_atropos_config
from recipe.atropos.trainer.dataproto import scored_data_to_dataproto
from recipe.atropos.endpoint.server import (
    CompletionLedger,
    InferenceEndpoint,
    RayReplicaBackend,
    VLLMCompletionsBackend,
)
from recipe.atropos.sources.jsonl import JsonlGroupSource, make_jsonl_source, offline_training_steps
from recipe.atropos.launcher.report import append_metrics_row, held_out_points, read_metrics, wait_for_evaluation
from recipe.atropos.sources.api import ApiStepSource, GroupPolling
from recipe.atropos.launcher.preflight import model_vocab_size
from recipe.atropos.transport.spool import GroupSpool
from recipe.atropos.staleness import (
    is_weight_metrics,
    promote_actor_is_metrics,
    rollout_logprob_diff,
    share_rollout_correction_with_actor,
)

# Re-exported: other recipes and tests import these from the trainer module.
__all__ = ["ApiStepSource", "RayAtroposTrainer", "check_atropos_config", "rollout_logprob_diff"]

logger = logging.getLogger(__name__)


def resume_step(trainer_cfg: DictConfig) -> int:
    """The step verl's ``RayPPOTrainer._load_checkpoint`` will resume at (0 = from scratch), read without loading.

    Same rules: ``resume_mode`` disable → 0; auto → the tracker file in ``default_local_dir`` (relative to the working
    directory), none → 0; resume_path → the ``global_step_N`` of ``resume_from_path``.
    """
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    mode = trainer_cfg.get("resume_mode", "auto")
    if mode == "disable":
        return 0
    if mode == "resume_path" and isinstance(trainer_cfg.get("resume_from_path"), str):
        folder = str(trainer_cfg.resume_from_path)
    else:
        folder = find_latest_ckpt_path(os.path.abspath(str(trainer_cfg.default_local_dir)))
    if folder is None or "global_step_" not in folder:
        return 0  # verl trains from scratch (auto) or fails with its own message
    return int(folder.split("global_step_")[-1].rstrip("/"))


class RayAtroposTrainer(GroupPolling, RayPPOTrainer):
    """GRPO on Atropos environments; constructor as RayPPOTrainer's (datasets are not used)."""

    def __init__(self, config: DictConfig, *args: Any, **kwargs: Any) -> None:
        check_atropos_config(config)
        share_rollout_correction_with_actor(config)  # before the workers copy the config
        super().__init__(config, *args, **kwargs)
        self.atropos_cfg = config.atropos
        self.endpoint: InferenceEndpoint | None = None
        self.ledger = CompletionLedger(int(self.atropos_cfg.inference.max_tracked_completions))
        self.spool = GroupSpool.from_config(config)
        self.client = AtroposClient.from_config(
            self.atropos_cfg,
            vocab_size=model_vocab_size(str(config.actor_rollout_ref.model.path)),
            current_step=lambda: int(self.global_steps),
            spool=self.spool,
        )
        self._carry: list[Any] = []  # groups polled beyond one step's batch, trained next step
        self._registered_step: int | None = None  # the step the API was told (init_workers registers)
        self.mixture = mixture_from_config(config) if config.atropos.get("source", "api") == "api" else None
        if isinstance(self.train_dataloader, ApiStepSource):
            self.train_dataloader.mixture = self.mixture

    # ---- verl hooks -------------------------------------------------------------------------------------------
    def init_workers(self) -> None:
        """Register with the API first, then start verl's workers: environments get admitted, pass atroposlib's
        start-up pause (5 s after registering) and queue their first requests at the endpoint's ``/health`` while our
        workers start, instead of after. The step is the one ``_load_checkpoint`` will resume at (checked in fit)."""
        if self.config.atropos.get("source", "api") == "api":
            # A restored API queue can answer the first /batch at once: the spool records those groups at this step.
            self.global_steps = resume_step(self.config.trainer)  # fit() sets it again (0, then the checkpoint's)
            self._register(self.global_steps)
        super().init_workers()

    def _create_dataloader(self, train_dataset: Any, val_dataset: Any, collate_fn: Any, train_sampler: Any) -> None:
        if self.config.atropos.get("source", "api") == "jsonl":  # offline: saved groups, no API / env / endpoint
            self.train_dataloader = make_jsonl_source(self.config)
            requested = self.config.trainer.get("total_training_steps")
            self.total_training_steps = offline_training_steps(requested, self.train_dataloader)
        else:
            self.train_dataloader = ApiStepSource()
            self.total_training_steps = int(self.config.trainer.total_training_steps)
        self.val_dataloader = None
        with open_dict(self.config):
            self.config.actor_rollout_ref.actor.optim.total_training_steps = self.total_training_steps
            if "critic" in self.config and "optim" in self.config.critic:
                self.config.critic.optim.total_training_steps = self.total_training_steps

    def _update_actor(self, batch: DataProto) -> DataProto:
        """verl's update; a batch that lost groups (fallback_to_grpo=false) trains as one smaller mini-batch."""
        actor = self.config.actor_rollout_ref.actor
        configured = int(actor.ppo_mini_batch_size)
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
        """verl's checkpoint, then the spool forgets the groups it includes."""
        super()._save_checkpoint()
        if self.spool is not None:
            self.spool.checkpointed(int(self.global_steps))

    def _validate(self, merged: bool = False) -> dict[str, float]:
        return {}  # Atropos environments evaluate themselves (BaseEnv.evaluate)

    # ---- stages ---------------------------------------------------------------------------------------------
    def _start_inference_endpoint(self) -> InferenceEndpoint:
        """Expose verl's rollout replicas to Atropos environments at atropos.inference.{host,port}."""
        icfg = self.atropos_cfg.inference
        eos = self.tokenizer.eos_token_id
        eos_ids = list(eos) if isinstance(eos, list | tuple) else [eos]
        if icfg.backend == "ray":
            backend = RayReplicaBackend(self.llm_server_manager.server_handles, eos_ids)
        elif icfg.backend == "vllm_http":
            # null: ask each vLLM server which name it serves (verl serves model_config.local_path, not model.path)
            backend = VLLMCompletionsBackend(self.llm_server_manager.server_addresses, icfg.get("served_model_name"))
        else:
            raise ValueError(f"atropos.inference.backend={icfg.backend!r}: use 'ray' or 'vllm_http'")
        endpoint = InferenceEndpoint(
            backend,
            host=icfg.host,
            port=int(icfg.port),
            max_tokens_cap=int(self.config.data.max_response_length),
            eos_token_ids=eos_ids,
            tokenizer=self.tokenizer,
            policy_version=self.global_steps,
            ledger=self.ledger,
            ready_file=icfg.get("ready_file"),
        )
        return endpoint.start()

    def _register(self, starting_step: int) -> None:
        """Register with the API at ``starting_step``, then make envs admissible (they wait for the first /batch)."""
        cfg = self.config
        self.client.register(
            batch_size=int(cfg.data.train_batch_size),
            max_token_len=int(cfg.data.max_prompt_length + cfg.data.max_response_length),
            starting_step=int(starting_step),
            num_steps=int(self.total_training_steps),
            wandb_group=str(self.atropos_cfg.wandb_group),
            wandb_project=str(self.atropos_cfg.wandb_project),
            checkpoint_dir=str(cfg.trainer.default_local_dir),
            save_checkpoint_interval=int(cfg.trainer.save_freq),
        )
        self._registered_step = int(starting_step)
        self._carry.extend(self.client.get_batch() or [])

    def _resume_spooled_groups(self) -> None:
        """Groups an earlier run fetched but did not train come first (after the checkpoint load set the step)."""
        if self.spool is not None:
            max_lag = self.atropos_cfg.get("max_policy_lag")
            resumed = self.spool.resume(int(self.global_steps), None if max_lag is None else int(max_lag))
            self._carry[:0] = resumed

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
        scores = [s for g in groups for s in group_scores(g)]
        identical = [len(set(group_scores(g))) == 1 for g in groups]
        metrics.update(
            {
                "atropos/groups": float(len(groups)),
                "atropos/sequences": float(len(scores)),
                "atropos/mean_score": float(np.mean(scores)),
                "atropos/identical_score_rate": float(np.mean(identical)),
            }
        )
        batch.meta_info["global_token_num"] = torch.sum(batch.batch["attention_mask"], dim=-1).tolist()
        batch.meta_info["images_seqlens"] = []
        batch.meta_info["temperature"] = self.config.actor_rollout_ref.rollout.temperature
        return batch

    def _compute_log_probs(self, batch: DataProto, metrics: dict[str, float], timing: dict[str, float]) -> DataProto:
        rollout_corr = self.config.algorithm.get("rollout_correction", None)
        has_rollout_lp = "rollout_log_probs" in batch.batch.keys()
        if rollout_corr is not None and rollout_corr.get("bypass_mode", False):
            if not has_rollout_lp:
                raise ValueError(
                    "algorithm.rollout_correction.bypass_mode=true needs inference_logprobs in every group; "
                    "use ManagedServer in the environments or set bypass_mode=false"
                )
            # The behaviour policy's log-probs stand in for the old policy's (no old-log-prob pass); the actor's loss
            # applies the truncated IS weights from its own copy of rollout_correction (staleness.py).
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
        return batch

    def _compute_advantages(self, batch: DataProto, metrics: dict[str, float]) -> DataProto:
        if self.config.algorithm.use_kl_in_reward:
            batch, kl_metrics = apply_kl_penalty(batch, self.kl_ctrl_in_reward, self.config.algorithm.kl_penalty)
            metrics.update(kl_metrics)
        else:
            batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
        rollout_corr = self.config.algorithm.get("rollout_correction", None)
        if (
            rollout_corr is not None
            and "rollout_log_probs" in batch.batch.keys()
            and not rollout_corr.get("bypass_mode", False)
        ):
            from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch

            batch, is_metrics = compute_rollout_correction_and_add_to_batch(batch, rollout_corr)
            metrics.update(is_metrics)
            metrics.update(is_weight_metrics(is_metrics))
        batch = compute_atropos_advantages(
            batch,
            use_env_advantages=bool(self.atropos_cfg.use_env_advantages),
            fallback_to_grpo=bool(self.atropos_cfg.fallback_to_grpo),
            norm_adv_by_std_in_grpo=bool(self.config.algorithm.get("norm_adv_by_std_in_grpo", True)),
            normalize=str((self.atropos_cfg.get("advantage") or {}).get("normalize", "none")),
            clip=(self.atropos_cfg.get("advantage") or {}).get("clip"),
        )
        metrics.update(batch.meta_info.pop("atropos_metrics", {}))
        return batch

    def _push_weights(self) -> None:
        """Weights of the just-trained actor to every replica; the endpoint then serves the new policy version."""
        self.checkpoint_manager.update_weights(self.global_steps)
        self.endpoint.resume(self.global_steps)

    def _rollout_server_metrics(self) -> dict[str, float]:
        """``rollout/<replica>/<key>`` from every rollout server that has a ``stats()`` method (hf_cpu, vllm_cpu)."""
        import ray

        metrics: dict[str, float] = {}
        for i, handle in enumerate(self.llm_server_manager.server_handles):
            if not hasattr(handle, "stats"):  # Ray handles raise AttributeError for methods the actor lacks
                continue
            for key, value in ray.get(handle.stats.remote()).items():
                metrics[f"rollout/{i}/{key}"] = float(value)
        return metrics

    def _write_metrics_line(self, metrics: dict[str, Any]) -> None:
        path = self.atropos_cfg.get("metrics_file")
        if path:
            append_metrics_row(Path(path), {"step": self.global_steps, **metrics})

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
        # Offline (atropos.source=jsonl) nothing generates: no endpoint, no registration, no weight pushes; the
        # replicas verl started stay asleep (init_workers ends with sleep_replicas).
        offline = isinstance(self.train_dataloader, JsonlGroupSource)
        if not offline:
            self.checkpoint_manager.update_weights(self.global_steps)
            self.endpoint = self._start_inference_endpoint()
        succeeded = False
        try:
            if not offline:
                if self._registered_step is None:  # init_workers was overridden without calling ours
                    self._register(int(self.global_steps))
                elif self._registered_step != self.global_steps:
                    raise RuntimeError(
                        f"registered with the Atropos API at step {self._registered_step} but the checkpoint load "
                        f"resumed at step {self.global_steps}: check trainer.resume_mode / trainer.resume_from_path"
                    )
                self._resume_spooled_groups()
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
        wait_s = float(self.atropos_cfg.get("final_eval_wait_s") or 0)
        path = self.atropos_cfg.get("metrics_file")
        if self.endpoint is None or wait_s <= 0 or not path or not held_out_points(read_metrics(Path(path))):
            return  # nothing to wait for: no environment has evaluated during this run
        version = self.endpoint.policy_version
        self.endpoint.final = True  # /health says so: the bundled env evaluates a final policy it has not evaluated
        if not wait_for_evaluation(Path(path), version, wait_s):
            logger.warning("no environment evaluated the final policy (version %d) within %.0f s", version, wait_s)

    def _train_loop(self, tracking: Tracking) -> None:
        progress = tqdm(total=self.total_training_steps, initial=self.global_steps, desc="Training Progress")
        self.global_steps += 1
        while self.global_steps <= self.total_training_steps:
            metrics: dict[str, Any] = {}
            timing: dict[str, float] = {}
            with marked_timer("step", timing):
                with marked_timer("poll", timing):
                    groups = self._poll_groups(metrics)
                batch = self._to_dataproto(groups, metrics)
                # Envs wait while the actor trains: replicas share the device with it (hybrid engine) and the
                # next completions must come from the updated weights.
                if self.endpoint is not None:  # None offline
                    with marked_timer("pause_endpoint", timing):
                        self.endpoint.pause(float(self.atropos_cfg.inference.drain_timeout_s))
                    self.checkpoint_manager.sleep_replicas()
                batch = self._compute_log_probs(batch, metrics, timing)
                with marked_timer("adv", timing):
                    batch = self._compute_advantages(batch, metrics)
                with marked_timer("update_actor", timing):
                    actor_output = self._update_actor(batch)
                metrics.update(reduce_metrics(actor_output.meta_info["metrics"]))
                promote_actor_is_metrics(metrics)
                if self.spool is not None:
                    self.spool.trained(groups, self.global_steps, carried=self._held_groups())
                save_freq = int(self.config.trainer.save_freq)
                if save_freq > 0 and (
                    self.global_steps % save_freq == 0 or self.global_steps == self.total_training_steps
                ):
                    with marked_timer("save_checkpoint", timing):
                        self._save_checkpoint()
                if self.endpoint is not None:
                    with marked_timer("update_weights", timing):
                        self._push_weights()
                drain = int((self.atropos_cfg.get("spool") or {}).get("drain_max_sequences") or 0)
                if self.spool is not None and self.endpoint is not None and drain > 0:  # keep the API's queue small
                    self._carry.extend(self.client.drain(drain))
            metrics.update(self.client.metrics())
            metrics.update(self._rollout_server_metrics())
            if self.endpoint is not None:
                metrics["atropos/policy_version"] = float(self.endpoint.policy_version)
                metrics.update({f"atropos/endpoint/{k}": float(v) for k, v in self.endpoint.stats.items()})
            metrics["training/global_step"] = self.global_steps
            metrics.update(compute_data_metrics(batch=batch, use_critic=False))
            metrics.update(compute_timing_metrics(batch=batch, timing_raw=timing))
            n_gpus = self.resource_pool_manager.get_n_gpus()
            metrics.update(compute_throughout_metrics(batch=batch, timing_raw=timing, n_gpus=n_gpus))
            tracking.log(data=metrics, step=self.global_steps)
            self._write_metrics_line(metrics)
            progress.update(1)
            self.global_steps += 1
        progress.close()
