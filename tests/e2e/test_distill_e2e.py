"""On-policy distillation the environments' way, end to end on CPU: groups carrying a teacher's ``distill_token_ids``
/ ``distill_logprobs`` (a second tiny model, seed 1, scored through the teacher endpoint's own code and the env
mixin's row builder) and groups without them, saved as JSONL, train the tiny student through Ray and verl's workers
with ``distillation.enabled=true`` and verl's own loss (``k3`` on sampled tokens, ``forward_kl_topk`` with top-2);
every step's batch is half teacher rows, half plain RL rows."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from recipe.atropos.cpu.hf_cpu import HFGenerator
from recipe.atropos.endpoint.backends import from_verl_prompt_logprobs
from recipe.atropos.envs.distill import teacher_rows
from recipe.atropos.launcher.processes import ManagedProcess, tail
from recipe.atropos.metrics_file import read_metrics
from recipe.atropos.rundir import RunDir
from recipe.atropos.setup.assets import build_tiny_model
from tests.helpers import offline_trainer_argv, wait_exit

STEPS = 3


def save_groups(teacher: Path, path: Path, top_k: int) -> None:
    """2 x STEPS groups of 4 (a prompt, 4 byte-level replies); every other group carries the teacher's fields."""
    generator = HFGenerator(str(teacher), response_length=8, num_threads=1)
    prompt = [257, *b"Name a colour. Answer in exactly one word.", 258]
    lines = []
    for g in range(2 * STEPS):
        replies = [list(f"Blue{g}".encode()), list(b"It is red"), list(b"Green"), list(b"Sky blue")]
        tokens = [prompt + r for r in replies]
        group = {
            "tokens": tokens,
            "masks": [[-100] * len(prompt) + r for r in replies],
            "scores": [1.0, 0.0, 1.0, 0.0],
        }
        if g % 2 == 0:
            rows = []
            for seq in tokens:
                raw = generator.prompt_logprobs(seq, max(top_k, 1))
                answer = from_verl_prompt_logprobs(
                    seq, raw["prompt_ids"], raw["prompt_logprobs"], raw["prompt_token_logprobs"], max(top_k, 1)
                )
                ids = [list(e) if e else [] for e in answer]
                lps = [list(e.values()) if e else [] for e in answer]
                rows.append(teacher_rows(seq, ids, lps, top_k))
            group["distill_token_ids"] = [ids for ids, _ in rows]
            group["distill_logprobs"] = [lps for _, lps in rows]
        lines.append(json.dumps(group))
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    ("loss", "top_k"),
    [
        (["distillation.distillation_loss.loss_mode=k3"], 0),
        (
            [
                "distillation.distillation_loss.loss_mode=forward_kl_topk",
                "distillation.distillation_loss.topk=2",
                "distillation.distillation_loss.use_policy_gradient=false",
            ],
            2,
        ),
    ],
    ids=["k3", "forward_kl_topk"],
)
def test_env_teacher_fields_train_through_verls_distillation_loss(
    tmp_path: Path, tiny_model: Path, no_leftovers: list[ManagedProcess], loss: list[str], top_k: int
) -> None:
    teacher = build_tiny_model(tmp_path / "teacher", seed=1)
    data = tmp_path / "groups.jsonl"
    save_groups(teacher, data, top_k)
    argv = offline_trainer_argv(
        tiny_model, tmp_path, data, STEPS, "trainer.save_freq=-1", "distillation.enabled=true", *loss
    )
    trainer = ManagedProcess("trainer", argv, tmp_path / "trainer.log")  # main_atropos, the stock trainer
    no_leftovers.append(trainer.start())
    assert wait_exit(trainer, 600) == 0, tail(trainer.log_path, 80)

    steps = [row for row in read_metrics(RunDir(tmp_path).metrics_file) if "atropos/distill/rows_with_teacher" in row]
    assert [row["step"] for row in steps] == list(range(1, STEPS + 1))
    for row in steps:
        assert row["atropos/distill/rows_with_teacher"] == 0.5  # one group with the fields, one without
        assert 0.0 < row["atropos/distill/teacher_token_share"] <= 0.5
        assert math.isfinite(row["atropos/distill/reverse_kl_sampled"])
        term = row["actor/distillation/loss"]
        assert math.isfinite(term) and term > 0.0, row  # the teacher is another model: the term is not zero
        assert math.isfinite(row["actor/pg_loss"])  # the RL loss trains every row as before
    if top_k:
        assert all(0.0 < row["actor/distillation/teacher_mass"] <= 1.0 for row in steps)
