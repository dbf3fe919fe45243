"""select_groups: exact-size step batches of whole groups, stale groups dropped, extras carried."""

from __future__ import annotations

from recipe.atropos.batching import GroupSelection, select_groups


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
