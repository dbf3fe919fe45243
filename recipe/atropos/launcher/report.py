"""The launcher's report of a run: one console line per metrics row, the plot (``metrics.png`` in the run directory,
redrawn at every evaluation: :class:`MetricsPlot`), and as the launcher stops the summary (``summary.txt``), the fault
line and the command that resumes the run (:func:`resume_line`)."""

from __future__ import annotations

import json
import logging
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from recipe.atropos.launcher.accounting import GroupAccount, account_groups
from recipe.atropos.metrics_file import (
    HELD_OUT_SUFFIX,
    LENGTH,
    SCORE,
    held_out_points,
    is_eval_row,
    read_metrics,
    trainer_rows,
)
from recipe.atropos.records import write_atomic, write_json_atomic
from recipe.atropos.rundir import RunDir

logger = logging.getLogger("atropos_launcher")


def write_final_api_stats(run_dir: RunDir, stats: dict[str, Any] | None) -> None:
    """Keep the guarded API's ``GET /guard/stats`` as the run ended (what it still holds: not trained, not lost) in
    ``api_final_stats.json``; a warning when the API did not answer (``stats`` None)."""
    if stats is None:
        logger.warning("could not read the API's final counters (GET /guard/stats did not answer)")
        return
    write_json_atomic(run_dir.api_final_stats, stats)


def write_launcher_state(run_dir: RunDir, api_restarts: int, env_restarts: dict[str, int]) -> None:
    """The launcher's restarts (``launcher_state.json``), written as it stops."""
    state = {"api_restarts": api_restarts, "env_restarts": dict(env_restarts)}
    write_json_atomic(run_dir.launcher_state, state)


def step_line(row: dict[str, Any], total_steps: int) -> str:
    """``step 3/15 | mean score 0.412 | response length 12.3 | 31.2 s``, or for an evaluation line
    ``eval one_word after step 3 | held-out success 0.625 (32 samples)``."""
    if is_eval_row(row):
        name = str(row["source"]).removeprefix("env:")
        success = row.get(f"eval/{name}{HELD_OUT_SUFFIX}", float("nan"))
        samples = row.get(f"eval/{name}/held_out_samples", float("nan"))
        return f"eval {name} after step {row.get('step')} | held-out success {success:.3f} ({samples:.0f} samples)"
    return (
        f"step {int(row['step'])}/{total_steps} | mean score {row.get(SCORE, float('nan')):.3f} | "
        f"response length {row.get(LENGTH, float('nan')):.1f} | {row.get('timing_s/step', float('nan')):.1f} s"
    )


def summarize(rows: list[dict[str, Any]], window: int = 5) -> str:
    """Held-out success first → last (when the envs evaluated), then the kept-group mean score:
    ``held-out success 0.125 (step 0) -> 0.875 (step 6); kept-group mean score first 5 steps 0.400 -> last 5 steps
    0.500 (6 steps)``."""
    scores = [r[SCORE] for r in trainer_rows(rows) if SCORE in r]
    if not scores:
        return "no steps recorded"
    k = min(window, len(scores))
    first, last = sum(scores[:k]) / k, sum(scores[-k:]) / k
    line = f"mean score first {k} steps {first:.3f} -> last {k} steps {last:.3f} ({len(scores)} steps)"
    held = held_out_points(rows)
    if held:
        (s0, v0), (s1, v1) = held[0], held[-1]
        line = f"held-out success {v0:.3f} (step {s0}) -> {v1:.3f} (step {s1}); kept-group {line}"
    return line


def plot_metrics(rows: list[dict[str, Any]], out_png: Path, title: str = "GRPO on Atropos") -> Path:
    """Top: held-out success (when evaluated) beside the kept-group mean score; bottom: response length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = trainer_rows(rows)
    steps = [r["step"] for r in train]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    held = held_out_points(rows)
    if held:
        top.plot([s for s, _ in held], [v for _, v in held], marker="s", color="tab:green", label="held-out success")
    scores = [r.get(SCORE, float("nan")) for r in train]
    top.plot(
        steps,
        scores,
        marker="o",
        color="tab:blue",
        label="kept-group mean score (training batches)",
    )
    top.set_ylabel("score")
    seen = [v for v in [*scores, *(v for _, v in held)] if v == v]  # NaN != NaN
    top.set_ylim(min([0.0, *seen]) - 0.05, max([1.0, *seen]) + 0.05)  # [0, 1], or wider for envs scoring in [-1, 1]
    top.set_title(title)
    top.grid(alpha=0.3)
    top.legend(loc="lower right")
    bottom.plot(steps, [r.get(LENGTH, float("nan")) for r in train], marker="o", color="tab:orange")
    bottom.set_ylabel("response length (tokens)")
    bottom.set_xlabel("training step (held-out: policy after that many steps)")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png


class MetricsPlot:
    """``metrics.png``, redrawn whenever the metrics file holds an evaluation row it has not drawn (:meth:`refresh`,
    called at each look at the run) and at the end (:meth:`draw`). A plot that fails (matplotlib missing, a bad row)
    is logged as one error line and counted in :attr:`failures`, never raised: the run goes on."""

    def __init__(self, path: Path, title: str) -> None:
        self.path = Path(path)
        self.title = title
        self.failures = 0
        self.last_error = ""
        self.evals_drawn = 0  # evaluation rows in the last plot

    def draw(self, rows: list[dict[str, Any]]) -> Path | None:
        """Plot ``rows`` (nothing when empty); the path, or None when nothing was drawn or the plot failed."""
        if not rows:
            return None
        try:
            out = plot_metrics(rows, self.path, title=self.title)
        except Exception as error:  # noqa: BLE001 - the plot is a view of the run, never a reason to stop it
            self.failures += 1
            self.last_error = f"{type(error).__name__}: {error}".splitlines()[0]
            logger.error("could not plot %s (failure %d): %s", self.path, self.failures, self.last_error)
            return None
        self.evals_drawn = sum(1 for row in rows if is_eval_row(row))
        return out

    def refresh(self, rows: list[dict[str, Any]]) -> Path | None:
        """Redraw when ``rows`` hold more evaluation rows than the last plot; the path when redrawn, else None."""
        if sum(1 for row in rows if is_eval_row(row)) <= self.evals_drawn:
            return None
        return self.draw(rows)

    def note(self) -> str:
        """``''``, or after failures the line ``metrics.png: 2 plot failures, the last: ModuleNotFoundError: ...``."""
        if not self.failures:
            return ""
        return f"{self.path.name}: {self.failures} plot failures, the last: {self.last_error}"


def resume_command(
    config_path: Path,
    overrides: Sequence[str],
    run_dir: Path,
    replace: Mapping[str, str] | None = None,
    python: str = sys.executable,
) -> str:
    """The launcher's command line for ``run_dir`` again, to paste into a shell: ``python -m
    recipe.atropos.launch_atropos_verl_services --config CONFIG OVERRIDES... atropos.launcher.run_dir=RUN_DIR``, with
    the run's ``overrides`` in their order, less any earlier value of ``atropos.launcher.run_dir`` and of the keys in
    ``replace``, which come last (``key=value``); each word quoted for the shell where needed."""
    settings = {"atropos.launcher.run_dir": str(run_dir), **dict(replace or {})}
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in settings]
    words = [python, "-m", "recipe.atropos.launch_atropos_verl_services", "--config", str(config_path), *kept]
    return shlex.join([*words, *(f"{key}={value}" for key, value in settings.items())])


def resume_line(
    command: Callable[[Mapping[str, str]], str],
    checkpoint: int | None,
    total_steps: int,
    save_freq: int,
    resume_mode: str = "auto",
) -> str:
    """What the launcher prints as it stops, from the newest ``checkpoint`` step (None: none saved):

    ``resume from checkpoint 5 (of 10 steps): <command>``;
    ``finished: checkpoint 10 of trainer.total_training_steps=10; to train on to step 20: <command with
    trainer.total_training_steps=20>``;
    ``no checkpoint saved yet (trainer.save_freq=5: one every 5 steps and at the last): a new launch starts at step 0``.

    ``command(replace)`` builds the command line (:func:`resume_command`); a run with ``trainer.resume_mode`` other
    than auto gets ``trainer.resume_mode=auto`` in it (the newest checkpoint of the run directory)."""
    if checkpoint is None:
        if save_freq <= 0:
            return (
                f"no checkpoint: trainer.save_freq={save_freq} saves none, so this run cannot be resumed (set "
                "trainer.save_freq=N to save one every N steps and at the last)"
            )
        return (
            f"no checkpoint saved yet (trainer.save_freq={save_freq}: one every {save_freq} steps and at the last): "
            "a new launch starts at step 0"
        )
    replace = {} if resume_mode == "auto" else {"trainer.resume_mode": "auto"}
    if checkpoint >= total_steps:
        more = {**replace, "trainer.total_training_steps": str(2 * total_steps)}
        return (
            f"finished: checkpoint {checkpoint} of trainer.total_training_steps={total_steps}; to train on to step "
            f"{2 * total_steps}: {command(more)}"
        )
    return f"resume from checkpoint {checkpoint} (of {total_steps} steps): {command(replace)}"


def fault_line(run_dir: RunDir, api_restarts: int, env_restarts: int) -> str:
    """One line: API/env restarts and groups the guarded API rejected ('' when there were none)."""
    stats_file = run_dir.guard_stats
    guard = json.loads(stats_file.read_text()) if stats_file.exists() else {}
    rejected = guard.get("rejected") or {}
    if not (api_restarts or env_restarts or rejected):
        return ""
    by_field = ", ".join(f"{field} {n}" for field, n in sorted(rejected.items())) or "none"
    return (
        f"faults: api restarts {api_restarts}, env restarts {env_restarts}, groups accepted "
        f"{guard.get('accepted_groups', 0)}, rejected {sum(rejected.values())} ({by_field}; kept in "
        f"{run_dir.rejected_groups})"
    )


def env_lines(run_dir: RunDir, rows: list[dict[str, Any]]) -> list[str]:
    """One line per env of the run (names from ``env_ids.json``): groups the guarded API received from it (rejected),
    sequences trained (env mixtures), completions the endpoint generated for it and its failed calls; for an env that
    posted nothing, why (``[]`` without the run's env ids)."""
    names_file, stats_file = run_dir.env_ids, run_dir.guard_stats
    names = json.loads(names_file.read_text()) if names_file.exists() else {}
    guard = (json.loads(stats_file.read_text()) if stats_file.exists() else {}).get("envs") or {}
    train = trainer_rows(rows)
    env_names = list(dict.fromkeys(names.values()))  # an env restarted registers again under a new id
    mixture = any(k.startswith("atropos/env/") and k.endswith("/sequences") for r in train for k in r)
    lines = []
    for name in env_names:
        ids = [env_id for env_id, n in names.items() if n == name]
        received = sum(int((guard.get(env_id) or {}).get("received", 0)) for env_id in ids)
        rejected = sum(int((guard.get(env_id) or {}).get("rejected", 0)) for env_id in ids)
        served = max((r.get(f"atropos/endpoint/env/{name}/completions", 0.0) for r in train), default=0.0)
        failed = max((r.get(f"atropos/endpoint/env/{name}/failed_calls", 0.0) for r in train), default=0.0)
        if mixture:  # mixture batches count each env's sequences
            trained = f"trained {sum(r.get(f'atropos/env/{name}/sequences', 0.0) for r in train):.0f} sequences"
        elif len(env_names) == 1:  # FIFO batches of one env: every trained sequence is its
            trained = f"trained {sum(r.get('atropos/sequences', 0.0) for r in train):.0f} sequences"
        else:
            trained = "trained sequences not counted per env (FIFO batches; atropos.mixture counts them)"
        line = (
            f"env {name}: posted {received} groups ({rejected} rejected), {trained}, "
            f"{served:.0f} completions served, {failed:.0f} failed calls"
        )
        if received == 0 and served == 0:
            line += ": it got no completion from the endpoint (its calls fail, or it fails before calling): see its log"
        elif received == 0:
            line += (
                ": it generates but posts nothing, so it drops its groups itself (scores all equal, length, or a "
                "filter of its own): see its log"
            )
        lines.append(line)
    return lines


def group_account(run_dir: RunDir, spool_dir: str | Path | None = None) -> GroupAccount | None:
    """Where every group of the run went (:mod:`recipe.atropos.launcher.accounting`); None without the guard's
    journal (plain ``run-api``) or the trainer's spool on this host. ``spool_dir``: ``atropos.spool.dir`` when set
    (default ``checkpoints/spool``)."""
    spool = run_dir.spool(spool_dir).root
    if not run_dir.api_journal.exists() or not spool.exists():
        return None  # plain run-api, or the trainer's spool on another host (atropos.launcher.role=services)
    return account_groups(run_dir.api_journal, run_dir.guard_stats, spool, run_dir.trainer_rejected)


def write_run_report(
    run_dir: RunDir,
    title: str,
    api_restarts: int,
    env_restarts: int,
    spool_dir: str | Path | None = None,
    plot: MetricsPlot | None = None,
) -> str:
    """The closing summary, the ``groups: posted P, trained T, set aside S, pending N, lost L`` line (guarded API),
    plus the fault line when there were faults and the plot's failures (:meth:`MetricsPlot.note`); also kept in
    ``<run_dir>/summary.txt``; ``<run_dir>/metrics.png`` drawn by ``plot`` (default: a new :class:`MetricsPlot`) when
    any row was recorded."""
    rows = read_metrics(run_dir.metrics_file)
    summary = "\n".join([summarize(rows), *env_lines(run_dir, rows)])
    plot = plot or MetricsPlot(run_dir.metrics_plot, title)
    drawn = plot.draw(rows)
    if drawn is not None:
        logger.info("plot: %s", drawn)
    account = group_account(run_dir, spool_dir)
    if account is not None:
        summary = f"{summary}\n{account.line()}"
        if account.set_aside:
            summary += f"\nset aside by reason: {account.reasons()}"
        if account.lost_ids:
            logger.error(
                "groups lost (accepted by the API, then neither trained, set aside nor pending): %s",
                ", ".join(account.lost_ids[:20]),
            )
    faults = fault_line(run_dir, api_restarts, env_restarts)
    if faults:
        summary = f"{summary}\n{faults}"
    if plot.note():
        summary = f"{summary}\n{plot.note()}"
    write_atomic(run_dir.summary, summary + "\n")
    return summary
