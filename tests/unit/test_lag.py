"""Policy lag, computed once (recipe.atropos.staleness): the formula, its lower bound on resume, the env queue depth,
and the lag meter the group sources use; every expected value is worked out by hand in the test."""

from __future__ import annotations

from recipe.atropos.staleness import (
    LagMeter,
    env_max_batches_offpolicy,
    lag_lower_bound,
    lag_metrics,
    policy_lag,
    trained_version,
)


def test_step_s_trains_the_weights_after_s_minus_1_updates() -> None:
    assert trained_version(1) == 0  # the first step trains the initial policy
    assert policy_lag(step=1, sampled_version=0) == 0
    assert policy_lag(step=5, sampled_version=2) == 2  # version 4 trains a sample of version 2


def test_lower_bound_of_a_group_fetched_in_an_earlier_run() -> None:
    # fetched during step 3: sampled by version <= 2; trained at step 6 (version 5): lag >= 3
    assert lag_lower_bound(step=6, fetched_step=3) == 3
    assert lag_lower_bound(step=3, fetched_step=3) == 0


def test_envs_queue_one_batch_less_than_the_cap() -> None:
    assert env_max_batches_offpolicy(None) is None
    assert env_max_batches_offpolicy(0) == 1  # never below one batch: the env must be able to send
    assert env_max_batches_offpolicy(2) == 1
    assert env_max_batches_offpolicy(4) == 3


def test_lag_meter_reads_the_ledger_and_drops_only_known_lags_over_the_cap() -> None:
    versions = {(1, 2): 0, (1, 3): 3}  # sequence tokens -> version that sampled them; (1, 4) is unknown
    meter = LagMeter(lambda tokens: versions.get(tuple(tokens)), max_policy_lag=2)
    group = {"tokens": [[1, 2], [1, 3], [1, 4]]}
    assert meter.lags(group, step=4) == [3, 0, None]  # version 3 trains at step 4
    assert meter.is_stale(group, step=4)  # the largest known lag, 3, is over 2
    assert not meter.is_stale(group, step=3)  # lags 2, -1: within the cap
    assert not meter.is_stale({"tokens": [[1, 4]]}, step=99)  # unknown lags never drop a group
    assert not LagMeter(meter.version_of, max_policy_lag=None).is_stale(group, step=99)


def test_lag_metrics_by_hand() -> None:
    out = lag_metrics([0, 1, 1, 3, None])
    assert out["atropos/policy_lag_unknown"] == 1.0
    assert out["atropos/policy_lag_mean"] == (0 + 1 + 1 + 3) / 4
    assert out["atropos/policy_lag_max"] == 3.0
    assert (out["atropos/policy_lag_0"], out["atropos/policy_lag_1"], out["atropos/policy_lag_2plus"]) == (
        0.25,
        0.5,
        0.25,
    )
    assert lag_metrics([None]) == {"atropos/policy_lag_unknown": 1.0}
