"""Policy lag, computed once (recipe.atropos.staleness): the formula, its lower bound on resume, the env queue depth,
and the lag meter the group sources use; every expected value is worked out by hand in the test."""

from __future__ import annotations

from recipe.atropos.endpoint.ledger import CompletionLedger, trained_spans
from recipe.atropos.staleness import (
    LagMeter,
    SequenceVersion,
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
    meter = LagMeter(lambda tokens, masks: SequenceVersion(versions.get(tuple(tokens)), True), max_policy_lag=2)
    group = {"tokens": [[1, 2], [1, 3], [1, 4]]}
    assert meter.lags(group, step=4) == [3, 0, None]  # version 3 trains at step 4
    assert meter.is_stale(group, step=4)  # the largest known lag, 3, is over 2
    assert not meter.is_stale(group, step=3)  # lags 2, -1: within the cap
    assert not meter.is_stale({"tokens": [[1, 4]]}, step=99)  # unknown lags never drop a group
    assert not LagMeter(meter.lookup, max_policy_lag=None).is_stale(group, step=99)


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


def toy_decode(ids: list[int]) -> str:
    """Ids 1..26 are the letters a..z; larger ids are special tokens (end of turn, newline) and decode to nothing."""
    return "".join(chr(96 + i) for i in ids if 1 <= i <= 26)


END = 30  # the model's end-of-turn token, sampled at the end of each completion
EOT, NL = 31, 32  # what the env's chat template writes after an assistant turn instead


def test_trained_spans_are_the_runs_of_unmasked_tokens() -> None:
    tokens = [40, 41, 1, 2, 31, 42, 8, 9]
    masks = [-100, -100, 1, 2, 31, -100, 8, 9]
    assert trained_spans(tokens, masks) == [[1, 2, 31], [8, 9]]
    assert trained_spans([5, 6], [-100, -100]) == []


def test_re_tokenised_turns_are_matched_by_text_oldest_twin_first_and_the_rest_bounded() -> None:
    """An env that calls /v1/chat/completions and re-tokenises the chat (tokenize_for_trainer): its trained spans end
    with the template's end-of-turn tokens, not the sampled END, so only their text matches what was served."""
    ledger = CompletionLedger(decode=toy_decode, horizon=3)
    ledger.record([50, 51], [1, 2, END], 0)  # "ab" sampled by version 0
    ledger.record([50, 51], [1, 2, END], 1)  # "ab" again by version 1 (a twin)
    ledger.record([52], [8, 9, END], 1)  # "hi" by version 1
    ledger.record([53], [19, 20, END], 2)  # "st" by version 2

    def chat(*turns: list[int]) -> tuple[list[int], list[int]]:  # system/user tokens masked, each turn + EOT NL
        tokens, masks = [40, 41], [-100, -100]
        for turn in turns:
            tokens += [*turn, EOT, NL, 42]
            masks += [*turn, EOT, NL, -100]
        return tokens, masks

    two_turns = chat([1, 2], [8, 9])  # "ab" then "hi": versions 0 (the oldest "ab") and 1 -> the sequence's is 0
    assert ledger.sequence_version(*two_turns) == SequenceVersion(0, True)
    assert ledger.sequence_version(*two_turns) == SequenceVersion(0, True)  # asked again: same answer, no new claim
    other_ab = ([43, *chat([1, 2])[0]], [-100, *chat([1, 2])[1]])  # another episode answering "ab": the twin (v1)
    assert ledger.sequence_version(*other_ab) == SequenceVersion(1, True)
    # a third "ab": both served "ab"s are claimed, so it is bounded by the oldest unclaimed completion ("st", v2)
    third_ab = ([44, *chat([1, 2])[0]], [-100, *chat([1, 2])[1]])
    assert ledger.sequence_version(*third_ab) == SequenceVersion(2, False)
    # "zz" was never served: bounded by the oldest completion nobody has claimed ("st", version 2)
    assert ledger.sequence_version(*chat([26, 26])) == SequenceVersion(2, False)
    # A /generate trajectory (ManagedServer): its full tokens are what the endpoint returned
    assert ledger.sequence_version([53, 19, 20, END], [-100, 19, 20, END]) == SequenceVersion(2, True)
    # Everything served is claimed now: an unmatched span has nothing to be bounded by
    assert ledger.sequence_version(*chat([25, 25])) == SequenceVersion(None, False)


def test_served_completions_expire_past_the_horizon() -> None:
    ledger = CompletionLedger(decode=toy_decode, horizon=3)
    ledger.record([50], [1, END], 0)  # never claimed (its group was dropped by the env)
    ledger.record([50], [2, END], 2)
    assert ledger.sequence_version([7, 26], [-100, 26]) == SequenceVersion(0, False)  # bounded by version 0
    ledger.record([50], [3, END], 4)  # newest 4, horizon 3: version 0 is over any cap <= 3 and forgotten
    assert ledger.sequence_version([7, 25], [-100, 25]) == SequenceVersion(2, False)


def test_lag_meter_bounds_unmatched_sequences_and_reports_their_share() -> None:
    """Step 4 trains version 3. Sequence versions 3 (matched), 0 (bounded: lag 3), unknown; cap 2."""
    ledger = CompletionLedger(decode=toy_decode, horizon=3)
    ledger.record([50], [1, END], 0)  # unclaimed: bounds every unmatched span at version 0
    ledger.record([51], [2, END], 3)
    meter = LagMeter(ledger.sequence_version, max_policy_lag=2)
    fresh = {"tokens": [[51, 2, END]], "masks": [[-100, 2, END]]}
    unmatched = {"tokens": [[60, 26, 26]], "masks": [[-100, 26, 26]]}
    assert meter.lags(fresh, step=4) == [0]
    assert meter.lags(unmatched, step=4) == [3]  # bounded: sampled no later than version 0
    assert meter.is_stale(unmatched, step=4) and not meter.is_stale(fresh, step=4)
    metrics = meter.metrics([fresh, unmatched], step=4)
    assert metrics["atropos/lag/unmatched_fraction"] == 0.5
    assert metrics["atropos/policy_lag_mean"] == 1.5 and metrics["atropos/policy_lag_unknown"] == 0.0
