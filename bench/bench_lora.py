"""Benchmark: full fine-tuning vs LoRA on the CPU demo, one after the other, same steps.

- full: ``atropos_grpo_cpu_demo.yaml`` as shipped (``make demo``'s config);
- lora: ``atropos_grpo_cpu_demo_lora.yaml`` (the same config with ``lora_rank: 16``, ``lora_alpha: 32``,
  ``target_modules: all-linear``, lr 2e-4).

Both through the launcher (run-api, the one-word env with its held-out evaluations, the trainer, the hf_cpu rollout),
``--steps`` steps each, in this bench's output directory. Measured per run:

- peak resident memory of the actor process: verl's fused worker (the Ray actor ``WorkerDict``, which holds the
  actor, its optimizer and, with LoRA, the reference via the disabled adapter), from the kernel's high-water mark
  ``VmHWM`` in ``/proc/<pid>/status``, read every ``--sample-s`` seconds while it lives; the hf_cpu rollout server's
  likewise;
- optimizer state: the size of the last checkpoint's ``optim_world_size_1_rank_0.pt`` (Adam's ``exp_avg`` and
  ``exp_avg_sq``), beside ``2 x 4 bytes x trainable parameters`` (trainable parameters counted on the model on the
  meta device, with peft for LoRA);
- step time: ``timing_s/step`` (and the phases) from the run's metrics file, mean over steps;
- held-out success at the end: the env's last evaluation row (8 unseen questions x 4 samples), with its policy version.

Prints a per-phase table and one line ``ratio lora/full: peak memory 0.xx, step time 0.xx, held-out a vs b``.

    python bench/bench_lora.py [--steps 10] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import psutil
from bench_loop import ROOT, launcher_argv, run_logged

from recipe.atropos.rundir import RunDir

CONFIGS = ROOT / "recipe" / "atropos" / "config"
RUNS = {"full": CONFIGS / "atropos_grpo_cpu_demo.yaml", "lora": CONFIGS / "atropos_grpo_cpu_demo_lora.yaml"}
ACTOR_PROC = "ray::WorkerDict"  # verl's fused actor/rollout/ref worker
ROLLOUT_PROC = "ray::HFCPURolloutServer"
PHASES = [
    ("poll (generation)", "timing_s/poll"),
    ("drain before the update", "timing_s/pause_endpoint"),
    ("old log-prob", "timing_s/old_log_prob"),
    ("advantages", "timing_s/adv"),
    ("actor update", "timing_s/update_actor"),
    ("checkpoint", "timing_s/save_checkpoint"),
    ("weight push", "timing_s/update_weights"),
    ("step", "timing_s/step"),
]


def vm_hwm_bytes(pid: int) -> int | None:
    """The process's peak resident set size so far (``VmHWM``), in bytes; None once it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakRss:
    """Samples the peak RSS of the launcher's descendants whose title starts with each prefix (max over processes)."""

    def __init__(self, prefixes: tuple[str, ...], interval_s: float) -> None:
        self.prefixes, self.interval_s = prefixes, interval_s
        self.peak = dict.fromkeys(prefixes, 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, root_pid_of: Callable[[], int | None]) -> PeakRss:
        def loop() -> None:
            while not self._stop.is_set():
                root = root_pid_of()
                if root is not None:
                    self.sample(root)
                self._stop.wait(self.interval_s)

        self._thread = threading.Thread(target=loop, daemon=True)
        self._thread.start()
        return self

    def sample(self, root: int) -> None:
        try:
            children = psutil.Process(root).children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for child in children:
            try:
                title = " ".join(child.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            for prefix in self.prefixes:
                if title.startswith(prefix):
                    self.peak[prefix] = max(self.peak[prefix], vm_hwm_bytes(child.pid) or 0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def trainable_parameters(model_path: str, config_path: Path) -> tuple[int, int]:
    """(trainable, total) parameters of the run's model as it trains: all of them, or LoRA's with peft."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from recipe.atropos.launcher.config import load_config

    model_cfg = load_config(config_path, [f"actor_rollout_ref.model.path={model_path}"]).actor_rollout_ref.model
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    total = sum(p.numel() for p in model.parameters())
    if int(model_cfg.get("lora_rank", 0) or 0) <= 0:
        return total, total
    from peft import LoraConfig, TaskType, get_peft_model

    targets = model_cfg.target_modules
    targets = targets if isinstance(targets, str) else list(targets)
    lora = LoraConfig(
        task_type=TaskType.CAUSAL_LM, r=int(model_cfg.lora_rank), lora_alpha=int(model_cfg.lora_alpha),
        target_modules=targets, bias="none",
    )  # fmt: skip
    peft_model = get_peft_model(model, lora)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad), total


def last_optimizer_file(run_dir: Path) -> Path | None:
    files = sorted(
        run_dir.glob("checkpoints/global_step_*/actor/optim_world_size_*_rank_0.pt"),
        key=lambda p: int(p.parts[-3].removeprefix("global_step_")),
    )
    return files[-1] if files else None


def run_one(name: str, config: Path, model: str, out: Path, args: argparse.Namespace) -> dict[str, float | str]:
    run_dir = out / name
    run_dir.mkdir(parents=True, exist_ok=True)
    argv = launcher_argv(config, run_dir, args.steps, *args.overrides)
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    # run_logged starts the launcher in its own session: its process group id is the launcher's pid.
    launcher_pid: list[int] = []

    def root() -> int | None:
        if not launcher_pid:
            for proc in psutil.Process().children():
                if "recipe.atropos.launch_atropos_verl_services" in " ".join(proc.cmdline()):
                    launcher_pid.append(proc.pid)
        return launcher_pid[0] if launcher_pid else None

    sampler = PeakRss((ACTOR_PROC, ROLLOUT_PROC), args.sample_s).start(root)
    try:
        code, wall, _ = run_logged(argv, env, run_dir / "launcher.log", args.timeout)
    finally:
        sampler.stop()
    if code != 0:
        text = (run_dir / "launcher.log").read_text(errors="replace")
        raise SystemExit(f"{name} run failed ({code}); last lines of {run_dir / 'launcher.log'}:\n{text[-3000:]}")
    rows = [json.loads(line) for line in RunDir(run_dir).metrics_file.read_text().splitlines() if line.strip()]
    steps = [r for r in rows if "source" not in r]
    evals = [r for r in rows if "source" in r and any(k.endswith("/held_out_success") for k in r)]
    trainable, total = trainable_parameters(model, config)
    optim = last_optimizer_file(run_dir)
    result: dict[str, float | str] = {
        "run_dir": str(run_dir),
        "wall_s": wall,
        "steps": len(steps),
        "peak_rss_actor": sampler.peak[ACTOR_PROC],
        "peak_rss_rollout": sampler.peak[ROLLOUT_PROC],
        "trainable": trainable,
        "total": total,
        "optim_bytes_counted": 8 * trainable,
        "optim_bytes_file": optim.stat().st_size if optim else float("nan"),
    }
    for _, key in PHASES:
        values = [r[key] for r in steps if key in r]
        result[key] = sum(values) / len(values) if values else float("nan")
    if evals:
        last = max(evals, key=lambda r: (r["step"], r.get("time", 0)))
        result["held_out"] = next(v for k, v in last.items() if k.endswith("/held_out_success"))
        result["held_out_version"] = last["step"]
        first = min(evals, key=lambda r: (r["step"], r.get("time", 0)))
        result["held_out_start"] = next(v for k, v in first.items() if k.endswith("/held_out_success"))
    return result


def table(results: dict[str, dict]) -> list[str]:
    full, lora = results["full"], results["lora"]
    gib, mib = 1024**3, 1024**2

    def row(label: str, a: float, b: float, fmt: str = "{:12.2f}") -> str:
        return f"{label:44s}" + fmt.format(a) + fmt.format(b)

    lines = [f"{'':44s}{'full':>12s}{'lora':>12s}"]
    lines.append(
        row("peak RSS, actor process WorkerDict (GiB)", full["peak_rss_actor"] / gib, lora["peak_rss_actor"] / gib)
    )
    lines.append(
        row("peak RSS, hf_cpu rollout server (GiB)", full["peak_rss_rollout"] / gib, lora["peak_rss_rollout"] / gib)
    )
    lines.append(row("trainable parameters (M)", full["trainable"] / 1e6, lora["trainable"] / 1e6, "{:12.3f}"))
    lines.append(
        row(
            "optimizer state, 2 x fp32 x trainable (MiB)",
            full["optim_bytes_counted"] / mib,
            lora["optim_bytes_counted"] / mib,
        )
    )
    lines.append(
        row("optimizer state, checkpoint file (MiB)", full["optim_bytes_file"] / mib, lora["optim_bytes_file"] / mib)
    )
    for label, key in PHASES:
        lines.append(row(f"{label} (s, mean per step)", full[key], lora[key]))
    for name in ("held_out_start", "held_out"):
        label = "held-out success at start" if name == "held_out_start" else "held-out success at the end"
        lines.append(row(label, full.get(name, float("nan")), lora.get(name, float("nan")), "{:12.3f}"))
    lines.append(
        row("  ... of policy version", full.get("held_out_version", -1), lora.get("held_out_version", -1), "{:12.0f}")
    )
    lines.append(row("wall, whole command (s)", full["wall_s"], lora["wall_s"], "{:12.0f}"))
    return lines  # fmt: skip


def ratio_line(results: dict[str, dict]) -> str:
    full, lora = results["full"], results["lora"]
    memory = lora["peak_rss_actor"] / full["peak_rss_actor"] if full["peak_rss_actor"] else float("nan")
    step = lora["timing_s/step"] / full["timing_s/step"]
    held = f"{lora.get('held_out', float('nan')):.3f} vs {full.get('held_out', float('nan')):.3f}"
    return f"ratio lora/full: peak memory {memory:.2f}, step time {step:.2f}, held-out {held}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=3600, help="per run")
    parser.add_argument("--sample-s", type=float, default=0.5, help="peak-RSS sampling interval")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--overrides", nargs="*", default=[], help="extra Hydra overrides for both runs")
    args = parser.parse_args()
    out = args.out or ROOT / "outputs" / f"bench-lora-{datetime.now():%Y%m%d-%H%M%S}"
    from recipe.atropos.setup.assets import resolve_model_path

    model = resolve_model_path("embedded:SmolLM2-135M-Instruct")
    print(f"bench-lora: {model}, {args.steps} steps each, output {out}", flush=True)
    results = {}
    for name, config in RUNS.items():
        print(f"{name}: {config.name}; load {os.getloadavg()}", flush=True)
        started = time.monotonic()
        results[name] = run_one(name, config, model, out, args)
        print(f"{name}: {results[name]['steps']} steps in {time.monotonic() - started:.0f} s", flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(table(results)))
    print(ratio_line(results))


if __name__ == "__main__":
    main()
