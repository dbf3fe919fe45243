"""What an env's teacher mixin posts: atroposlib's ``get_logprobs`` answer (vLLM's entries: the top-k and the token
itself when outside it; nothing at position 0) turned into the schema's ``[L][k]`` rows, by hand."""

from __future__ import annotations

from recipe.atropos.envs.distill import teacher_rows
from recipe.atropos.schema import validate_group
from tests.factories import X

TOKENS = [5, 6, 7, 8]
IDS = [[], [6, 9], [8, 9, 7], [2, 3]]  # 7 is outside the top-2 at position 2; 8 has no entry at position 3
LPS = [[], [-0.1, -2.0], [-0.5, -1.0, -3.0], [-0.2, -0.3]]


def test_top_k_zero_keeps_the_sampled_tokens_log_prob() -> None:
    ids, lps = teacher_rows(TOKENS, IDS, LPS, top_k=0)
    assert ids == [[], [6], [7], []]
    assert lps == [[], [-0.1], [-3.0], []]


def test_top_k_keeps_the_most_likely_highest_first() -> None:
    ids, lps = teacher_rows(TOKENS, IDS, LPS, top_k=2)
    assert ids == [[], [6, 9], [8, 9], [2, 3]]
    assert lps == [[], [-0.1, -2.0], [-0.5, -1.0], [-0.2, -0.3]]
    ids3, _ = teacher_rows(TOKENS, IDS, LPS, top_k=3)
    assert ids3 == [[], [], [8, 9, 7], []]  # fewer than k: no teacher there


def test_the_rows_pass_the_schema() -> None:
    for k in (0, 2):
        ids, lps = teacher_rows(TOKENS, IDS, LPS, top_k=k)
        group = {"tokens": [TOKENS], "masks": [[X, 6, 7, 8]], "scores": [1.0]}
        validate_group({**group, "distill_token_ids": [ids], "distill_logprobs": [lps]}, vocab_size=10)
