"""``make demo-distill`` (``bench/demo_distill.py``): its reading of the metrics files (held-out curves, steps to the
target, the ratio line, the side-by-side table), the teacher's CPU seconds per step from process samples, all on
hand-written rows; and its config: the CPU demo's, differing only where the docs say."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from recipe.atropos.launcher.config import load_config
from tests.factories import CONFIG_DIR

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import demo_distill as dd  # noqa: E402


def evaluation(step: int, success: float, time: float = 0.0) -> dict[str, Any]:
    """An env's evaluation row, as one_word_env writes it."""
    return {"step": step, "source": "env:one_word", "time": time, "eval/one_word/held_out_success": success}


def step_row(step: int, time: float, seconds: float, **metrics: float) -> dict[str, Any]:
    """A trainer's step row."""
    return {"step": step, "time": time, "timing_s/step": seconds, **metrics}


def test_held_out_curve_averages_evaluations_of_one_version_and_ignores_step_rows() -> None:
    rows = [evaluation(0, 0.25), step_row(1, 10.0, 9.0), evaluation(1, 0.875), evaluation(1, 0.9375)]
    assert dd.held_out_curve(rows) == {0: 0.25, 1: 0.90625}


def test_an_evaluation_the_weights_changed_during_is_left_out() -> None:
    straddling = {**evaluation(1, 0.9), "eval/one_word/policy_version_after": 2}
    rows = [evaluation(0, 0.25), {**evaluation(1, 0.5), "eval/one_word/policy_version_after": 1}, straddling]
    assert dd.straddled(straddling) and not dd.straddled(rows[1]) and not dd.straddled(rows[0])
    assert dd.held_out_curve(rows) == {0: 0.25, 1: 0.5}


def test_steps_to_is_the_first_version_at_or_above_the_target() -> None:
    curve = {0: 0.2, 1: 0.85, 2: 0.9, 3: 0.8, 4: 1.0}
    assert dd.steps_to(curve, 0.9) == 2  # reached exactly; a later dip does not move it
    assert dd.steps_to(curve, 0.95) == 4
    assert dd.steps_to(curve, 1.01) is None


@pytest.mark.parametrize(
    ("distill", "rl", "line"),
    [
        # both reached: 2 / 5
        ({0: 0.1, 1: 0.5, 2: 0.95}, {0: 0.1, 4: 0.8, 5: 0.92}, "0.40x (distill 2, rl 5)"),
        # RL never did in 8 steps: rl > 8, so the ratio is below 3 / 8 = 0.375
        ({0: 0.1, 3: 0.9}, {v: 0.5 for v in range(9)}, "<0.38x (distill 3, rl >8)"),
        # distillation never did in 6: distill > 6, so the ratio is above 6 / 3
        ({v: 0.5 for v in range(7)}, {0: 0.1, 3: 0.91}, ">2.00x (distill >6, rl 3)"),
        ({0: 0.1, 2: 0.5}, {0: 0.2, 2: 0.6}, "n/a (distill >2, rl >2)"),
        ({0: 0.95}, {0: 0.95}, "n/a (distill 0, rl 0)"),  # no steps needed by either: no ratio
    ],
)
def test_ratio_line(distill: dict[int, float], rl: dict[int, float], line: str) -> None:
    assert dd.ratio_line(distill, rl, 0.9) == f"ratio distill/rl steps to held-out 0.9: {line}"


def test_side_by_side_table_marks_versions_one_run_did_not_evaluate() -> None:
    assert dd.side_by_side({0: 0.25, 1: 0.5}, {0: 0.1875, 2: 1.0}) == [
        "step | RL held-out | distill held-out",
        "   0 |       0.250 |            0.188",
        "   1 |       0.500 |                -",
        "   2 |           - |            1.000",
    ]


def test_distill_steps_table_prints_each_trainer_row() -> None:
    rows = [
        evaluation(0, 0.25),
        step_row(1, 10.0, 21.25, **{"atropos/distill/rows_with_teacher": 1.0, "actor/distillation/loss": 0.5}),
    ]
    header, line = dd.distill_steps_table(rows)
    assert header.split(" | ")[0].strip() == "step" and "rows w/ teacher" in header
    assert [c.strip() for c in line.split(" | ")] == ["1", "1.00", "-", "-", "0.500", "21.2"]


def test_teacher_cpu_seconds_per_step_over_the_training_window() -> None:
    teacher, actor = "teacher endpoint", "student actor (verl worker)"
    samples = [
        dd.Sample(100.0, teacher, 7, 5.0, 600 * 2**20),  # loaded, idle
        dd.Sample(104.0, teacher, 7, 5.0, 600 * 2**20),
        dd.Sample(125.0, teacher, 7, 11.0, 700 * 2**20),
        dd.Sample(139.0, teacher, 7, 17.0, 720 * 2**20),
        dd.Sample(150.0, teacher, 7, 30.0, 720 * 2**20),  # after the last step: not counted
        dd.Sample(104.0, actor, 9, 50.0, 2000 * 2**20),
        dd.Sample(139.0, actor, 9, 90.0, 2500 * 2**20),
        dd.Sample(139.0, actor, 11, 4.0, 100 * 2**20),  # a second process of the role: added
    ]
    # the first evaluation at 105 s precedes step 1's start (120 - 12 = 108 s); the last step's row at 140 s
    rows = [evaluation(0, 0.25, time=105.0), step_row(1, 120.0, 12.0), step_row(2, 140.0, 18.0)]
    assert dd.training_window(rows) == (105.0, 140.0, 2)
    assert dd.cpu_at(samples, teacher, 140.0) - dd.cpu_at(samples, teacher, 105.0) == 12.0  # 17 - 5
    assert dd.peak_rss_mb(samples, teacher) == 720.0
    rl_rows = [evaluation(0, 0.25, time=10.0), step_row(1, 50.0, 10.0), step_row(2, 60.0, 14.0)]
    rl_samples = [dd.Sample(10.0, actor, 3, 20.0, 1900 * 2**20), dd.Sample(60.0, actor, 3, 60.0, 2100 * 2**20)]
    lines = dd.cost_lines((samples, rows), (rl_samples, rl_rows))
    by_role = {line[:30].strip(): line[30:].split() for line in lines[2:5]}
    assert by_role[teacher] == ["6.0", "720", "nan", "nan"]  # 12 CPU-s over 2 steps; RL alone has no teacher
    assert by_role[actor] == ["22.0", "2500", "20.0", "2100"]  # (90 + 4 - 50) / 2, the larger peak; (60 - 20) / 2
    assert by_role["student rollout (hf_cpu)"] == ["nan", "nan", "nan", "nan"]  # never seen
    assert lines[5] == "step wall (timing_s/step): distill 15.0 s, RL alone 12.0 s (mean/step)"


def flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """A composed config as ``{dotted key: leaf}`` (list items by index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if not node or items is None:  # a leaf, or an empty dict / list
        return {prefix.removesuffix("."): node}
    return {k: v for key, child in items for k, v in flat(child, f"{prefix}{key}.").items()}


def test_the_distill_config_is_the_demo_with_distillation_and_an_evaluation_every_step() -> None:
    demo = OmegaConf.to_container(load_config(CONFIG_DIR / "atropos_grpo_cpu_demo.yaml", []))
    shipped = load_config(CONFIG_DIR / "atropos_grpo_cpu_demo_distill.yaml", [])
    assert shipped.distillation.enabled and shipped.atropos.launcher.teacher.model_path is None
    # what make demo-distill's RL-alone run trains with
    rl = OmegaConf.to_container(
        load_config(CONFIG_DIR / "atropos_grpo_cpu_demo_distill.yaml", ["distillation.enabled=false"])
    )
    a, b = flat(demo), flat(rl)
    differ = {k: (a.get(k, "<absent>"), b.get(k, "<absent>")) for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    envs = "atropos.launcher.envs.0."
    assert differ == {
        "distillation.distillation_loss.loss_mode": ("k3", "forward_kl_topk"),  # off in the RL run
        "distillation.distillation_loss.topk": (32, 16),
        "distillation.distillation_loss.use_task_rewards": (True, False),
        "trainer.total_training_steps": (10, 8),
        "trainer.save_freq": (5, -1),  # the RL run is given save_freq=N by the script
        "trainer.experiment_name": ("cpu-demo-one-word", "cpu-demo-one-word-distill"),
        f"{envs}module": ("recipe.atropos.envs.one_word_env", "recipe.atropos.envs.one_word_distill_env"),
        f"{envs}args.env.steps_per_eval": (2, 1),
        f"{envs}args.env.eval_questions": ("<absent>", 32),
        "atropos.eval_wait_s": (0, 300),  # each version evaluated before the next update
    }
