"""On-policy distillation verl's way: the CPU teacher settings, what is refused at start, the teacher tensors verl's
answers become (by hand), and verl's own ``AsyncTeacherLLMServerManager`` routing each env's rows to its teacher.

The layout example (P = 3, R = 2, pad id 3): row a = prompt [7, 8] + response [9] (then an untrained pad), row b =
prompt [5, 6, 7] + response [8, 9]. verl's teacher answers row j with the teacher at token j + 1 and a dummy last row:

    a: ids [8, 9, 0]        log-probs [-1.0, -0.5, 0]         → padded [3 | 8, 9, 0 | 3], [0 | -1.0, -0.5, 0 | 0]
    b: ids [6, 7, 8, 4, 0]  log-probs [-.1, -.2, -.3, -.4, 0] → as is (no padding)

Column P - 1 + r predicts response token r: a's 9 (id 9, covered), b's 8 (id 8, covered) and 9 (id 4: not covered):
coverage 2/3. Student log-probs (old_log_probs) a: [-2.0], b: [-0.5, -1.0]; reverse KL on the covered tokens:
mean(-2.0 - (-0.5), -0.5 - (-0.3)) = mean(-1.5, -0.2) = -0.85.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from verl.workers.rollout.replica import TokenOutput

from recipe.atropos.config import check_atropos_config
from recipe.atropos.cpu.hf_cpu import HFGenerator
from recipe.atropos.trainer.dataproto import scored_data_to_dataproto
from recipe.atropos.trainer.distillation import distill_step_metrics, distillation_plan, take_distillation
from recipe.atropos.trainer.teacher import (
    VerlTeacher,
    padded_teacher_tensors,
    routing_keys,
    sampled_token_coverage,
    sequence_lengths,
    teacher_sequences,
)
from recipe.atropos.trainer.teacher_config import cpu_teacher_block
from tests.factories import X, distillation_run_config

TEACHER = "distillation.teacher_models.teacher_model.model_path=/some/teacher"
TWO_TEACHERS = [  # keyed by the tiny config's two launcher envs
    "+distillation.teacher_models.t1.model_path=/teacher/one",
    "+distillation.teacher_models.t1.key=one_word",
    "+distillation.teacher_models.t2.model_path=/teacher/two",
    "+distillation.teacher_models.t2.key=one_word_pairs",
    "+distillation.teacher_models.t2.num_replicas=2",
    "distillation.teacher_key=env_name",
]


as_run = distillation_run_config


# ---- the CPU runtime's teacher ----------------------------------------------------------------------------------
def test_one_teacher_on_cpu_is_one_hf_cpu_replica_on_one_logical_device() -> None:
    block = {
        "teacher_models": {
            "teacher_model": {"model_path": "/t", "inference": {"name": "vllm", "data_parallel_size": 2}}
        },
        "n_gpus_per_node": 8,
        "nnodes": 0,
    }
    out = cpu_teacher_block(block)
    inference = out["teacher_models"]["teacher_model"]["inference"]
    assert inference == {
        "name": "hf_cpu",
        "data_parallel_size": 1,
        "tensor_model_parallel_size": 1,
        "pipeline_model_parallel_size": 1,
    }
    assert (out["n_gpus_per_node"], out["nnodes"]) == (1, 1)


def test_several_teachers_on_cpu_get_a_device_per_replica() -> None:
    block = {
        "teacher_models": {
            "teacher_model": {"model_path": None},  # verl's default entry, dropped once others are added
            "a": {"model_path": "/a", "num_replicas": 0},
            "b": {"model_path": "/b", "num_replicas": 2},
        }
    }
    out = cpu_teacher_block(block)
    assert [out["teacher_models"][k]["num_replicas"] for k in ("a", "b")] == [1, 2]
    assert out["n_gpus_per_node"] == 3 and out["teacher_models"]["teacher_model"] == {"model_path": None}


def test_verls_way_keeps_the_switch_on_and_sizes_the_teacher_pool() -> None:
    config = as_run(TEACHER, "distillation.distillation_loss.loss_mode=k3")
    plan = take_distillation(config)
    assert plan is not None and plan.verl_teacher and plan.top_k is None
    assert config.distillation.enabled is True  # verl's init builds the teacher manager
    assert plan.config.teacher_models["default"].inference.name == "hf_cpu"
    assert (config.distillation.n_gpus_per_node, config.distillation.nnodes) == (1, 1)
    assert config.ray_kwargs.ray_init.num_gpus == 2  # the trainer's logical device and the teacher's
    again = take_distillation(config)  # the trainer calls it too: idempotent
    assert again is not None and again.verl_teacher and config.ray_kwargs.ray_init.num_gpus == 2


def test_several_teachers_are_keyed_by_env_name() -> None:
    config = as_run(*TWO_TEACHERS)
    plan = take_distillation(config)
    assert sorted(plan.config.teacher_models) == ["one_word", "one_word_pairs"]
    assert config.ray_kwargs.ray_init.num_gpus == 1 + 3


# ---- refused at start ---------------------------------------------------------------------------------------------
TOPK = ["distillation.distillation_loss.loss_mode=forward_kl_topk", "distillation.distillation_loss.topk=2"]


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ([TEACHER, *TOPK], "top-k only from vllm or sglang"),
        ([TEACHER, "actor_rollout_ref.hybrid_engine=false"], "hybrid_engine=true"),
        ([o for o in TWO_TEACHERS if "teacher_key" not in o], "distillation.teacher_key=env_name"),
        (
            [*TWO_TEACHERS[:3], "+distillation.teacher_models.t2.key=other", "distillation.teacher_key=env_name"],
            "'one_word_pairs'",
        ),
        ([TEACHER, "distillation.distillation_loss.loss_mode=k1"], "use_policy_gradient=true"),
    ],
    ids=["top-k-on-hf_cpu", "split", "teacher_key", "env-without-teacher", "k1"],
)
def test_what_cannot_work_with_verls_teacher_is_refused_naming_the_fix(overrides: list[str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        distillation_plan(as_run(*overrides))


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["atropos.launcher.teacher.model_path=/t", "distillation.enabled=false"], "distillation.enabled=true"),
        (["atropos.launcher.teacher.model_path=/t", TEACHER], "both set"),
    ],
)
def test_a_launcher_teacher_nothing_would_train_on_is_refused(overrides: list[str], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        check_atropos_config(as_run("trainer.total_training_steps=1", *overrides))


# ---- the tensors, by hand -------------------------------------------------------------------------------------------
def example_batch():
    groups = [
        {"tokens": [[7, 8, 9], [5, 6, 7, 8, 9]], "masks": [[X, X, 9], [X, X, X, 8, 9]], "scores": [1.0, 0.0]},
    ]
    return scored_data_to_dataproto(groups, max_prompt_length=3, max_response_length=2, pad_token_id=3)


ANSWERS = [
    (torch.tensor([[8], [9], [0]], dtype=torch.int32), torch.tensor([[-1.0], [-0.5], [0.0]])),
    (torch.tensor([[6], [7], [8], [4], [0]], dtype=torch.int32), torch.tensor([[-0.1], [-0.2], [-0.3], [-0.4], [0.0]])),
]


def test_each_row_asks_for_its_real_tokens() -> None:
    batch = example_batch()
    assert sequence_lengths(batch) == ([2, 3], [1, 2])
    assert teacher_sequences(batch) == [[7, 8, 9], [5, 6, 7, 8, 9]]


def test_verls_answers_land_in_the_batchs_layout_with_verls_padding() -> None:
    batch = example_batch()
    built = padded_teacher_tensors(
        ANSWERS,
        prompt_lengths=[2, 3],
        response_lengths=[1, 2],
        prompt_width=3,
        response_width=2,
        pad_token_id=3,
        response_mask=batch.batch["response_mask"],
    )
    assert built.ids.squeeze(-1).tolist() == [[3, 8, 9, 0, 3], [6, 7, 8, 4, 0]]
    torch.testing.assert_close(
        built.logprobs.squeeze(-1), torch.tensor([[0.0, -1.0, -0.5, 0.0, 0.0], [-0.1, -0.2, -0.3, -0.4, 0.0]])
    )
    assert built.ids.dtype == torch.int32 and built.logprobs.dtype == torch.float32
    assert built.mask.tolist() == [[1.0, 0.0], [1.0, 1.0]]  # every trained token has the teacher
    assert built.metrics == {"atropos/distill/rows_with_teacher": 1.0, "atropos/distill/teacher_token_share": 1.0}
    batch.batch["teacher_ids"], batch.batch["teacher_logprobs"] = built.ids, built.logprobs
    batch.batch["teacher_mask"] = built.mask
    assert sampled_token_coverage(batch) == pytest.approx(2 / 3)  # b's 9: the teacher's one id there is 4
    batch.batch["old_log_probs"] = torch.tensor([[-2.0, 0.0], [-0.5, -1.0]])
    assert distill_step_metrics(batch)["atropos/distill/reverse_kl_sampled"] == pytest.approx(-0.85)


def test_rows_are_routed_by_their_envs_name() -> None:
    assert routing_keys([0, 1, -1], {"0": "one_word", "1": "one_word_pairs"}) == ["one_word", "one_word_pairs", None]


# ---- verl's manager, routing each env's rows to its teacher -----------------------------------------------------
class ForwardClient:
    """Stands in for verl's ``LLMServerClient`` of one teacher: answers ``generate`` with the hf_cpu generator's
    ``prompt_logprobs`` (what the hf_cpu server returns), recording what it was asked."""

    def __init__(self, generator: HFGenerator) -> None:
        self.generator = generator
        self.asked: list[tuple[list[int], Any]] = []

    async def generate(self, request_id: str, *, prompt_ids: list[int], sampling_params: dict, **_: Any) -> TokenOutput:
        self.asked.append((list(prompt_ids), sampling_params["prompt_logprobs"]))
        rows = self.generator.prompt_logprobs(list(prompt_ids), int(sampling_params["prompt_logprobs"]))
        return TokenOutput(token_ids=[0], extra_fields=rows)


class Manager:
    def __init__(self, clients: dict[str, ForwardClient]) -> None:
        self.clients, self.server_handles = clients, {}

    def get_client(self) -> dict[str, ForwardClient]:
        return self.clients


def test_verls_manager_routes_each_envs_rows_to_its_teacher(tiny_model: Path) -> None:
    config = as_run(*TWO_TEACHERS, "distillation.distillation_loss.loss_mode=k3")
    take_distillation(config)
    generator = HFGenerator(str(tiny_model), response_length=1, num_threads=1)
    clients = {"one_word": ForwardClient(generator), "one_word_pairs": ForwardClient(generator)}
    teacher = VerlTeacher(config, Manager(clients))
    groups = [
        {"tokens": [[257, 72, 105]], "masks": [[X, 72, 105]], "scores": [1.0], "env_id": 0},
        {"tokens": [[257, 65, 66, 67]], "masks": [[X, X, 66, 67]], "scores": [0.0], "env_id": 1},
    ]
    batch = scored_data_to_dataproto(groups, max_prompt_length=2, max_response_length=3, pad_token_id=0)
    metrics = teacher.attach(batch, pad_token_id=0, names={"0": "one_word", "1": "one_word_pairs"})
    assert list(batch.non_tensor_batch["env_name"]) == ["one_word", "one_word_pairs"]
    assert clients["one_word"].asked == [([257, 72, 105], 0)]  # k3: prompt_logprobs 0, the sampled token's
    assert clients["one_word_pairs"].asked == [([257, 65, 66, 67], 0)]
    assert metrics["atropos/distill/sampled_token_coverage"] == 1.0
    # row 1 = prompt [257, 65] + response [66, 67]: columns 1 and 2 predict 66 and 67, from a plain forward pass
    model = generator.model
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[257, 65, 66, 67]])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)[[1, 2], [66, 67]]
    torch.testing.assert_close(batch.batch["teacher_logprobs"][1, 1:3, 0], expected)
    assert batch.batch["teacher_ids"][1, 1:3, 0].tolist() == [66, 67]
    assert batch.batch["teacher_mask"].tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]]


def test_several_teachers_need_each_rows_env_name(tiny_model: Path) -> None:
    config = as_run(*TWO_TEACHERS, "distillation.distillation_loss.loss_mode=k3")
    take_distillation(config)
    generator = HFGenerator(str(tiny_model), response_length=1, num_threads=1)
    teacher = VerlTeacher(
        config, Manager({"one_word": ForwardClient(generator), "one_word_pairs": ForwardClient(generator)})
    )
    groups = [{"tokens": [[257, 72, 105]], "masks": [[X, 72, 105]], "scores": [1.0], "env_id": None}]
    batch = scored_data_to_dataproto(groups, max_prompt_length=2, max_response_length=3, pad_token_id=0)
    with pytest.raises(ValueError, match="atropos.env_ids_file"):
        teacher.attach(batch, pad_token_id=0, names={})
