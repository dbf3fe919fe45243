"""Benchmark: the shipped demo vs verl's native GRPO on held-out success over wall time, one after the other.

Both train SmolLM2-135M-Instruct on the one-word task (4 questions x 8 samples per step, responses <= 16 tokens,
lr 2e-5, ``--steps`` steps) and measure the same held-out set: the 8 questions of
``one_word_env.held_out_questions`` x 4 samples at temperature 1.0, before training and every 2 steps.

- native: ``verl.trainer.main_ppo`` (as in ``bench_loop.py``) with those questions as its validation set
  (``val_kwargs``: n=4, sampled at 1.0; ``val_before_train``, ``test_freq=2``); it trains on every group;
- ours: ``make demo``'s command and config as shipped (``atropos_grpo_cpu_demo.yaml``: the env keeps identical-score
  groups, as native does, and evaluates itself; checkpoints at steps 5 and 10), in this bench's output directory.

Prints held-out success per policy version with the seconds since each command started, then one line
such as (measured, 2 cores) ``time to held-out >= 0.9: native 131 s (after step 4), ours 122 s (after step 3); ratio
ours/native 0.93x``.

    python bench/bench_heldout.py [--steps 10] [--target 0.9]
"""

from __future__ import annotations

import argparse
import os
import re
import time
from datetime import datetime
from pathlib import Path

from bench_loop import ROOT, SYSTEM_PROMPT, run_native, run_ours

from recipe.atropos.envs.one_word_env import held_out_questions
from recipe.atropos.setup.assets import resolve_model_path

DEMO = ROOT / "recipe" / "atropos" / "config" / "atropos_grpo_cpu_demo.yaml"
EVAL_QUESTIONS, EVAL_SAMPLES = 8, 4  # one_word_env's defaults (eval_questions, eval_samples_per_question)
# verl's core validation metric: the `acc` the reward function reports, else `reward` (ray_trainer._val_metrics_update).
VAL_LINE = re.compile(r"step:(\d+) - .*?val-core/[^:\s]+/(?:acc|reward)/mean@\d+:(?:np\.float\d+\()?([-\d.e+]+)")


def write_held_out(path: Path) -> Path:
    import pandas as pd

    rows = [
        {
            "data_source": "one_word",
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}],
            "ability": "format",
            "reward_model": {"style": "rule", "ground_truth": ""},
            "extra_info": {"index": i},
        }
        for i, q in enumerate(held_out_questions(EVAL_QUESTIONS))
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def native_points(stamped: list[tuple[float, str]]) -> list[tuple[int, float, float]]:
    """(policy version, held-out success, seconds since start) from verl's console lines with ``val-core``."""
    points = []
    for seconds, line in stamped:
        match = VAL_LINE.search(line)
        if match:
            points.append((int(match.group(1)), float(match.group(2)), seconds))
    return points


def our_points(eval_rows: list[dict], started: float) -> list[tuple[int, float, float]]:
    points = []
    for row in eval_rows:
        success = next((v for k, v in row.items() if k.endswith("/held_out_success")), None)
        if success is not None and row.get("step") is not None and "time" in row:
            points.append((int(row["step"]), float(success), float(row["time"]) - started))
    return sorted(points)


def first_reaching(points: list[tuple[int, float, float]], target: float) -> tuple[int, float] | None:
    """(policy version, seconds) of the earliest evaluation at or above ``target``."""
    hits = [(seconds, version) for version, success, seconds in points if success >= target]
    return (min(hits)[1], min(hits)[0]) if hits else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    # The demo's shape, for the native run (bench_loop's argument names).
    args.prompts, args.group, args.max_response_length, args.max_prompt_length, args.lr = 4, 8, 16, 48, 2e-5
    args.ours_overrides = []
    out = args.out or ROOT / "outputs" / f"bench-heldout-{datetime.now():%Y%m%d-%H%M%S}"
    model = resolve_model_path("embedded:SmolLM2-135M-Instruct")
    print(f"bench-heldout: {model}, {args.steps} steps of 4x8, output {out}", flush=True)
    print(f"load before: {os.getloadavg()}", flush=True)
    (out / "native").mkdir(parents=True, exist_ok=True)
    val = [
        f"data.val_files={write_held_out(out / 'native' / 'held_out.parquet')}",
        f"actor_rollout_ref.rollout.val_kwargs.n={EVAL_SAMPLES}",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
        "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
        "actor_rollout_ref.rollout.val_kwargs.top_p=1.0",
        "trainer.val_before_train=True",
        "trainer.test_freq=2",
    ]
    native, native_wall, stamped = run_native(args, model, out / "native", extra=val)
    native_curve = native_points(stamped)
    print(f"native: {len(native)} steps, wall {native_wall:.1f} s; load {os.getloadavg()}", flush=True)
    started = time.time()
    ours, our_wall, evals = run_ours(args, model, out / "ours", config=DEMO)
    our_curve = our_points(evals, started)
    print(f"ours (make demo's config): {len(ours)} steps, wall {our_wall:.1f} s; load {os.getloadavg()}", flush=True)

    print(f"held-out success ({EVAL_QUESTIONS} questions x {EVAL_SAMPLES} samples at temperature 1.0)")
    print(f"{'after step':>10s} {'native':>18s} {'ours':>18s}")
    by_version = {v: (s, t) for v, s, t in native_curve}, {v: (s, t) for v, s, t in our_curve}
    for version in sorted(set(by_version[0]) | set(by_version[1])):
        cells = [f"{p[0]:.3f} at {p[1]:5.0f} s" if (p := side.get(version)) else "-" for side in by_version]
        print(f"{version:10d} {cells[0]:>18s} {cells[1]:>18s}")
    print(f"{'wall':>10s} {native_wall:16.0f} s {our_wall:16.0f} s")
    reach = first_reaching(native_curve, args.target), first_reaching(our_curve, args.target)
    words = [f"{r[1]:.0f} s (after step {r[0]})" if r else "not reached" for r in reach]
    ratio = f"; ratio ours/native {reach[1][1] / reach[0][1]:.2f}x" if all(reach) else ""
    print(f"time to held-out >= {args.target}: native {words[0]}, ours {words[1]}{ratio}")


if __name__ == "__main__":
    main()
