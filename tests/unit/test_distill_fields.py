"""The teacher fields ``distill_token_ids`` / ``distill_logprobs``: what the schema accepts and refuses (the guard
answers the refusals with 422 naming the field), and that every place a group is kept (the guard's journal, the
trainer's spool, offline JSONL) keeps both fields as they came."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from recipe.atropos.guard.journal import GroupJournal
from recipe.atropos.schema import GroupValidationError, validate_group
from recipe.atropos.sources.jsonl import JsonlGroupSource
from recipe.atropos.spool import GroupSpool
from tests.factories import X, group
from tests.helpers import save_with_atroposlib

# Two sequences of 4 tokens (tests.factories.group); top-2 teacher entries, none at position 0 (vLLM's None).
IDS = [[[], [11, 3], [100, 7], [200, 9]], [[], [11, 4], [101, 7], [201, 9]]]
LPS = [[[], [-0.1, -2.5], [-0.2, -1.9], [-0.05, -3.0]], [[], [-0.1, -2.6], [-0.3, -1.5], [-0.01, -4.0]]]


def distilled(ids: object = IDS, lps: object = LPS, **extra: object) -> dict:
    return group(distill_token_ids=ids, distill_logprobs=lps, **extra)


def refused(raw: dict, **kwargs: object) -> GroupValidationError:
    with pytest.raises(GroupValidationError) as err:
        validate_group(raw, **kwargs)
    return err.value


def test_a_valid_teacher_payload_is_kept_with_its_top_k() -> None:
    g = validate_group(distilled(), vocab_size=300)
    assert g.distill_token_ids == IDS and g.distill_logprobs == LPS
    assert g.distill_top_k == 2


@pytest.mark.parametrize("empty", [None, []])
def test_empty_lists_mean_not_given(empty: object) -> None:
    # atroposlib's BaseEnv.collect_trajectories sends [] for fields its items did not fill
    g = validate_group(distilled(empty, empty))
    assert g.distill_token_ids is None and g.distill_logprobs is None and g.distill_top_k is None


def test_one_field_without_the_other_names_the_missing_one() -> None:
    assert refused(distilled(IDS, None)).field == "distill_logprobs"
    assert refused(distilled(None, LPS)).field == "distill_token_ids"


def test_sequences_and_positions_must_match_tokens() -> None:
    err = refused(distilled(IDS[:1], LPS[:1]))
    assert err.field == "distill_token_ids" and "1 sequences, but tokens has 2" in str(err)
    short = [IDS[0][:3], IDS[1]]
    err = refused(distilled(short, LPS))
    assert err.field == "distill_token_ids" and "sequence 0 has 3 values, tokens has 4" in str(err)


def test_ids_and_logprobs_must_pair_up_at_each_position() -> None:
    lps = json.loads(json.dumps(LPS))
    lps[1][2] = [-0.3]
    err = refused(distilled(IDS, lps))
    assert err.field == "distill_logprobs" and "sequence 1 position 2 has 1 values, distill_token_ids 2" in str(err)


def test_one_top_k_across_the_group() -> None:
    ids, lps = json.loads(json.dumps(IDS)), json.loads(json.dumps(LPS))
    ids[1][3], lps[1][3] = [201, 9, 5], [-0.01, -4.0, -5.0]
    err = refused(distilled(ids, lps))
    assert err.field == "distill_token_ids" and "sequence 1 position 3 has 3 entries, the group's top_k is 2" in str(
        err
    )


@pytest.mark.parametrize("bad", [0.5, math.inf, -math.inf, math.nan])
def test_logprobs_must_be_finite_and_not_positive(bad: float) -> None:
    lps = json.loads(json.dumps(LPS))
    lps[0][1][1] = bad
    err = refused(distilled(IDS, lps))
    assert err.field == "distill_logprobs" and "sequence 0 position 1" in str(err)


def test_a_log_prob_of_zero_is_allowed() -> None:
    lps = json.loads(json.dumps(LPS))
    lps[0][1][0] = 0.0  # probability 1
    validate_group(distilled(IDS, lps))


def test_ids_must_be_below_the_vocabulary_and_not_negative() -> None:
    ids = json.loads(json.dumps(IDS))
    ids[0][1][1] = 260  # the sequences' own tokens are all below 250
    err = refused(distilled(ids, LPS), vocab_size=250)
    assert err.field == "distill_token_ids" and "teacher token id 260 >= the model's vocabulary size 250" in str(err)
    ids[0][1][1] = -1
    assert refused(distilled(ids, LPS)).field == "distill_token_ids"


def test_wrong_types_name_the_field() -> None:
    assert refused(distilled([[["a"]]], LPS)).field == "distill_token_ids"


# ---- every place a group is kept keeps both fields ---------------------------------------------------------------


def test_the_guards_journal_keeps_the_fields(tmp_path: Path) -> None:
    journal = GroupJournal(tmp_path)
    journal.append([distilled()])
    journal.close()
    again = GroupJournal(tmp_path)
    (back,) = again.take(100, at_least_one=True)
    again.close()
    assert back["distill_token_ids"] == IDS and back["distill_logprobs"] == LPS


def test_the_spool_keeps_the_fields_across_a_restart(tmp_path: Path) -> None:
    GroupSpool(tmp_path).put(validate_group(distilled()), fetched_step=1)
    (back,) = GroupSpool(tmp_path).resume(step=1, max_policy_lag=None)
    assert back.distill_token_ids == IDS and back.distill_logprobs == LPS


def test_offline_jsonl_keeps_the_fields(tmp_path: Path) -> None:
    path = tmp_path / "groups.jsonl"
    path.write_text(json.dumps(distilled()) + "\n")
    (back,) = JsonlGroupSource([str(path)], batch_size=2).next_batch()
    assert back.distill_token_ids == IDS and back.distill_logprobs == LPS


@pytest.mark.timeout(120)
def test_atroposlibs_writer_saves_what_the_offline_reader_reads(tmp_path: Path) -> None:
    """BaseEnv.handle_send_to_api with data_path_to_save_groups (what `process` does) writes the fields as posted."""
    from recipe.atropos.setup.assets import build_tiny_model

    posted = distilled(masks=[[X, X, 100, 200], [X, X, 101, 201]])
    save_with_atroposlib(build_tiny_model(tmp_path / "tiny"), tmp_path / "g.jsonl", [posted])
    (back,) = JsonlGroupSource([str(tmp_path / "g.jsonl")], batch_size=2).next_batch()
    assert back.distill_token_ids == IDS and back.distill_logprobs == LPS
