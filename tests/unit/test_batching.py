"""select_groups: exact-size step batches of whole groups, stale groups dropped, extras carried."""

from __future__ import annotations

import pytest

from recipe.atropos.sources.mixture import (
    GroupSelection,
    MixtureBatcher,
    fill_mixture_batch,
    mixture_from_config,
    mixture_quotas,
    select_groups,
)


def group(first_token: int, size: int) -> dict:
    return {"tokens": [[first_token, i] for i in range(size)], "scores": [float(i) for i in range(size)]}


def no_lag(tokens: object) -> int:
    return 0


def test_fills_exactly_and_carries_the_overflow() -> None:
    groups = [group(1, 4), group(2, 4), group(3, 4)]
    sel = select_groups(groups, batch_size=8, lag_of=no_lag)
    assert [g["tokens"][0][0] for g in sel.chosen] == [1, 2]
    assert [g["tokens"][0][0] for g in sel.carry] == [3]
    assert sel.n_sequences == 8


def test_a_group_that_does_not_fit_is_carried_and_a_smaller_later_one_fills() -> None:
    sel = select_groups([group(1, 4), group(2, 6), group(3, 2)], batch_size=6, lag_of=no_lag)
    assert [g["tokens"][0][0] for g in sel.chosen] == [1, 3]
    assert [g["tokens"][0][0] for g in sel.carry] == [2]
    assert sel.n_sequences == 6


def test_stale_groups_are_dropped_and_counted() -> None:
    lag = {1: 0, 2: 3, 3: 1}
    sel = select_groups(
        [group(1, 2), group(2, 2), group(3, 2)], batch_size=4, lag_of=lambda t: lag[t[0]], max_policy_lag=1
    )
    assert [g["tokens"][0][0] for g in sel.chosen] == [1, 3]
    assert sel.stale_groups_dropped == 1
    assert sel.lags == [0, 0, 1, 1]


def test_without_a_lag_limit_stale_groups_are_kept() -> None:
    sel = select_groups([group(1, 2)], batch_size=2, lag_of=lambda t: 7)
    assert sel.stale_groups_dropped == 0 and sel.lags == [7, 7]


def test_unknown_lags_are_counted_not_dropped() -> None:
    sel = select_groups([group(1, 2)], batch_size=2, lag_of=lambda t: None, max_policy_lag=0)
    assert sel.n_sequences == 2 and sel.policy_lag_unknown == 2 and sel.lags == []


def test_continues_an_earlier_partial_selection() -> None:
    first = select_groups([group(1, 2)], batch_size=4, lag_of=no_lag)
    assert first.n_sequences == 2
    second = select_groups([group(2, 2), group(3, 2)], batch_size=4, lag_of=no_lag, already=first)
    assert isinstance(second, GroupSelection) and second.n_sequences == 4
    assert [g["tokens"][0][0] for g in second.chosen] == [1, 2]
    assert [g["tokens"][0][0] for g in second.carry] == [3]


# ---- exact mixtures -------------------------------------------------------------------------------------------------


def env_group(env_id: int, size: int, score: float = 1.0, tag: int = 0) -> dict:
    return {"tokens": [[tag, i] for i in range(size)], "scores": [score] * size, "env_id": env_id}


def test_quotas_round_whole_groups_by_largest_remainder() -> None:
    sizes = {"a": 4, "b": 2}
    # ideal a 6 (1.5 groups), b 2: floors a 4, b 2; 2 left, only b's group fits → a 4, b 4
    assert mixture_quotas(8, {"a": 0.75, "b": 0.25}, sizes, {}) == {"a": 4, "b": 4}
    # next step pays a's rounding back: after 16, a's target 12 − 4 = 8, b's 4 − 4 = 0 → 12/16 = 0.75 so far
    assert mixture_quotas(8, {"a": 0.75, "b": 0.25}, sizes, {"a": 4, "b": 4}) == {"a": 8, "b": 0}
    assert mixture_quotas(8, {"a": 1.0, "b": 1.0}, {"a": 2, "b": 2}, {}) == {"a": 4, "b": 4}
    # 70/20/10 of 10 groups of 1
    assert mixture_quotas(10, {"x": 7, "y": 2, "z": 1}, {"x": 1, "y": 1, "z": 1}, {}) == {"x": 7, "y": 2, "z": 1}


def test_quotas_that_cannot_sum_to_the_batch_name_the_fix() -> None:
    with pytest.raises(ValueError, match="train_batch_size"):
        mixture_quotas(12, {"a": 1.0, "b": 1.0}, {"a": 4, "b": 6}, {})


def test_batcher_waits_for_a_short_env_then_fills_to_the_weights_and_carries_surplus() -> None:
    batcher = MixtureBatcher({"slow": 0.75, "fast": 0.25}, batch_size=8, wait_s=30.0, names={0: "slow", 1: "fast"})
    batcher.add([env_group(1, 2, tag=t) for t in range(4)] + [env_group(0, 2, tag=9)])
    assert batcher.select(waited_s=1.0) is None  # slow needs 6 sequences and has 2
    batcher.add([env_group(0, 2, tag=10), env_group(0, 2, tag=11), env_group(1, 2, tag=5)])
    chosen = batcher.select(waited_s=2.0)
    assert [(g["env_id"], g["tokens"][0][0]) for g in chosen] == [(0, 9), (0, 10), (0, 11), (1, 0)]
    assert [g["tokens"][0][0] for g in batcher.pending["fast"]] == [1, 2, 3, 5]  # carried to later steps
    metrics = batcher.metrics(chosen)
    assert metrics["atropos/env/slow/fraction"] == 0.75 and metrics["atropos/env/fast/sequences"] == 2.0
    assert metrics["atropos/mixture/reassigned_sequences"] == 0.0
    assert metrics["atropos/env/fast/received_fraction"] == 10 / 16  # 5 of the 8 groups received


def test_an_env_that_cannot_keep_up_is_reported_and_its_share_reassigned_after_the_wait() -> None:
    batcher = MixtureBatcher({"a": 0.5, "b": 0.5}, batch_size=4, wait_s=5.0, names={0: "a", 1: "b"})
    batcher.add([env_group(0, 2, tag=t) for t in range(6)] + [env_group(1, 2, tag=100)])
    first = batcher.select(waited_s=0.0)  # both deliver
    assert [g["env_id"] for g in first] == [0, 1]
    assert batcher.select(waited_s=4.9) is None  # b is short: waited for up to wait_s
    second = batcher.select(waited_s=5.0)
    assert [g["env_id"] for g in second] == [0, 0]
    assert batcher.reassigned_sequences == 2 and batcher.short_steps == {"b": 1} and batcher.lagging == {"b"}
    third = batcher.select(waited_s=0.0)  # b is lagging: not waited for again
    assert [g["env_id"] for g in third] == [0, 0]
    assert batcher.metrics(third)["atropos/env/b/short_steps"] == 2.0
    # b catches up: no payback of the forgiven share, back to 2 + 2, and no longer lagging
    batcher.add([env_group(0, 2), env_group(1, 2), env_group(1, 2), env_group(1, 2)])
    assert [g["env_id"] for g in batcher.select(waited_s=0.0)] == [0, 1]
    assert batcher.lagging == set()


def test_an_env_that_never_sends_is_not_waited_for_forever() -> None:
    batcher = MixtureBatcher({"a": 0.5, "ghost": 0.5}, batch_size=4, wait_s=2.0, names={0: "a"})
    batcher.add([env_group(0, 2) for _ in range(4)])
    assert batcher.select(waited_s=1.0) is None
    assert [g["env_id"] for g in batcher.select(waited_s=2.0)] == [0, 0]
    assert batcher.short_steps == {"ghost": 1}
    assert batcher.select(waited_s=0.0) is not None


def test_backlog_bound_and_lag_cap_drop_and_count() -> None:
    batcher = MixtureBatcher({"a": 1.0}, batch_size=2, wait_s=0.0, names={0: "a"}, max_pending=4)
    batcher.add([env_group(0, 2, tag=t) for t in range(3)])
    assert batcher.surplus_dropped == 1 and [g["tokens"][0][0] for g in batcher.pending["a"]] == [1, 2]
    lag = {1: 5, 2: 0}
    chosen = batcher.select(0.0, lag_of=lambda tokens: lag[tokens[0]], max_policy_lag=1)
    assert [g["tokens"][0][0] for g in chosen] == [2] and batcher.stale_dropped == 1


def test_unmapped_envs_only_fill_a_missing_share() -> None:
    batcher = MixtureBatcher({"a": 1.0}, batch_size=4, wait_s=1.0, names={0: "a"})
    batcher.add([env_group(0, 2), env_group(7, 2), env_group(7, 2)])
    assert batcher.select(waited_s=0.0) is None
    chosen = batcher.select(waited_s=1.0)
    assert [g["env_id"] for g in chosen] == [0, 7]
    assert "atropos/env/env_7/sequences" in batcher.metrics(chosen)


def test_fill_mixture_batch_polls_until_the_batch_holds() -> None:
    batcher = MixtureBatcher({"a": 0.5, "b": 0.5}, batch_size=4, wait_s=100.0, names={0: "a", 1: "b"})
    polls = iter([[env_group(0, 2), env_group(0, 2)], [env_group(0, 2), env_group(1, 2)]])
    chosen, n_polls = fill_mixture_batch(batcher, lambda: next(polls), clock=lambda: 0.0)
    assert n_polls == 2 and [g["env_id"] for g in chosen] == [0, 1]
    assert len(batcher.pending["a"]) == 2


def test_mixture_from_config_explicit_weights_or_the_launchers_envs() -> None:
    from omegaconf import OmegaConf

    envs = [{"name": "a", "group_size": 4, "weight": 1.0}, {"name": "b", "group_size": 2, "weight": 0.5}]
    base = {"data": {"train_batch_size": 8}, "atropos": {"launcher": {"envs": envs}, "mixture_wait_s": 7}}
    assert mixture_from_config(OmegaConf.create(base)) is None  # envs started elsewhere, no atropos.mixture
    launched = OmegaConf.merge(base, {"atropos": {"env_ids_file": "/x/env_ids.json"}})
    batcher = mixture_from_config(launched)
    assert batcher.weights == {"a": 1.0, "b": 0.5} and batcher.group_sizes == {"a": 4, "b": 2}
    assert batcher.names == {0: "a", 1: "b"} and batcher.wait_s == 7.0 and batcher.max_pending is None
    explicit = OmegaConf.merge(base, {"atropos": {"mixture": {"gsm8k": 0.7, "math": 0.3}}})
    assert mixture_from_config(explicit).names == {0: "gsm8k", 1: "math"}
    with pytest.raises(ValueError, match="weights"):
        mixture_from_config(OmegaConf.merge(base, {"atropos": {"mixture": {"x": -1.0}}}))
