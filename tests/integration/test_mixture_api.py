"""Exact env mixtures against a real `run-api`: two envs registered through /register-env post at different speeds
(stand-ins for BaseEnv's posting loop: real HTTP, real API queue); the trainer's group source polls /batch through its
client and its MixtureBatcher holds the weights, where the API's FIFO batches follow the envs' speeds."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import requests

from recipe.atropos.sources.api import ApiGroupSource
from recipe.atropos.sources.mixture import MixtureBatcher
from recipe.atropos.staleness import LagMeter, no_ledger
from recipe.atropos.transport.client import AtroposClient
from tests.factories import X

logger = logging.getLogger(__name__)


def scored_group(env_id: int, size: int, score: float) -> dict:
    tokens = [[1, 2, 10 + i] for i in range(size)]
    return {
        "tokens": tokens,
        "masks": [[X, X, t[2]] for t in tokens],
        "scores": [score] * size,
        "advantages": None,
        "ref_logprobs": None,
        "messages": None,
        "inference_logprobs": None,
        "generation_params": None,
        "group_overrides": {},
        "overrides": None,
        "images": None,
        "env_id": env_id,
    }


class StandInEnv(threading.Thread):
    """Registers like BaseEnv.register_env, then posts one group every ``interval`` s until stopped."""

    def __init__(self, api_url: str, name: str, weight: float, group_size: int, interval: float, score: float) -> None:
        super().__init__(daemon=True)
        self.api_url, self.name, self.weight = api_url, name, weight
        self.group_size, self.interval, self.score = group_size, interval, score
        self.stop_event = threading.Event()
        body = {"max_token_length": 64, "desired_name": name, "weight": weight, "group_size": group_size}
        answer = requests.post(f"{api_url}/register-env", json={**body, "min_batch_allocation": None}, timeout=5)
        self.env_id = int(answer.json()["env_id"])

    def run(self) -> None:
        while not self.stop_event.is_set():
            group = scored_group(self.env_id, self.group_size, self.score)
            requests.post(f"{self.api_url}/scored_data", json=group, timeout=5).raise_for_status()
            time.sleep(self.interval)


@pytest.mark.timeout(120)
def test_two_envs_at_075_025_hold_the_weights_over_8_steps_although_the_small_one_is_faster(run_api) -> None:
    batcher = MixtureBatcher({"slow": 0.75, "fast": 0.25}, batch_size=8, wait_s=30.0, max_pending=4 * 8)
    registration = {"batch_size": 8, "max_token_len": 64, "num_steps": 100}
    source = ApiGroupSource(
        AtroposClient(run_api.url),
        batcher,
        LagMeter(no_ledger, None),
        registration=registration,
        poll_timeout_s=30,
    )
    source.start(0)  # registers; its first /batch admits envs
    assert batcher.pending_groups() == []
    slow = StandInEnv(run_api.url, "slow", 0.75, group_size=4, interval=0.05, score=1.0)
    fast = StandInEnv(run_api.url, "fast", 0.25, group_size=2, interval=0.005, score=0.0)
    # the launcher's registration check: /status-env answers for registered ids only
    status = [requests.get(f"{run_api.url}/status-env", json={"env_id": i}, timeout=5).status_code for i in range(3)]
    assert status[:2] == [200, 200] and status[2] != 200
    batcher.names.update({slow.env_id: "slow", fast.env_id: "fast"})
    trained = {"slow": 0, "fast": 0}
    slow.start()
    fast.start()
    try:
        for step in range(1, 9):
            metrics: dict[str, float] = {}
            groups = source.next_groups(step, metrics)
            assert sum(len(g.tokens) for g in groups) == 8
            for name in trained:
                trained[name] += int(metrics[f"atropos/env/{name}/sequences"])
            assert metrics["atropos/env/slow/mean_score"] == 1.0
            assert metrics["atropos/polls"] >= 1 and metrics["atropos/policy_lag_unknown"] == 8.0
            source.trained(groups, step)
            time.sleep(0.2)  # the actor update
    finally:
        slow.stop_event.set()
        fast.stop_event.set()
        slow.join(5)
        fast.join(5)

    fraction = trained["slow"] / 64
    fifo = batcher.received["slow"] / sum(batcher.received.values())
    logger.info("trained %s (slow %.3f); API FIFO: slow %.3f of %s", trained, fraction, fifo, batcher.received)
    assert abs(fraction - 0.75) <= 0.05, trained
    assert abs(trained["fast"] / 64 - 0.25) <= 0.05, trained
    assert batcher.reassigned_sequences == 0
    # what the API's FIFO batches held: mostly the faster env (the mixture the trainer would have drifted to)
    assert fifo < 0.5, batcher.received
