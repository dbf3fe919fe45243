"""Batchers: exact-size step batches of whole groups (FIFO, or held to a mixture of envs), stale groups dropped."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from recipe.atropos.config import atropos_config
from recipe.atropos.sources.fifo import FifoBatcher
from recipe.atropos.sources.mixture import MixtureBatcher, mixture_from_config, mixture_quotas


def group(first_token: int, size: int) -> dict:
    return {"tokens": [[first_token, i] for i in range(size)], "scores": [float(i) for i in range(size)]}


def firsts(groups: list[dict]) -> list[int]:
    return [g["tokens"][0][0] for g in groups]


def test_fifo_fills_exactly_and_carries_the_overflow() -> None:
    batcher = FifoBatcher(batch_size=8)
    batcher.add([group(1, 4), group(2, 4), group(3, 4)])
    assert firsts(batcher.select()) == [1, 2]
    assert firsts(batcher.pending_groups()) == [3]
    assert batcher.metrics([])["atropos/carried_groups"] == 1.0


def test_fifo_a_group_that_does_not_fit_waits_and_a_smaller_later_one_fills() -> None:
    batcher = FifoBatcher(batch_size=6)
    batcher.add([group(1, 4), group(2, 6), group(3, 2)])
    assert firsts(batcher.select()) == [1, 3]
    assert firsts(batcher.pending_groups()) == [2]


def test_fifo_stale_groups_are_dropped_and_counted_per_batch() -> None:
    batcher = FifoBatcher(batch_size=4)
    batcher.add([group(1, 2), group(2, 2), group(3, 2)])
    assert firsts(batcher.select(is_stale=lambda g: g["tokens"][0][0] == 2)) == [1, 3]
    assert batcher.metrics([])["atropos/stale_groups_dropped"] == 1.0
    batcher.add([group(4, 2), group(5, 2)])
    batcher.select()
    assert batcher.metrics([])["atropos/stale_groups_dropped"] == 0.0  # counted once, for the batch it was dropped in
    assert batcher.stale_dropped == 1


def test_fifo_waits_for_more_groups_keeping_the_chosen_ones_first() -> None:
    batcher = FifoBatcher(batch_size=4)
    batcher.add([group(1, 2), group(2, 4)])
    assert batcher.select() is None  # 1 fits (2 of 4), 2 does not: wait for the next poll
    batcher.add([group(3, 2)])
    assert firsts(batcher.select()) == [1, 3]
    assert firsts(batcher.pending_groups()) == [2]


def test_fifo_front_puts_groups_before_the_waiting_ones_in_order() -> None:
    batcher = FifoBatcher(batch_size=4)
    batcher.add([group(3, 2)])
    batcher.add([group(1, 2), group(2, 2)], front=True)
    assert firsts(batcher.select()) == [1, 2]


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
    chosen = batcher.select(0.0, is_stale=lambda g: g["tokens"][0][0] == 1)
    assert [g["tokens"][0][0] for g in chosen] == [2] and batcher.stale_dropped == 1


def test_unmapped_envs_only_fill_a_missing_share() -> None:
    batcher = MixtureBatcher({"a": 1.0}, batch_size=4, wait_s=1.0, names={0: "a"})
    batcher.add([env_group(0, 2), env_group(7, 2), env_group(7, 2)])
    assert batcher.select(waited_s=0.0) is None
    chosen = batcher.select(waited_s=1.0)
    assert [g["env_id"] for g in chosen] == [0, 7]
    assert "atropos/env/env_7/sequences" in batcher.metrics(chosen)


def test_mixture_front_keeps_each_envs_order() -> None:
    batcher = MixtureBatcher({"a": 1.0}, batch_size=4, wait_s=0.0, names={0: "a"})
    batcher.add([env_group(0, 2, tag=3)])
    batcher.add([env_group(0, 2, tag=1), env_group(0, 2, tag=2)], front=True)
    assert [g["tokens"][0][0] for g in batcher.pending_groups()] == [1, 2, 3]


def test_mixture_from_config_explicit_weights_or_the_launchers_envs() -> None:
    envs = [
        {"name": "a", "module": "env_a", "group_size": 4, "weight": 1.0},
        {"name": "b", "module": "env_b", "group_size": 2, "weight": 0.5},
    ]
    base = {"atropos": {"launcher": {"envs": envs}, "mixture_wait_s": 7, "mixture_max_pending_batches": None}}

    def typed(*overrides: dict) -> object:
        return atropos_config(OmegaConf.merge(base, *overrides))

    assert mixture_from_config(typed(), batch_size=8) is None  # envs started elsewhere, no atropos.mixture
    batcher = mixture_from_config(typed({"atropos": {"env_ids_file": "/x/env_ids.json"}}), batch_size=8)
    assert batcher.weights == {"a": 1.0, "b": 0.5} and batcher.group_sizes == {"a": 4, "b": 2}
    assert batcher.names == {0: "a", 1: "b"} and batcher.wait_s == 7.0 and batcher.max_pending is None
    assert batcher.env_ids_file == "/x/env_ids.json"
    explicit = typed({"atropos": {"mixture": {"gsm8k": 0.7, "math": 0.3}, "mixture_max_pending_batches": 4}})
    batcher = mixture_from_config(explicit, batch_size=8)
    assert batcher.names == {0: "gsm8k", 1: "math"} and batcher.max_pending == 32  # 4 batches of 8
    with pytest.raises(ValueError, match="weights"):
        typed({"atropos": {"mixture": {"x": -1.0}}})
