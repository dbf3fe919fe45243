"""Benchmark: verl's native GRPO loop vs our full Atropos loop on the same work, one after the other.

Same task (the one-word questions of ``recipe/atropos/envs/one_word_env.py`` and its score), model, batch
(``--prompts`` questions x ``--group`` samples), response length, lr and number of steps:

- native: ``python -m verl.trainer.main_ppo`` through the CPU runtime (hf_cpu rollout), GRPO, a parquet of questions
  from the env's own generator and the env's score as the reward function;
- ours: the launcher with ``atropos_grpo_cpu_demo.yaml`` (run-api, the trainer and its endpoint, the env in
  ``serve`` mode), the env keeping identical-score groups (native trains on every group too) and not evaluating.

Prints per-phase seconds summed over the steps for both, then one line ``ratio ours/native: step time 0.93x, wall
0.97x`` (step time = sum of ``timing_s/step``; wall = the whole command, start-up included).

    python bench/bench_loop.py [--model embedded:SmolLM2-135M-Instruct|tiny] [--steps 5] [--prompts 4] [--group 8]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipe.atropos.envs.one_word_env import question  # noqa: E402
from recipe.atropos.rundir import RunDir  # noqa: E402
from recipe.atropos.setup.assets import build_tiny_model, resolve_model_path  # noqa: E402
from recipe.atropos.setup.cpu_runtime import cpu_runtime_env, cpu_runtime_overrides  # noqa: E402

SYSTEM_PROMPT = "You are a helpful assistant."  # as in atropos_grpo_cpu_demo.yaml
REWARD_FN = '''
import re

WORD = re.compile(r"[A-Za-z0-9']+")


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """one_word_env.one_word_score: 1.0 if the reply is exactly one word."""
    return 1.0 if len(WORD.findall(solution_str)) == 1 else 0.0
'''
# (label, native timing key, our timing key); None = that loop has no such phase.
PHASES = [
    ("generation (native gen / ours poll)", "timing_s/gen", "timing_s/poll"),
    ("drain before the update", None, "timing_s/pause_endpoint"),
    ("reward", "timing_s/reward", None),
    ("old log-prob", "timing_s/old_log_prob", "timing_s/old_log_prob"),
    ("advantages", "timing_s/adv", "timing_s/adv"),
    ("actor update", "timing_s/update_actor", "timing_s/update_actor"),
    ("weight push", "timing_s/update_weights", "timing_s/update_weights"),
    ("step", "timing_s/step", "timing_s/step"),
]


def write_questions(path: Path, n: int, seed: int = 0) -> Path:
    import pandas as pd

    rng = random.Random(seed)
    rows = [
        {
            "data_source": "one_word",
            "prompt": [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question(rng)}],
            "ability": "format",
            "reward_model": {"style": "rule", "ground_truth": ""},
            "extra_info": {"index": i},
        }
        for i in range(n)
    ]
    pd.DataFrame(rows).to_parquet(path)
    return path


def step_metrics_from_console(log: str) -> list[dict[str, float]]:
    """verl's console logger prints one ``step:N - key:value - ...`` line per step."""
    rows = []
    for line in log.splitlines():
        if "training/global_step:" not in line:
            continue
        rows.append(
            {k: float(v) for k, v in re.findall(r"([\w/@.-]+):(?:np\.float\d+\()?([-\d.e+]+)\)?(?= - |$)", line)}
        )
    return rows


def stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the process group this bench started (the launcher then stops its services), SIGKILL after grace."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(argv: list[str], env: dict[str, str], log_path: Path, timeout: float) -> tuple[int, float, list]:
    """Run ``argv`` with its output in ``log_path``; (exit code, wall seconds, [(seconds since start, line), ...])."""
    stamped: list[tuple[float, str]] = []
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT, text=True, start_new_session=True
        )
        watchdog = threading.Timer(timeout, stop_group, args=(proc,))  # a silent hang is stopped too
        watchdog.start()
        try:
            for line in proc.stdout:
                stamped.append((time.monotonic() - start, line))
                log.write(line)
            code = proc.wait()
        except BaseException:
            stop_group(proc)
            raise
        finally:
            watchdog.cancel()
    return code, time.monotonic() - start, stamped


def launcher_argv(config: Path, run_dir: Path, steps: int, *overrides: str) -> list[str]:
    """Our launcher on ``config`` for ``steps`` steps in ``run_dir``, with Hydra ``overrides``."""
    return [
        sys.executable,
        "-m",
        "recipe.atropos.launch_atropos_verl_services",
        "--config",
        str(config),
        f"atropos.launcher.run_dir={run_dir}",
        f"trainer.total_training_steps={steps}",
        *overrides,
    ]


def native_argv(args: argparse.Namespace, model: str, out: Path) -> list[str]:
    """verl's own GRPO (``verl.trainer.main_ppo``) through the CPU runtime on the env's questions and score."""
    out.mkdir(parents=True, exist_ok=True)
    reward = out / "reward.py"
    reward.write_text(REWARD_FN)
    n_questions = args.prompts * args.steps
    return [
        sys.executable,
        "-m",
        "verl.trainer.main_ppo",
        *cpu_runtime_overrides(),
        "algorithm.adv_estimator=grpo",
        f"data.train_files={write_questions(out / 'train.parquet', n_questions)}",
        f"data.val_files={write_questions(out / 'val.parquet', args.prompts, seed=1)}",
        f"data.train_batch_size={args.prompts}",
        f"data.max_prompt_length={args.max_prompt_length}",
        f"data.max_response_length={args.max_response_length}",
        "data.dataloader_num_workers=0",
        "data.shuffle=false",
        f"actor_rollout_ref.model.path={model}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={args.prompts}",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
        f"actor_rollout_ref.actor.optim.lr={args.lr}",
        "actor_rollout_ref.actor.use_kl_loss=False",
        f"actor_rollout_ref.rollout.n={args.group}",
        "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.rollout.calculate_log_probs=True",
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=16",
        f"reward.custom_reward_function.path={reward}",
        "trainer.logger=[console]",
        "trainer.val_before_train=False",
        "trainer.test_freq=-1",
        f"trainer.total_training_steps={args.steps}",
        "trainer.save_freq=-1",
        f"trainer.default_local_dir={RunDir(out).checkpoints}",
        f"hydra.run.dir={RunDir(out).hydra}",
    ]


def run_native(
    args: argparse.Namespace, model: str, out: Path, extra: Sequence[str] = ()
) -> tuple[list[dict[str, float]], float, list]:
    """(per-step metrics, wall seconds, timestamped output lines) of verl's native GRPO."""
    env = {**os.environ, **cpu_runtime_env(), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    replaced = {o.split("=", 1)[0] for o in extra}  # extra overrides replace the defaults of the same key
    argv = [a for a in native_argv(args, model, out) if a.split("=", 1)[0] not in replaced]
    code, wall, stamped = run_logged([*argv, *extra], env, out / "native.log", args.timeout)
    text = (out / "native.log").read_text(errors="replace")
    if code != 0:
        raise SystemExit(f"native GRPO failed ({code}); last lines of {out / 'native.log'}:\n{text[-3000:]}")
    return step_metrics_from_console(text), wall, stamped


def bench_config(args: argparse.Namespace, out: Path) -> Path:
    """The demo config with its env's flags for the bench (flag names hold dots: edited in YAML, not by override)."""
    import shutil

    import yaml

    src = ROOT / "recipe" / "atropos" / "config"
    out.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "atropos_grpo_base.yaml", out / "atropos_grpo_base.yaml")
    config = yaml.safe_load((src / "atropos_grpo_cpu_demo.yaml").read_text())
    config["atropos"]["final_eval_wait_s"] = 0  # the env does not evaluate here
    env = config["atropos"]["launcher"]["envs"][0]
    env["group_size"] = args.group
    env["args"].update(
        {
            "env.max_new_tokens": args.max_response_length,
            "env.ensure_scores_are_not_same": False,  # native trains on every group: equal work
            "env.steps_per_eval": 0,
        }
    )
    path = out / "bench_loop.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_ours(
    args: argparse.Namespace, model: str, out: Path, config: Path | None = None
) -> tuple[list[dict[str, float]], float, list[dict[str, float]]]:
    """(per-step metrics, wall seconds, the envs' evaluation rows) of our launcher; each row's ``time`` is Unix seconds.

    Default: the bench's equal-work config with the bench's shape. With ``config``: that config as shipped (only the
    model path, run directory and step count are set), e.g. ``make demo``'s."""
    shape = [
        "trainer.save_freq=-1",
        f"data.train_batch_size={args.prompts * args.group}",
        f"data.max_prompt_length={args.max_prompt_length}",
        f"data.max_response_length={args.max_response_length}",
        f"actor_rollout_ref.actor.optim.lr={args.lr}",
    ]
    argv = launcher_argv(
        config or bench_config(args, out / "config"),
        out,
        args.steps,
        f"actor_rollout_ref.model.path={model}",
        *([] if config else shape),
        *args.ours_overrides,
    )
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    out.mkdir(parents=True, exist_ok=True)
    code, wall, _ = run_logged(argv, env, out / "launcher.log", args.timeout)
    if code != 0:
        text = (out / "launcher.log").read_text(errors="replace")
        raise SystemExit(f"our loop failed ({code}); last lines of {out / 'launcher.log'}:\n{text[-3000:]}")
    rows = [json.loads(line) for line in RunDir(out).metrics_file.read_text().splitlines() if line.strip()]
    return [r for r in rows if "source" not in r], wall, [r for r in rows if "source" in r]


def phase_table(native: list[dict[str, float]], ours: list[dict[str, float]]) -> list[str]:
    lines = [f"{'phase (s, summed over steps)':40s} {'native':>9s} {'ours':>9s}"]
    for label, native_key, our_key in PHASES:
        a = sum(r.get(native_key, 0.0) for r in native) if native_key else float("nan")
        b = sum(r.get(our_key, 0.0) for r in ours) if our_key else float("nan")
        lines.append(f"{label:40s} {a:9.1f} {b:9.1f}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:SmolLM2-135M-Instruct", help="a model dir, embedded:..., or tiny")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=4, help="questions per step")
    parser.add_argument("--group", type=int, default=8, help="samples per question")
    parser.add_argument("--max-response-length", type=int, default=16)
    parser.add_argument("--max-prompt-length", type=int, default=None, help="default 48 (SmolLM2), 160 (tiny)")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ours-overrides", nargs="*", default=[], help="extra Hydra overrides for our loop")
    args = parser.parse_args()
    out = args.out or ROOT / "outputs" / f"bench-loop-{datetime.now():%Y%m%d-%H%M%S}"
    if args.model == "tiny":
        model = str(build_tiny_model(out / "tiny"))
        args.max_prompt_length = args.max_prompt_length or 160
    else:
        model = resolve_model_path(args.model)
        args.max_prompt_length = args.max_prompt_length or 48
    print(f"bench-loop: model {model}, {args.steps} steps of {args.prompts}x{args.group}, output {out}", flush=True)
    print(f"load before: {os.getloadavg()}", flush=True)
    native, native_wall, _ = run_native(args, model, out / "native")
    print(f"native: {len(native)} steps, wall {native_wall:.1f} s; load {os.getloadavg()}", flush=True)
    ours, our_wall, _ = run_ours(args, model, out / "ours")
    print(f"ours: {len(ours)} steps, wall {our_wall:.1f} s; load {os.getloadavg()}", flush=True)
    for line in phase_table(native, ours):
        print(line)
    print(f"{'wall (whole command, start-up included)':40s} {native_wall:9.1f} {our_wall:9.1f}")
    native_step = sum(r.get("timing_s/step", 0.0) for r in native)
    our_step = sum(r.get("timing_s/step", 0.0) for r in ours)
    print(f"ratio ours/native: step time {our_step / native_step:.2f}x, wall {our_wall / native_wall:.2f}x")


if __name__ == "__main__":
    main()
