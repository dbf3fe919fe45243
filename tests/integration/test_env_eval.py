"""The bundled env's held-out evaluation and generation-side counts, through a real endpoint and atroposlib client.

The model is a stand-in (``ScriptedReplies``, a GenerationBackend that replies from a script) so the success rate
is known by hand; everything between it and the metrics file is real: InferenceEndpoint over HTTP, atroposlib's
ManagedServer and vllm client, OneWordEnv.setup/collect_trajectories/evaluate.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from atroposlib.envs.base import APIServerConfig
from transformers import AutoTokenizer

from recipe.atropos.endpoint.backends import Completion, SamplingParams
from recipe.atropos.endpoint.server import InferenceEndpoint
from recipe.atropos.envs.one_word_env import (
    HELD_OUT_SUBJECTS,
    SUBJECTS,
    OneWordEnv,
    OneWordEnvConfig,
    held_out_questions,
)
from recipe.atropos.rundir import RunDir


class ScriptedReplies:
    """Stand-in for the policy: the k-th completion (k = 0, 1, ...) is ``replies[k % len(replies)]``."""

    def __init__(self, tokenizer: AutoTokenizer, replies: list[str]) -> None:
        self.tokenizer = tokenizer
        self.replies = replies
        self.calls = 0

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        text = self.replies[self.calls % len(self.replies)]
        self.calls += 1
        ids = [*self.tokenizer.encode(text, add_special_tokens=False), self.tokenizer.eos_token_id]
        return Completion(token_ids=ids, log_probs=[-0.5] * len(ids), finish_reason="stop")


def test_held_out_questions_are_fixed_and_never_asked_in_training() -> None:
    questions = held_out_questions(8)
    assert questions == held_out_questions(8) and len(set(questions)) == 8
    assert all(any(s in q for s in HELD_OUT_SUBJECTS) for q in questions)
    assert not any(s in q for q in questions for s in SUBJECTS)


def test_evaluate_writes_held_out_success_and_generation_counts(tiny_model: Path, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    # 3 of every 4 completions are one word: any 32 consecutive completions score 24/32 = 0.75.
    backend = ScriptedReplies(tok, ["Paris", "Blue.", "It is blue", "yes"])
    endpoint = InferenceEndpoint(
        backend, port=0, max_tokens_cap=8, eos_token_ids=[tok.eos_token_id], tokenizer=tok, policy_version=3
    ).start()
    metrics_file = RunDir(tmp_path).metrics_file
    try:
        config = OneWordEnvConfig(
            tokenizer_name=str(tiny_model),
            group_size=4,
            use_wandb=False,
            steps_per_eval=2,
            eval_questions=8,
            eval_samples_per_question=4,
            max_new_tokens=8,
            metrics_file=str(metrics_file),
            wandb_name="one_word",
        )
        server = APIServerConfig(
            server_type="vllm",
            base_url=f"{endpoint.url}/v1",
            model_name=str(tiny_model),
            tokenizer_name=str(tiny_model),
            api_key="x",
            health_check=False,
        )

        async def run() -> None:
            env = OneWordEnv(config, [server], testing=False)
            await env.setup()  # starts one evaluation in the background (BaseEnv's eval_runner): 32 completions
            assert env.eval_runner is not None and not env.eval_runner.done()  # registration does not wait for it
            await env.eval_runner
            for _ in range(3):  # groups of 4 completions: 3/4 one-word in each (never identical)
                await env.collect_trajectories(await env.get_next_item())
            backend.replies = ["Yes"]  # every completion one word: the next group is all-1 (identical scores)
            await env.collect_trajectories(await env.get_next_item())
            endpoint.resume(policy_version=5)  # the trainer pushed new weights
            await env.evaluate()

        asyncio.run(run())
    finally:
        endpoint.stop()

    rows = [json.loads(line) for line in metrics_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 5]  # x = the policy version that was evaluated
    assert rows[0]["source"] == "env:one_word"
    assert rows[0]["eval/one_word/held_out_success"] == pytest.approx(0.75)
    assert rows[0]["eval/one_word/held_out_samples"] == 32
    assert rows[0]["env/one_word/groups_generated"] == 0
    assert rows[1]["eval/one_word/held_out_success"] == pytest.approx(1.0)
    assert rows[1]["env/one_word/groups_generated"] == 4
    assert rows[1]["env/one_word/groups_identical_scores"] == 1
    # 3 groups at 3/4 and one at 4/4: (9 + 4) / 16
    assert rows[1]["env/one_word/mean_score_generated"] == pytest.approx(13 / 16)
