"""The group source a trainer config asks for (``atropos.source``, ``atropos.mixture``, ``atropos.spool``)."""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from recipe.atropos.config import AtroposConfig
from recipe.atropos.sources.api import ApiGroupSource
from recipe.atropos.sources.base import GroupSource
from recipe.atropos.sources.fifo import FifoBatcher
from recipe.atropos.sources.jsonl import make_jsonl_source
from recipe.atropos.sources.mixture import mixture_from_config
from recipe.atropos.spool import GroupSpool
from recipe.atropos.staleness import LagMeter, SequenceLookup
from recipe.atropos.transport.client import AtroposClient
from recipe.atropos.waiting import WaitReport


def make_group_source(
    config: DictConfig,
    atropos: AtroposConfig,
    *,
    version_of: SequenceLookup,
    current_step: Callable[[], int],
    vocab_size: int | None,
) -> GroupSource:
    """``source=jsonl``: the saved groups; ``source=api``: the live API through a client, the spool (unless off), and
    FIFO batches or the env mixture. ``version_of`` looks up which policy version sampled a trained sequence (the
    endpoint's ledger: :meth:`~recipe.atropos.endpoint.ledger.CompletionLedger.sequence_version`); ``current_step``
    is the trainer's step (re-registration after an API restart)."""
    batch_size = int(config.data.train_batch_size)
    if atropos.source == "jsonl":
        return make_jsonl_source(atropos, batch_size)
    trainer = config.trainer
    registration = {
        "batch_size": batch_size,
        "max_token_len": int(config.data.max_prompt_length + config.data.max_response_length),
        "num_steps": int(trainer.total_training_steps),
        "wandb_group": atropos.wandb_group or str(trainer.experiment_name),
        "wandb_project": atropos.wandb_project or str(trainer.project_name),
        "checkpoint_dir": str(trainer.default_local_dir),
        "save_checkpoint_interval": int(trainer.save_freq),
    }
    drain = atropos.spool.drain_max_sequences
    return ApiGroupSource(
        AtroposClient.from_config(atropos, vocab_size=vocab_size, current_step=current_step),
        mixture_from_config(atropos, batch_size) or FifoBatcher(batch_size),
        LagMeter(version_of, atropos.max_policy_lag),
        registration=registration,
        poll_timeout_s=atropos.poll_timeout_s,
        spool=GroupSpool.from_config(atropos, trainer),
        drain_max_sequences=batch_size if drain is None else drain,
        waits=WaitReport(
            atropos.api_url,
            inference_url=f"http://{atropos.inference.host}:{atropos.inference.port}",
            env_ids_file=atropos.env_ids_file,
            wait_file=atropos.wait_file,
        ),
    )
