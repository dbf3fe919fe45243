"""Benchmark: colocated vs split rollout placement on the same work and the same compute, one after the other.

- colocated: verl's hybrid engine (the default). The endpoint holds the environments' requests while the actor
  computes log-probs, advantages and its update; every process may use both cores (``ATROPOS_CPU_THREADS=2``), so
  generation and training each get the whole machine, in turns.
- split: ``actor_rollout_ref.hybrid_engine=false`` with a rollout pool of one device (``rollout.nnodes=1``,
  ``n_gpus_per_node=1``) beside the trainer's one; each "device" is one core (``ATROPOS_CPU_THREADS=1`` in every
  process, one logical Ray GPU per pool), so generation and training run at the same time on one core each. Weights
  go to the replica through the recipe's ``gloo`` checkpoint engine after each update.

Same work: the demo's config (``atropos_grpo_cpu_demo.yaml``: SmolLM2-135M, batches of 4 groups x 8, the one-word env
keeping groups whose scores are all equal) or the tiny one (``--model tiny``), ``--steps`` steps, the env's held-out
evaluations off (they would add generation that differs between runs). Both through the launcher, in this bench's
output directory.

From each run's metrics file, mean over steps 2.. (step 1 includes the first generation from a cold start): seconds
per phase, the fraction of each step the endpoint held requests (``atropos/endpoint/paused_fraction``: the gate's
pause, or in split mode the replica's weight load), the trainer's wait for a batch, completions served while the
actor updated. Prints a phase table and one line
``ratio split/colocated: step time 0.xx, wall 0.xx; paused fraction colocated 0.xx split 0.xx``.

    python bench/bench_placement.py [--model demo|tiny] [--steps 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from datetime import datetime
from pathlib import Path

import yaml
from bench_loop import ROOT, launcher_argv, run_logged

from recipe.atropos.rundir import RunDir

CONFIGS = ROOT / "recipe" / "atropos" / "config"
SPLIT = ["actor_rollout_ref.hybrid_engine=false", "actor_rollout_ref.rollout.nnodes=1"]
SPLIT += ["actor_rollout_ref.rollout.n_gpus_per_node=1"]
PHASES = [
    ("trainer waits for a batch", "timing_s/poll"),
    ("drain before the update", "timing_s/pause_endpoint"),
    ("old log-prob", "timing_s/old_log_prob"),
    ("advantages", "timing_s/adv"),
    ("actor update", "timing_s/update_actor"),
    ("checkpoint", "timing_s/save_checkpoint"),
    ("weight swap", "timing_s/update_weights"),
    ("step", "timing_s/step"),
    ("endpoint held requests (s)", "atropos/endpoint/held_s"),
    ("paused fraction", "atropos/endpoint/paused_fraction"),
    ("trainer wait fraction", "atropos/trainer/wait_fraction"),
    ("completions during update", "atropos/endpoint/completions_during_update"),
    ("policy lag (mean)", "atropos/policy_lag_mean"),
]


def bench_config(model: str, out: Path) -> Path:
    """The run's config: the demo's (or the tiny one's) with held-out evaluations off and no final-eval wait."""
    name = "atropos_grpo_cpu_demo.yaml" if model == "demo" else "atropos_grpo_tiny.yaml"
    config = yaml.safe_load((CONFIGS / name).read_text())
    shutil.copy(CONFIGS / "atropos_grpo_base.yaml", out / "atropos_grpo_base.yaml")  # its defaults entry
    config["atropos"]["final_eval_wait_s"] = 0
    for env in config["atropos"]["launcher"]["envs"]:
        env.setdefault("args", {})["env.steps_per_eval"] = 10**6
    path = out / f"bench_{model}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_one(name: str, config: Path, threads: int, overrides: list[str], args: argparse.Namespace) -> dict:
    run_dir = args.out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    model = [f"actor_rollout_ref.model.path={args.model_path}"] if args.model_path else []
    argv = launcher_argv(config, run_dir, args.steps, "trainer.save_freq=-1", *model, *overrides)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "ATROPOS_CPU_THREADS": str(threads)}
    code, wall, _ = run_logged(argv, env, run_dir / "launcher.log", args.timeout)
    if code != 0:
        text = (run_dir / "launcher.log").read_text(errors="replace")
        raise SystemExit(f"{name} run failed ({code}); last lines of {run_dir / 'launcher.log'}:\n{text[-3000:]}")
    rows = [json.loads(line) for line in RunDir(run_dir).metrics_file.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "source" not in r]
    measured = steps[1:] or steps
    result = {"run_dir": str(run_dir), "wall_s": wall, "steps": len(steps)}
    for _, key in PHASES:
        values = [r.get(key, 0.0) for r in measured]
        result[key] = sum(values) / len(values)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["demo", "tiny"], default="demo")
    parser.add_argument("--model-path", default=None, help="the tiny model's directory (--model tiny)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=1800.0)
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    if args.out is None:
        args.out = ROOT / "outputs" / f"bench_placement_{datetime.now():%Y%m%d_%H%M%S}"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.model == "tiny" and args.model_path is None:
        from recipe.atropos.setup.assets import build_tiny_model

        args.model_path = str(build_tiny_model(args.out / "tiny_model"))
    config = bench_config(args.model, args.out)
    print(f"{cores} cores; colocated: {cores} threads per process, taking turns; split: 1 device = 1 core each")
    colocated = run_one("colocated", config, cores, [], args)
    split = run_one("split", config, max(1, cores // 2), SPLIT, args)
    print(f"\nper step, mean over steps 2..{args.steps} ({args.model}, {args.steps} steps each)")
    print(f"{'phase':<30}{'colocated':>12}{'split':>12}")
    for label, key in PHASES:
        print(f"{label:<30}{colocated[key]:>12.3f}{split[key]:>12.3f}")
    print(f"{'wall (launcher, s)':<30}{colocated['wall_s']:>12.1f}{split['wall_s']:>12.1f}")
    step = split["timing_s/step"] / colocated["timing_s/step"]
    wall = split["wall_s"] / colocated["wall_s"]
    print(f"runs: {colocated['run_dir']} {split['run_dir']}")
    print(
        f"ratio split/colocated: step time {step:.2f}, wall {wall:.2f}; paused fraction colocated "
        f"{colocated['atropos/endpoint/paused_fraction']:.2f} split {split['atropos/endpoint/paused_fraction']:.2f}"
    )


if __name__ == "__main__":
    main()
