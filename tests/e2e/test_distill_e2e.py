"""On-policy distillation end to end on CPU, both ways, one trainer run each (the tiny student; the teacher a second
tiny model, seed 1, so the KL is not zero):

- the environments' way: groups carrying a teacher's ``distill_token_ids`` / ``distill_logprobs`` (scored through the
  teacher endpoint's own code and the env mixin's row builder) and groups without them, saved as JSONL, train with
  ``distillation.enabled=true`` and verl's ``forward_kl_topk`` (top-2); every step's batch is half teacher rows, half
  plain RL rows (the single-sample estimators, k3 and k1, are the unit tests' hand-computed cases);
- verl's way: plain groups, ``distillation.teacher_models.teacher_model.model_path`` = the teacher; verl's teacher
  replica (the hf_cpu backend on CPU) answers for every row after conversion, with ``k3``: verl 0.9.1 takes a
  teacher's top-k only from vLLM or SGLang, so ``forward_kl_topk`` is refused with an hf_cpu teacher."""

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
TIMES = ("timing_s/teacher", "timing_s/update_actor", "timing_s/old_log_prob", "timing_s/step", "rollout/0/rss_mb")


def save_groups(teacher: Path, path: Path, top_k: int, with_fields: bool = True) -> None:
    """2 x STEPS groups of 4 (a prompt, 4 byte-level replies); every other group carries the teacher's fields
    (``with_fields``)."""
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
        if with_fields and g % 2 == 0:
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


def train(tmp_path: Path, student: Path, data: Path, started: list[ManagedProcess], *overrides: str) -> list[dict]:
    """main_atropos (the stock trainer) for STEPS steps on ``data``; the rows of the steps that distilled."""
    argv = offline_trainer_argv(
        student, tmp_path, data, STEPS, "trainer.save_freq=-1", "distillation.enabled=true", *overrides
    )
    trainer = ManagedProcess("trainer", argv, tmp_path / "trainer.log")
    started.append(trainer.start())
    assert wait_exit(trainer, 600) == 0, tail(trainer.log_path, 80)
    steps = [row for row in read_metrics(RunDir(tmp_path).metrics_file) if "atropos/distill/rows_with_teacher" in row]
    assert [row["step"] for row in steps] == list(range(1, STEPS + 1))
    return steps


@pytest.fixture()
def teacher(tmp_path: Path) -> Path:
    """A second tiny model (seed 1): the student's teacher, so the KL is not zero."""
    return build_tiny_model(tmp_path / "teacher", seed=1)


@pytest.mark.timeout(900)
def test_env_teacher_fields_train_through_verls_distillation_loss(
    tmp_path: Path, tiny_model: Path, teacher: Path, no_leftovers: list[ManagedProcess]
) -> None:
    data = tmp_path / "groups.jsonl"
    save_groups(teacher, data, top_k=2)
    loss = ["loss_mode=forward_kl_topk", "topk=2", "use_policy_gradient=false"]
    steps = train(tmp_path, tiny_model, data, no_leftovers, *(f"distillation.distillation_loss.{kv}" for kv in loss))
    for row in steps:
        assert row["atropos/distill/rows_with_teacher"] == 0.5  # one group with the fields, one without
        assert 0.0 < row["atropos/distill/teacher_token_share"] <= 0.5
        assert math.isfinite(row["atropos/distill/reverse_kl_sampled"])
        term = row["actor/distillation/loss"]
        assert math.isfinite(term) and term > 0.0, row  # the teacher is another model: the term is not zero
        assert math.isfinite(row["actor/pg_loss"])  # the RL loss trains every row as before
        assert 0.0 < row["actor/distillation/teacher_mass"] <= 1.0


@pytest.mark.timeout(900)
def test_verls_teacher_replica_answers_every_row_in_the_atropos_loop(
    tmp_path: Path, tiny_model: Path, teacher: Path, no_leftovers: list[ManagedProcess]
) -> None:
    data = tmp_path / "groups.jsonl"
    save_groups(teacher, data, top_k=0, with_fields=False)
    steps = train(
        tmp_path,
        tiny_model,
        data,
        no_leftovers,
        f"distillation.teacher_models.teacher_model.model_path={teacher}",
        "distillation.distillation_loss.loss_mode=k3",
    )
    for row in steps:  # the teacher's time and memory beside the student's, in the test's output
        print(f"step {row['step']}:", {k: v for k, v in row.items() if "teacher" in k or k in TIMES})
    for row in steps:
        assert row["atropos/distill/rows_with_teacher"] == 1.0  # verl's teacher answers for every row
        assert row["atropos/distill/teacher_token_share"] == 1.0
        assert row["atropos/distill/sampled_token_coverage"] == 1.0  # k3: the one id is the sampled token
        assert row["atropos/distill/env_field_rows_ignored"] == 0.0
        assert math.isfinite(row["atropos/distill/reverse_kl_sampled"]) and row["atropos/distill/reverse_kl_sampled"]
        term = row["actor/distillation/loss"]
        assert math.isfinite(term) and term > 0.0, row  # the teacher is another model: the term is not zero
        assert math.isfinite(row["actor/pg_loss"])
        assert row["timing_s/teacher"] > 0.0 and row["atropos/distill/teacher_rss_mb"] > 0.0
