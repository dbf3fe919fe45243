"""``make demo-distill``: on-policy distillation against RL alone on the CPU demo, same student and evaluations.

1. RL alone: ``atropos_grpo_cpu_demo_distill.yaml`` with ``distillation.enabled=false`` (the demo config, evaluating
   after every step on 32 held-out questions x 4 samples), ``--teacher-steps`` steps (at least ``--steps``) from the
   base SmolLM2-135M-Instruct, a checkpoint at the last step;
2. that checkpoint exported to a Hugging Face folder with verl's own ``python -m verl.model_merger merge --backend
   fsdp``: a teacher that already answers in one word;
3. distillation: the config as shipped (``forward_kl_topk`` over the teacher's top 16, alone: no GRPO loss),
   ``--steps`` steps, the student again the base model, the teacher the exported folder, started frozen by the launcher
   (``atropos.launcher.teacher.model_path``) and asked by the env for every group it posts (the environments' way,
   docs/distillation.rst).

Prints held-out success per evaluation for both side by side, one line ``ratio distill/rl steps to held-out 0.9:
0.40x (distill 4, rl 10)`` (steps = the first policy version evaluated at or above the target; ``rl >8`` when a run
never reached it), the teacher's CPU time and peak memory per step beside the student's (its verl actor and its
hf_cpu rollout; sampled from ``/proc`` every second) and the distillation metrics per step. Everything lands in
``outputs/demo-distill-<stamp>/``: ``rl/`` and ``distill/`` (the two launcher run directories), ``teacher/`` (the
exported model), ``summary.txt`` (what is printed) and ``heldout.png``.

    python bench/demo_distill.py [--steps 8] [--teacher-steps 12] [--target 0.9] [--rl-from outputs/demo-distill-X]
        [OVERRIDE ...]   (Hydra overrides of the distillation run only)

RL alone runs longer than the distillation (``--teacher-steps``, default 12) because its last step is the teacher:
RL alone hovers near 0.9 for its first steps, and a student distilled from a teacher below the target cannot be shown to
reach it. Its curve is printed whole, so its steps to the target are counted over all of it.

``--rl-from`` reuses an earlier output directory's RL run and teacher and runs the distillation only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recipe.atropos.launcher.config import load_config  # noqa: E402
from recipe.atropos.metrics_file import held_out_points, is_eval_row, read_metrics, trainer_rows  # noqa: E402
from recipe.atropos.rundir import RunDir  # noqa: E402

# bench_loop's launcher helpers and bench_lora's /proc reader are imported where the runs need them: they import torch,
# which the summary's functions (and their unit test, tests/unit/test_demo_distill.py) do not need.
CONFIG = ROOT / "recipe" / "atropos" / "config" / "atropos_grpo_cpu_demo_distill.yaml"
# Processes sampled, by role: a match in the command line (Ray sets its workers' titles, e.g. ray::WorkerDict.<method>).
ROLES = {
    "teacher endpoint": "recipe.atropos.endpoint.teacher",
    "student actor (verl worker)": "ray::WorkerDict",
    "student rollout (hf_cpu)": "ray::HFCPURolloutServer",
}
TEACHER = "teacher endpoint"
# Per-step metrics of the distillation run (trainer rows), as printed: (column, key, format).
DISTILL_COLUMNS = [
    ("rows w/ teacher", "atropos/distill/rows_with_teacher", "{:.2f}"),
    ("top-k coverage", "atropos/distill/sampled_token_coverage", "{:.3f}"),
    ("reverse KL", "atropos/distill/reverse_kl_sampled", "{:.3f}"),
    ("distill loss", "actor/distillation/loss", "{:.3f}"),
    ("step s", "timing_s/step", "{:.1f}"),
]


# ---- the evaluations: curves, steps to the target, the ratio --------------------------------------------------------


def straddled(row: dict[str, Any]) -> bool:
    """An evaluation during which the weights changed (its ``.../policy_version_after`` is not its ``step``): it
    measured two policy versions."""
    after = [v for k, v in row.items() if k.endswith("/policy_version_after") and v is not None]
    return is_eval_row(row) and any(int(v) != int(row["step"]) for v in after)


def held_out_curve(rows: Iterable[dict[str, Any]]) -> dict[int, float]:
    """Policy version -> held-out success (several evaluations of one version averaged), from a run's metrics rows;
    evaluations that :func:`straddled` a weight push are left out."""
    return dict(held_out_points([r for r in rows if not straddled(r)]))


def steps_to(curve: dict[int, float], target: float) -> int | None:
    """The first policy version (steps trained) evaluated at or above ``target``; None if none was."""
    hits = [version for version, success in curve.items() if success >= target]
    return min(hits) if hits else None


def ratio_line(distill: dict[int, float], rl: dict[int, float], target: float) -> str:
    """``ratio distill/rl steps to held-out 0.9: 0.40x (distill 4, rl 10)``; a run that never reached the target
    shows ``>L`` (L = its last evaluated version) and the ratio becomes the bound that implies (``<`` or ``>``)."""
    d, r = steps_to(distill, target), steps_to(rl, target)
    d_last, r_last = max(distill, default=0), max(rl, default=0)
    words = f"(distill {d if d is not None else f'>{d_last}'}, rl {r if r is not None else f'>{r_last}'})"
    if d is not None and r is not None:
        ratio = f"{d / r:.2f}x" if r > 0 else "n/a"
    elif d is not None:  # rl > r_last, so d / rl < d / r_last
        ratio = f"<{d / r_last:.2f}x" if r_last > 0 else "n/a"
    elif r is not None:  # distill > d_last, so distill / r > d_last / r
        ratio = f">{d_last / r:.2f}x" if r > 0 else "n/a"
    else:
        ratio = "n/a"
    return f"ratio distill/rl steps to held-out {target:g}: {ratio} {words}"


def side_by_side(rl: dict[int, float], distill: dict[int, float]) -> list[str]:
    """``step | RL held-out | distill held-out`` per evaluated version, ``-`` where a run has no evaluation."""
    lines = [f"{'step':>4s} | {'RL held-out':>11s} | {'distill held-out':>16s}"]
    for version in sorted(set(rl) | set(distill)):
        cells = [f"{side[version]:.3f}" if version in side else "-" for side in (rl, distill)]
        lines.append(f"{version:4d} | {cells[0]:>11s} | {cells[1]:>16s}")
    return lines


def distill_steps_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The distillation run's per-step metrics (:data:`DISTILL_COLUMNS`), ``-`` where a step lacks one."""
    lines = [" | ".join([f"{'step':>4s}", *(f"{title:>15s}" for title, _, _ in DISTILL_COLUMNS)])]
    for row in trainer_rows(list(rows)):
        cells = [fmt.format(row[key]) if key in row else "-" for _, key, fmt in DISTILL_COLUMNS]
        lines.append(" | ".join([f"{int(row['step']):4d}", *(f"{c:>15s}" for c in cells)]))
    return lines


def mean_of(rows: Sequence[dict[str, Any]], key: str) -> float:
    """Mean of ``key`` over the trainer rows that carry it (NaN when none does)."""
    values = [float(r[key]) for r in trainer_rows(list(rows)) if key in r]
    return sum(values) / len(values) if values else float("nan")


# ---- the processes' CPU time and memory ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One look at one process: when (Unix s), its role, pid, CPU seconds so far (user + system), peak RSS (bytes)."""

    time: float
    role: str
    pid: int
    cpu_s: float
    peak_rss: int


def cpu_at(samples: Sequence[Sample], role: str, at: float) -> float:
    """CPU seconds the ``role``'s processes had used by time ``at`` (each pid's last sample at or before it)."""
    last: dict[int, float] = {}
    for s in samples:
        if s.role == role and s.time <= at:
            last[s.pid] = max(last.get(s.pid, 0.0), s.cpu_s)
    return sum(last.values())


def peak_rss_mb(samples: Sequence[Sample], role: str) -> float:
    """The largest peak resident memory (``VmHWM``) of one ``role`` process, in MiB (NaN when never seen)."""
    peaks = [s.peak_rss for s in samples if s.role == role]
    return max(peaks) / 2**20 if peaks else float("nan")


def training_window(rows: Sequence[dict[str, Any]]) -> tuple[float, float, int]:
    """(start, end, steps) of the training: from the first evaluation or the first step's start (its row's ``time``
    minus ``timing_s/step``), whichever is earlier, to the last step's row."""
    train = [r for r in trainer_rows(list(rows)) if "time" in r]
    if not train:
        raise ValueError("no training step rows with a `time` in the metrics file")
    start = float(train[0]["time"]) - float(train[0].get("timing_s/step", 0.0))
    evals = [float(r["time"]) for r in rows if is_eval_row(r) and "time" in r]
    return min([start, *evals[:1]]), float(train[-1]["time"]), len(train)


def per_step(samples: Sequence[Sample], rows: Sequence[dict[str, Any]], role: str) -> float:
    """CPU seconds the ``role``'s processes used per training step over the run's :func:`training_window` (NaN when
    no such process was seen)."""
    if not any(s.role == role for s in samples):
        return float("nan")
    start, end, steps = training_window(rows)
    return (cpu_at(samples, role, end) - cpu_at(samples, role, start)) / steps


def cost_lines(
    distill: tuple[Sequence[Sample], Sequence[dict[str, Any]]], rl: tuple[Sequence[Sample], Sequence[dict[str, Any]]]
) -> list[str]:
    """The teacher's CPU seconds and peak memory per step beside the student's processes, in the distillation run and
    (no teacher) RL alone; each as (process samples, metrics rows). Then the student's step and actor-update wall time
    in both (the trainer's ``timing_s``)."""
    (d_samples, d_rows), (r_samples, r_rows) = distill, rl
    lines = [
        "cost per training step (CPU-s: CPU seconds used over the training window / steps; 2 cores = 2 CPU-s per "
        "wall second; peak RSS: VmHWM)",
        f"{'process':30s} {'distill CPU-s':>13s} {'peak RSS MiB':>12s} {'RL CPU-s':>9s} {'peak RSS MiB':>12s}",
    ]
    for role in ROLES:
        cells = []
        for samples, rows in ((d_samples, d_rows), (r_samples, r_rows)):
            cells.append(per_step(samples, rows, role) if rows else float("nan"))
            cells.append(peak_rss_mb(samples, role))
        lines.append(f"{role:30s} {cells[0]:13.1f} {cells[1]:12.0f} {cells[2]:9.1f} {cells[3]:12.0f}")
    for label, key in (("step wall (timing_s/step)", "timing_s/step"), ("actor update", "timing_s/update_actor")):
        lines.append(
            f"{label}: distill {mean_of(d_rows, key):.1f} s, RL alone {mean_of(r_rows, key):.1f} s (mean/step)"
        )
    return lines


class Watch:
    """Every ``interval_s`` while a run goes: samples the roles' processes among this script's descendants and prints
    each new evaluation row of the run's metrics file (``label: held-out 0.250 after step 0``)."""

    def __init__(self, label: str, metrics_file: Path, interval_s: float = 1.0) -> None:
        from bench_lora import vm_hwm_bytes  # imported here, before the run: it imports torch

        self._vm_hwm_bytes = vm_hwm_bytes
        self.label, self.metrics_file, self.interval_s = label, metrics_file, interval_s
        self.samples: list[Sample] = []
        self._evals_seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._print_evals()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()
            self._print_evals()

    def _sample(self) -> None:
        now = time.time()
        for proc in psutil.Process().children(recursive=True):
            try:
                title = " ".join(proc.cmdline())
                role = next((r for r, match in ROLES.items() if match in title), None)
                if role is None:
                    continue
                cpu = proc.cpu_times()
                peak = self._vm_hwm_bytes(proc.pid) or 0
                self.samples.append(Sample(now, role, proc.pid, cpu.user + cpu.system, peak))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def _print_evals(self) -> None:
        if not self.metrics_file.exists():
            return
        evals = [r for r in read_metrics(self.metrics_file) if is_eval_row(r)]
        for row in evals[self._evals_seen :]:
            success = dict(held_out_points([row])).get(int(row["step"]), float("nan"))
            note = " (the weights changed during it: left out)" if straddled(row) else ""
            print(f"  {self.label}: held-out {success:.3f} after step {row['step']}{note}", flush=True)
        self._evals_seen = len(evals)


# ---- the runs --------------------------------------------------------------------------------------------------------


def run_launcher(
    label: str, run_dir: Path, steps: int, overrides: Sequence[str], timeout: float
) -> tuple[Watch, float]:
    """The launcher on :data:`CONFIG` for ``steps`` steps in ``run_dir``: the watch (samples) of the run and its wall
    seconds. Exits with the launcher log's tail when the run fails."""
    from bench_loop import launcher_argv, run_logged

    run_dir.mkdir(parents=True, exist_ok=True)
    argv = launcher_argv(CONFIG, run_dir, steps, *overrides)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    print(f"{label}: {' '.join(argv[3:])}\n  log {run_dir / 'launcher.log'}", flush=True)
    with Watch(label, RunDir(run_dir).metrics_file) as watch:
        code, wall, _ = run_logged(argv, env, run_dir / "launcher.log", timeout)
    print(f"{label}: exit {code}, wall {wall:.0f} s", flush=True)
    if code != 0:
        text = (run_dir / "launcher.log").read_text(errors="replace")
        raise SystemExit(f"{label} run failed ({code}); last lines of {run_dir / 'launcher.log'}:\n{text[-3000:]}")
    return watch, wall


def export_teacher(rl_dir: Path, step: int, out: Path) -> Path:
    """verl's own export of the RL run's checkpoint after ``step`` into the Hugging Face folder ``out``."""
    actor = RunDir(rl_dir).checkpoints / f"global_step_{step}" / "actor"
    if not actor.is_dir():
        raise SystemExit(f"no checkpoint {actor}: the RL run must save its last step (trainer.save_freq={step})")
    argv = [sys.executable, "-m", "verl.model_merger", "merge", "--backend", "fsdp"]
    argv += ["--local_dir", str(actor), "--target_dir", str(out)]
    with open(out.parent / "teacher_export.log", "w") as log:
        subprocess.run(argv, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    return out


def plot(
    rl: dict[int, float], distill: dict[int, float], target: float, path: Path, distill_label: str = "distillation"
) -> Path:
    """Held-out success against training steps, both runs, the target as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for curve, label, color in ((rl, "RL alone (GRPO)", "tab:blue"), (distill, distill_label, "tab:green")):
        ax.plot(sorted(curve), [curve[v] for v in sorted(curve)], marker="o", color=color, label=label)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_xlabel("training steps (policy version evaluated)")
    ax.set_ylabel("held-out success (one-word answers)")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title("make demo-distill: SmolLM2-135M student, RL alone vs distillation")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def report(
    out: Path,
    rl_dir: Path,
    teacher: Path,
    steps: int,
    teacher_steps: int,
    target: float,
    samples: Sequence[Sample],
    rl_samples: Sequence[Sample],
    walls: dict[str, float],
    overrides: Sequence[str] = (),
) -> list[str]:
    """The summary of the two runs (printed, and kept in ``out/summary.txt``), the process samples (``samples``: the
    distillation run's, ``rl_samples``: RL alone's; kept in ``processes.jsonl``) and the plot (``heldout.png``); the
    ratio line last."""
    rl_rows = read_metrics(RunDir(rl_dir).metrics_file)
    distill_rows = read_metrics(RunDir(out / "distill").metrics_file)
    rl, distill = held_out_curve(rl_rows), held_out_curve(distill_rows)
    teacher_success = rl.get(max(rl, default=-1), float("nan"))
    config = load_config(CONFIG, list(overrides))  # the distillation run's loss, as it ran
    loss, env_args = config.distillation.distillation_loss, config.atropos.launcher.envs[0].args
    what = f"{loss.loss_mode} over its top {loss.topk}" + (" + GRPO" if loss.use_task_rewards else " alone")
    try:
        drawn = f"plot: {plot(rl, distill, target, out / 'heldout.png', f'distillation ({what})')}"
    except ImportError as exc:  # matplotlib is in the demo extra; the summary stands without the plot
        drawn = f"plot: not drawn ({exc})"
    lines = [
        f"make demo-distill ({CONFIG.name}): student SmolLM2-135M-Instruct (base), steps of 4 x 8 each: "
        f"distillation {steps}, RL alone {teacher_steps};",
        f"teacher {teacher} (RL alone after step {max(rl, default=0)}: held-out {teacher_success:.3f}), "
        f"{what} (coef {loss.distillation_loss_coef})",
        f"held-out success ({env_args['env.eval_questions']} unseen questions x 4 samples at temperature 1.0) after "
        "each step:",
        *side_by_side(rl, distill),
        "",
        "distillation run, per step:",
        *distill_steps_table(distill_rows),
        "",
        *cost_lines((samples, distill_rows), (rl_samples, rl_rows)),
        "wall: " + ", ".join(f"{name} {seconds:.0f} s" for name, seconds in walls.items()),
        drawn,
        f"evaluations left out (the weights changed during them): RL alone {sum(map(straddled, rl_rows))}, "
        f"distillation {sum(map(straddled, distill_rows))}",
        "",
        ratio_line(distill, rl, target),
    ]
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    with open(out / "processes.jsonl", "w") as f:
        for run, run_samples in (("distill", samples), ("rl", rl_samples)):
            for sample in run_samples:
                f.write(json.dumps({"run": run, **sample.__dict__}) + "\n")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="training steps of the distillation run (default 8)")
    parser.add_argument(
        "--teacher-steps", type=int, default=12, help="steps of RL alone, whose last is the teacher (default 12)"
    )
    parser.add_argument("--target", type=float, default=0.9, help="held-out success counted to (default 0.9)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one launcher run may take")
    parser.add_argument("--out", type=Path, default=None, help="default outputs/demo-distill-<stamp>")
    parser.add_argument("--rl-from", type=Path, default=None, help="an earlier output dir: reuse its rl/ and teacher/")
    parser.add_argument(
        "overrides",
        nargs="*",
        help="Hydra overrides of the distillation run only (e.g. distillation.distillation_loss.topk=8)",
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    out = (args.out or ROOT / "outputs" / f"demo-distill-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    teacher_steps = max(args.steps, args.teacher_steps)
    print(
        f"demo-distill: distillation {args.steps} steps, RL alone {teacher_steps}, output {out}; "
        f"load {os.getloadavg()}",
        flush=True,
    )
    walls: dict[str, float] = {}
    rl_samples: list[Sample] = []  # none when RL alone is reused
    if args.rl_from:
        rl_dir, teacher = args.rl_from.resolve() / "rl", args.rl_from.resolve() / "teacher"
        print(f"RL alone and teacher reused from {args.rl_from}", flush=True)
    else:
        rl_dir, teacher = out / "rl", out / "teacher"
        rl_overrides = ["distillation.enabled=false", f"trainer.save_freq={teacher_steps}"]
        rl_watch, walls["RL alone"] = run_launcher("RL alone", rl_dir, teacher_steps, rl_overrides, args.timeout)
        rl_samples = rl_watch.samples
        t0 = time.monotonic()
        export_teacher(rl_dir, teacher_steps, teacher)
        walls["teacher export"] = time.monotonic() - t0
        print(f"teacher: step {teacher_steps} of RL alone exported to {teacher} ({walls['teacher export']:.0f} s)")
    distill_overrides = [f"atropos.launcher.teacher.model_path={teacher}", "trainer.save_freq=-1", *args.overrides]
    watch, walls["distill"] = run_launcher("distill", out / "distill", args.steps, distill_overrides, args.timeout)
    walls["make demo-distill"] = time.monotonic() - started
    rl_steps = max(held_out_curve(read_metrics(RunDir(rl_dir).metrics_file)), default=teacher_steps)
    lines = report(
        out, rl_dir, teacher, args.steps, rl_steps, args.target, watch.samples, rl_samples, walls, args.overrides
    )
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
