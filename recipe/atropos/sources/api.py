"""Where each step's groups come from: the saved JSONL files (offline), the env mixture, or the API's FIFO batches.

:class:`GroupPolling` is a mixin of :class:`~recipe.atropos.trainer.RayAtroposTrainer`; it reads the trainer's
``config``, ``atropos_cfg``, ``client``, ``ledger``, ``mixture``, ``train_dataloader``, ``global_steps`` and keeps
the groups fetched beyond one batch in ``_carry``. A recipe that feeds groups another way overrides ``_poll_groups``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recipe.atropos.sources.mixture import MixtureBatcher, fill_mixture_batch, group_tokens, select_groups
from recipe.atropos.sources.jsonl import JsonlGroupSource
from recipe.atropos.staleness import lag_histogram


class ApiStepSource:
    """Stands in for verl's dataloader (data comes from the Atropos API); checkpoints record the source and the
    mixture's cumulative counts (when a mixture is held)."""

    mixture: MixtureBatcher | None = None

    def __len__(self) -> int:
        return 0

    def state_dict(self) -> dict[str, Any]:
        return {"source": "atropos", "mixture": self.mixture.state_dict() if self.mixture is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.mixture is not None and state.get("mixture"):
            self.mixture.load_state_dict(state["mixture"])


class GroupPolling:
    """Exactly ``data.train_batch_size`` sequences of whole groups per step, with lag and mixture metrics."""

    _env_ids_mtime: int | None = None  # of atropos.env_ids_file when last read

    def _policy_lag(self, tokens: Sequence[int]) -> int | None:
        """Weight updates between the policy that generated ``tokens`` and the one being trained (None = unknown)."""
        version = self.ledger.version_of(tokens)
        return None if version is None else (self.global_steps - 1) - version

    def _poll_groups(self, metrics: dict[str, float]) -> list[Any]:
        """Exactly data.train_batch_size sequences of whole groups: stale groups dropped, extras carried over."""
        if isinstance(self.train_dataloader, JsonlGroupSource):  # offline: the next groups of the saved files
            groups = self.train_dataloader.next_batch()
            metrics.update(self.train_dataloader.metrics())
            return groups
        if self.mixture is not None:
            return self._poll_mixture(metrics)
        batch_size = int(self.config.data.train_batch_size)
        max_lag = self.atropos_cfg.get("max_policy_lag")
        max_lag = None if max_lag is None else int(max_lag)
        pending, self._carry = list(self._carry), []
        sel = select_groups(pending, batch_size, self._policy_lag, max_lag)
        polls, wait_s = 0, 0.0
        while sel.n_sequences < batch_size:
            start = time.monotonic()
            polled = self.client.poll_batch(timeout=float(self.atropos_cfg.poll_timeout_s))
            wait_s += time.monotonic() - start
            polls += 1
            carry, sel.carry = sel.carry, []
            sel = select_groups([*carry, *polled], batch_size, self._policy_lag, max_lag, already=sel)
        self._carry = sel.carry
        metrics.update(
            {
                "atropos/polls": float(polls),
                "atropos/poll_wait_s": wait_s,
                "atropos/carried_groups": float(len(self._carry)),
                "atropos/stale_groups_dropped": float(sel.stale_groups_dropped),
                "atropos/policy_lag_unknown": float(sel.policy_lag_unknown),
            }
        )
        if sel.lags:
            metrics["atropos/policy_lag_mean"] = float(np.mean(sel.lags))
            metrics["atropos/policy_lag_max"] = float(np.max(sel.lags))
            metrics.update(lag_histogram(sel.lags))
        return sel.chosen

    def _held_groups(self) -> list[Any]:
        """Fetched groups kept for later steps: the carry-over and, with a mixture, its surplus per env."""
        held = list(self._carry)
        if self.mixture is not None:
            held += [group for queue in self.mixture.pending.values() for group in queue]
        return held

    def _refresh_env_names(self) -> None:
        """Env id → name from ``atropos.env_ids_file`` (the launcher writes it as each env registers); read again only
        when the file changed."""
        path = self.atropos_cfg.get("env_ids_file")
        if not path or not Path(path).exists():
            return
        mtime = Path(path).stat().st_mtime_ns
        if mtime != self._env_ids_mtime:
            self.mixture.names.update({int(k): str(v) for k, v in json.loads(Path(path).read_text()).items()})
            self._env_ids_mtime = mtime

    def _poll_mixture(self, metrics: dict[str, float]) -> list[Any]:
        """Exactly data.train_batch_size sequences filled to the env weights (:class:`MixtureBatcher`)."""
        max_lag = self.atropos_cfg.get("max_policy_lag")
        max_lag = None if max_lag is None else int(max_lag)
        self._refresh_env_names()
        self.mixture.add(self._carry)
        self._carry = []

        def poll() -> list[Any]:
            groups = self.client.poll_batch(timeout=float(self.atropos_cfg.poll_timeout_s))
            self._refresh_env_names()
            return groups

        start = time.monotonic()
        groups, polls = fill_mixture_batch(self.mixture, poll, lag_of=self._policy_lag, max_policy_lag=max_lag)
        lags = [self._policy_lag(tokens) for g in groups for tokens in group_tokens(g)]
        known = [lag for lag in lags if lag is not None]
        metrics.update(
            {
                "atropos/polls": float(polls),
                "atropos/poll_wait_s": time.monotonic() - start,
                "atropos/policy_lag_unknown": float(len(lags) - len(known)),
                **self.mixture.metrics(groups),
            }
        )
        if known:
            metrics["atropos/policy_lag_mean"] = float(np.mean(known))
            metrics["atropos/policy_lag_max"] = float(np.max(known))
            metrics.update(lag_histogram(known))
        return groups
