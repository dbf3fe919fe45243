"""Fault suite, process level: whole runs through the launcher (tiny config, real guard/run-api, envs, verl, Ray).

Every scenario ends with the account of every group by id (:mod:`recipe.atropos.launcher.accounting`: posted,
trained, set aside with the reason, pending, lost) and asserts **0 lost**: the guarded API journals each group until
the trainer acknowledges it after its spool write, and the spool trains each id once. Each prints one row of the
fault table (``FAULT-TABLE`` lines: run with ``-s`` to see them). Scenarios share runs where each leaves the
accounting exact, two runs in all: an env killed and malformed groups posted in the run that also tests bypass mode
with the rollout split from the actor and the env's held-out evaluations (one module-scoped run, two tests); the API
SIGKILLed, then Ctrl-C, a SIGKILLed trainer and a SIGKILLed launcher in one run in split placement resumed three
times, the first time by the command the launcher printed as it stopped. The API kill runs
with a memory bound of one batch, so groups wait on disk.
"""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests
import torch
import yaml

from recipe.atropos.launcher.accounting import GroupAccount
from recipe.atropos.launcher.processes import tail
from recipe.atropos.launcher.report import group_account
from recipe.atropos.launcher.supervisor import Launcher
from recipe.atropos.metrics_file import read_metrics
from recipe.atropos.rundir import RunDir, SpoolDir
from tests.factories import CONFIG_DIR, TINY_CONFIG
from tests.helpers import (
    Launch,
    checkpoint_state,
    launcher_argv,
    launcher_factory,
    no_processes_left,
    printed_resume_command,
    wait_until,
)

pytestmark = pytest.mark.timeout(900)


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def spool_counters(run_dir: Path) -> dict:
    """The spool's counters and pending files: nothing fetched is lost (``written == deleted + stale + pending``)."""
    spool_dir = RunDir(run_dir).spool().root
    spool = read_json(SpoolDir(spool_dir).counters)
    spool["pending"] = len(list(SpoolDir(spool_dir).pending.glob("*.json"))) if spool_dir.exists() else 0
    return spool


def assert_nothing_fetched_lost(spool: dict) -> None:
    assert spool["written"] > 0
    assert spool["written"] == spool["deleted"] + spool["stale"] + spool["pending"], spool


def account(run_dir: Path, *, finished: bool = True) -> GroupAccount:
    """The run's account by group id; 0 lost (the ids are named otherwise); a finished run printed the same line."""
    acc = group_account(RunDir(run_dir))
    assert acc is not None, "no API journal in the run directory"
    assert acc.lost == 0, (acc.line(), acc.lost_ids)
    assert acc.posted == acc.trained + acc.set_aside_total + acc.pending + acc.lost
    assert acc.trained > 0
    if finished:
        assert acc.line() in RunDir(run_dir).summary.read_text()
    return acc


def table_row(name: str, steps: int, total: int, acc: GroupAccount, stall_s: float, extra: str = "") -> None:
    print(
        f"FAULT-TABLE | {name} | steps {steps}/{total} | posted {acc.posted} | trained {acc.trained} | "
        f"set aside {acc.set_aside_total} ({acc.reasons() or 'none'}) | pending {acc.pending} | lost {acc.lost} | "
        f"stall {stall_s:.1f} s | {extra}",
        flush=True,
    )


def max_gap_s(rows: list[dict]) -> float:
    """Longest step after the first (which includes warm-up), a stand-in for the stall a fault caused."""
    return max((float(r.get("timing_s/step", 0.0)) for r in rows[1:]), default=0.0)


def kill(proc: psutil.Process) -> None:
    """SIGKILL, and wait until it is dead (a zombie until the launcher reaps it): it counts nothing more."""

    def dead() -> bool:
        try:
            return proc.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    proc.kill()
    wait_until(dead, 10, f"pid {proc.pid} to die", interval=0.01)


# ---- one run: bypass mode, split rollout, held-out evaluations; an env SIGKILLed and malformed groups posted ---------
SPLIT_STEPS = 3


@dataclass
class SplitRun:
    run: Launch
    rows: list[dict]  # the trainer's rows (one per step)
    evals: list[dict]  # the env's held-out evaluations (rows with a ``source``)
    codes: list[int]  # the API's answers to the four malformed groups


def model_bytes(model_dir: Path) -> tuple[int, int]:
    """(bytes, tensors) of the model's weights as the actor sends them (its state dict, fp32 on CPU)."""
    from transformers import AutoModelForCausalLM

    state = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()
    return sum(t.numel() * t.element_size() for t in state.values()), len(state)


@pytest.fixture(scope="module")
def split_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[SplitRun]:
    """One launcher run shared by the two tests below. The demo's mode on the tiny config: bypass (the actor applies
    min(π_θ/π_rollout, 2) itself, no old-log-prob pass), the rollout split from the actor, the first env (one_word)
    evaluating on held-out questions every API step. After step 1 two faults: the other env (one_word_pairs: it does
    not evaluate, so the checks of the evaluations do not hang on a restart) is SIGKILLed, and four malformed groups
    are posted to the API. Run to its end (exit 0); no process of it may be left afterwards."""
    tmp = tmp_path_factory.mktemp("split_faults")
    # env flag names hold dots, so the YAML is edited rather than overridden
    config_dir = tmp / "config"
    config_dir.mkdir()
    shutil.copy(CONFIG_DIR / "atropos_grpo_base.yaml", config_dir / "atropos_grpo_base.yaml")
    tiny = yaml.safe_load((TINY_CONFIG).read_text())
    tiny["atropos"]["launcher"]["envs"][0]["args"].update({"env.steps_per_eval": 1, "env.eval_questions": 2})
    (config_dir / "tiny_eval.yaml").write_text(yaml.safe_dump(tiny, sort_keys=False))
    with no_processes_left(), launcher_factory(tiny_model, tmp) as launch:
        run = launch(
            f"trainer.total_training_steps={SPLIT_STEPS}",
            "algorithm.rollout_correction.bypass_mode=true",
            "atropos.final_eval_wait_s=300",
            "actor_rollout_ref.hybrid_engine=false",
            "actor_rollout_ref.rollout.nnodes=1",
            config=config_dir / "tiny_eval.yaml",
        )
        run.wait_for(lambda: "step 1/" in run.log_text(), 600, "step 1")
        argv = run.child("recipe.atropos.guard.app").cmdline()
        url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}"
        kill(run.child("/env/one_word_pairs/v1"))  # its endpoint URL names it
        vocab = json.loads((tiny_model / "config.json").read_text())["vocab_size"]
        x = -100
        bad = [
            {"tokens": [[1, 2, vocab]] * 4, "masks": [[x, x, vocab]] * 4, "scores": [1.0, 0.0, 1.0, 0.0]},
            {"tokens": [[1, 2, 3]] * 4, "masks": [[x, x, 3]] * 4, "scores": [float("nan"), 0.0, 1.0, 0.0]},
            {"tokens": [[1, 2, 3]] * 5, "masks": [[x, x, 3]] * 5, "scores": [1.0, 0.0, 1.0, 0.0, 1.0]},
            {"tokens": [], "masks": [], "scores": []},
        ]
        headers = {"Content-Type": "application/json"}
        codes = [requests.post(f"{url}/scored_data", data=json.dumps(b), headers=headers).status_code for b in bad]
        assert run.wait_exit(800) == 0, tail(run.log, 80)
    rows = read_metrics(RunDir(run.run_dir).metrics_file)
    evals = [r for r in rows if r.get("source") == "env:one_word"]
    yield SplitRun(run, [r for r in rows if "source" not in r], evals, codes)


def test_env_crash_and_bad_groups_after_step_1_the_run_finishes_and_loses_nothing(split_run: SplitRun) -> None:
    """Two faults in one run (``split_run``), each leaving the accounting exact: an env killed (restarted by the
    launcher), and the four groups that ended or stalled a run before the guard posted to the API: token id past the
    vocabulary, NaN score, a group of 5 in a batch of 8, an empty group (each refused with 422)."""
    run, rows = split_run.run, split_run.rows
    assert split_run.codes == [422, 422, 422, 422]
    assert [int(r["step"]) for r in rows] == list(range(1, SPLIT_STEPS + 1))
    state = read_json(RunDir(run.run_dir).launcher_state)
    assert state["env_restarts"] == {"one_word_pairs": 1}, state
    guard = read_json(RunDir(run.run_dir).guard_stats)
    # An env killed in the middle of a POST leaves the guard a truncated body, refused as `body` (at most one: the
    # env sends one group at a time). Only that may come beside the four groups posted here.
    truncated = guard["rejected"].get("body", 0)
    assert truncated <= 1, guard
    assert {k: v for k, v in guard["rejected"].items() if k != "body"} == {"tokens": 2, "scores": 1, "group_size": 1}
    assert len(RunDir(run.run_dir).rejected_groups.read_text().splitlines()) == 4 + truncated
    counts = "body 1, group_size 1" if truncated else "group_size 1"
    assert f"rejected {4 + truncated} ({counts}, scores 1, tokens 2" in RunDir(run.run_dir).summary.read_text()
    assert_nothing_fetched_lost(spool_counters(run.run_dir))
    acc = account(run.run_dir)
    assert acc.set_aside["rejected by the API (tokens)"] == 2 and acc.set_aside["rejected by the API (scores)"] == 1
    table_row(
        "one env SIGKILLed and 4 malformed groups posted after step 1 (bypass, split rollout)",
        len(rows),
        SPLIT_STEPS,
        acc,
        max_gap_s(rows),
        f"all 4 got 422; truncated bodies refused {truncated}; restarts {state}",
    )


def test_bypass_mode_with_a_split_rollout_trains_end_to_end(split_run: SplitRun, tiny_model: Path) -> None:
    """The same run (``split_run``): the actor applies min(π_θ/π_rollout, 2) itself; no old-log-prob pass; the env's
    held-out evaluations land in the metrics file and the summary. Split placement: the endpoint never holds a request;
    after every swap the replica samples with the weights the actor checkpointed at that step."""
    run_dir, rows, evals = split_run.run.run_dir, split_run.rows, split_run.evals
    assert [r["step"] for r in rows] == list(range(1, SPLIT_STEPS + 1))
    # held-out evaluations reach the trainer's metrics file: one at start-up (base model, version 0), then more
    assert evals and evals[0]["step"] == 0 and evals[0]["eval/one_word/held_out_samples"] == 8
    # ... and the last one measured the final policy: the trainer kept serving it until the env had (final_eval_wait_s)
    assert evals[-1]["step"] == SPLIT_STEPS, [e["step"] for e in evals]
    assert "within atropos.final_eval_wait_s" not in RunDir(run_dir).trainer_log.read_text()
    assert all(0.0 <= r["eval/one_word/held_out_success"] <= 1.0 for r in evals)
    assert RunDir(run_dir).summary.read_text().startswith("held-out success ")
    for row in rows:
        assert "timing_s/old_log_prob" not in row  # skipped: the rollout's log-probs are the behaviour policy
        assert 0.0 < row["atropos/is_weight_mean"] <= 2.0 and row["atropos/is_weight_max"] <= 2.0
        assert 0.0 <= row["atropos/is_truncated_fraction"] <= 1.0
        lags = [row["atropos/policy_lag_0"], row["atropos/policy_lag_1"], row["atropos/policy_lag_2plus"]]
        assert sum(lags) == pytest.approx(1.0)
    # ---- split placement ---------------------------------------------------------------------------------------
    trainer_log = RunDir(run_dir).trainer_log.read_text()
    assert "split placement: actor on 1 x 1 devices, 1 rollout replica(s) on 1 x 1, weights via gloo" in trainer_log
    payload, n_tensors = model_bytes(tiny_model)
    for row in rows:
        step = int(row["step"])
        assert row["atropos/endpoint/paused_s"] == 0.0  # the gate never held a request: envs were always served
        assert "timing_s/pause_endpoint" not in row
        # one load at start-up and one per step, now serving this step's policy
        assert row["rollout/0/probe_weight_loads"] == step + 1
        assert row["rollout/0/policy_version"] == row["atropos/policy_version"] == step
        # the whole model crossed the gloo engine (buckets add at most 15 alignment bytes per tensor)
        sent = row["atropos/weight_sync/megabytes"] * 2**20
        assert payload <= sent <= payload + 15 * n_tensors
        # the replica's probe module holds exactly what the actor checkpointed at this step
        state = checkpoint_state(run_dir, step)
        (name,) = [k for k in state if k.endswith("layers.0.self_attn.q_proj.weight")]
        expected = float(state[name].to(torch.float64).sum())
        assert row["rollout/0/probe_module_weight_checksum"] == pytest.approx(expected, abs=1e-9)
        # held = the replica's weight-load time (no gate pause), a fraction of the step
        held, step_s = row["atropos/endpoint/held_s"], row["timing_s/step"]
        assert 0.0 < held < step_s and row["atropos/endpoint/paused_fraction"] == pytest.approx(held / step_s)
    served = [row["atropos/endpoint/completions_during_update"] for row in rows]
    print(f"split: completions served during the actor's updates per step {served}")


def descendants_of(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


def gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_api_sigkill_ctrl_c_trainer_sigkill_and_launcher_sigkill_then_resume_lose_nothing(
    launch, tiny_model: Path
) -> None:
    """One run in split placement, four faults, each but the first followed by a resume. The first launch: the API
    SIGKILLed after step 1 (restarted by the launcher, the trainer registers again and trains on), then Ctrl-C after
    the first checkpoint since, and the second launch is the resume command the launcher printed as it stopped; the
    trainer SIGKILLed in the middle of a step (the launcher stops the rest and exits 1); the launcher itself SIGKILLed
    (its services and Ray die with it). The fourth launch finishes; nothing is lost, and the launcher's check finds the
    run finished."""
    # The three interrupted launches run towards a horizon they never reach (on a quiet machine queued groups train in
    # 0.2-0.5 s a step, so the first launch's stop lands anywhere from checkpoint 2 to 7); the last one resumes with
    # total_training_steps = its checkpoint + 2, as the launcher's own "to train on" line does for a finished run.
    horizon = 1000
    # split placement: the rollout on devices of its own (colocated resume: test_e2e_trainer.py and test_lora_e2e.py)
    split = ("actor_rollout_ref.hybrid_engine=false", "actor_rollout_ref.rollout.nnodes=1")
    args = (f"trainer.total_training_steps={horizon}", "trainer.save_freq=1", *split)
    # The first launch, the API kill: the env mixture keeps at most one batch of surplus per env, so the steps after the
    # kill must poll the restarted API (with a deeper surplus they can all be served from groups fetched before it, and
    # nothing re-registers). Memory bound of one batch: further groups wait in the journal's backlog on disk.
    first_args = (*args, "atropos.mixture_max_pending_batches=1", "atropos.guard.max_queued_sequences=8")
    run = launch(*first_args)
    latest = RunDir(run.run_dir).checkpoints / "latest_checkpointed_iteration.txt"
    metrics = RunDir(run.run_dir).metrics_file

    def checkpoint() -> int:
        return int(latest.read_text() or 0) if latest.exists() else 0

    run.wait_for(lambda: "step 1/" in run.log_text(), 600, "step 1")
    api = run.child("recipe.atropos.guard.app")
    url = f"http://127.0.0.1:{api.cmdline()[api.cmdline().index('--port') + 1]}"

    def holds_unfetched() -> bool:  # posted, not yet fetched: what a plain run-api loses to a SIGKILL
        stats = requests.get(f"{url}/guard/stats", timeout=5).json()
        return stats["memory_groups"] + stats["backlog_groups"] > 0

    run.wait_for(holds_unfetched, 300, "groups waiting in the API")
    kill(api)
    at_kill = read_json(RunDir(run.run_dir).guard_stats)  # saved at every change: the state at the kill
    assert at_kill["journal_groups"] >= 1, at_kill

    def trained_on_after_the_restart() -> bool:
        """The restarted API (same port) lists both envs again (the launcher registers them in order, so env id 1
        means both), the trainer registered again, and a step it trained since is checkpointed."""
        try:
            if requests.get(f"{url}/status-env", json={"env_id": 1}, timeout=5).status_code != 200:
                return False
        except requests.RequestException:
            return False
        again = [r for r in read_metrics(metrics) if r.get("atropos/reregistrations", 0.0) >= 1.0]
        return bool(again) and checkpoint() >= int(again[0]["step"])

    run.wait_for(trained_on_after_the_restart, 600, "a checkpointed step after the API's restart")
    run.send_signal(signal.SIGINT)
    assert run.wait_exit(120) == 130
    rows = read_metrics(metrics)
    assert [int(r["step"]) for r in rows] == list(range(1, len(rows) + 1))
    state = read_json(RunDir(run.run_dir).launcher_state)  # written as the launcher stops, Ctrl-C included
    assert state["api_restarts"] == 1
    assert rows[-1]["atropos/reregistrations"] >= 1.0
    assert rows[-1]["atropos/api_restarts"] == 1.0
    guard = read_json(RunDir(run.run_dir).guard_stats)
    assert guard["starts"] == at_kill["starts"] + 1, (guard, at_kill)
    # what the killed API held unacknowledged was served again by the next one (its journal), none lost
    assert guard["resumed_groups"] == at_kill["journal_groups"], (guard, at_kill)
    interrupted = spool_counters(run.run_dir)
    assert_nothing_fetched_lost(interrupted)
    step = checkpoint()
    assert step >= 1
    # the checkpoint left by the stop is usable: the actor's shard and its HF config
    actor = RunDir(run.run_dir).checkpoints / f"global_step_{step}" / "actor"
    assert any(actor.glob("model_world_size_*_rank_0.pt"))
    assert (actor / "huggingface" / "config.json").exists()
    mid = account(run.run_dir, finished=False)
    table_row(
        f"run-api SIGKILLed after step 1 (memory bound 8 sequences), then Ctrl-C after checkpoint {step}",
        step,
        horizon,
        mid,
        max_gap_s(rows),
        f"unacknowledged at the kill {at_kill['journal_groups']} (in memory {at_kill['memory_sequences']} seqs, "
        f"on disk {at_kill['backlog_groups']} groups), served again {guard['resumed_groups']}; restarts {state}; "
        f"spooled at the stop {interrupted['pending']}",
    )

    # the launcher's last line is the command that resumes the run: the same one, the run directory last
    head, resume = printed_resume_command(run.log_text())
    assert head == f"resume from checkpoint {step} (of {horizon} steps)"
    first = launcher_argv(tiny_model, run.run_dir, *first_args)
    assert resume == [a for a in first if not a.startswith("atropos.launcher.run_dir=")] + [
        f"atropos.launcher.run_dir={run.run_dir}"
    ]

    # resume with that command, then SIGKILL the trainer in the middle of the next step (its batch fetched, not yet
    # trained)
    second = launch(argv=resume)
    second.wait_for(lambda: checkpoint() > step, 600, "a step after the resume")
    trained_to = checkpoint()
    second.wait_for(lambda: len(read_metrics(metrics)) >= trained_to, 120, "the step's metrics row")
    trainer = second.child("recipe.atropos.main_atropos")
    kill(trainer)
    assert second.wait_exit(180) == 1
    mid = account(run.run_dir, finished=False)
    table_row(f"trainer SIGKILLed after checkpoint {trained_to}", trained_to, horizon, mid, 0.0)

    # resume, then SIGKILL the launcher: every process it started dies with it (none re-parented to init)
    resumed_at = checkpoint()  # the killed trainer may have saved one more checkpoint since trained_to was read
    third = launch(*args)
    third.wait_for(lambda: checkpoint() > resumed_at, 600, "a step after the second resume")
    children = descendants_of(third.proc.pid)
    names = {c.pid: " ".join(c.cmdline())[:120] for c in children}
    assert any("main_atropos" in name for name in names.values())
    third.proc.popen.send_signal(signal.SIGKILL)
    third.proc.popen.wait(30)
    killed = time.monotonic()
    last_death = {}

    def all_gone() -> bool:
        for child in children:
            if child.pid not in last_death and gone(child):
                last_death[child.pid] = time.monotonic() - killed
        return len(last_death) == len(children)

    try:  # the services die at once (PR_SET_PDEATHSIG), the rest by the watchdog within a second or two
        wait_until(all_gone, 30, "the launcher's processes to die with it", interval=0.1)
    except AssertionError as error:
        left = [names[c.pid] for c in children if c.pid not in last_death]
        raise AssertionError(f"{len(left)} processes outlived the launcher: {left}") from error
    slowest = max(last_death, key=last_death.get)
    killed_at = checkpoint()
    mid = account(run.run_dir, finished=False)
    died = f"{len(children)} processes died with it, the last after {last_death[slowest]:.1f} s ({names[slowest]})"
    table_row(f"launcher SIGKILLed after checkpoint {killed_at}", killed_at, horizon, mid, 0.0, died)

    total = killed_at + 2
    args = (f"trainer.total_training_steps={total}", "trainer.save_freq=1", *split)
    last = launch(*args)
    assert last.wait_exit(800) == 0, last.log_text()[-4000:]
    rows = read_metrics(metrics)
    assert int(rows[-1]["step"]) == total
    spool = spool_counters(run.run_dir)
    assert_nothing_fetched_lost(spool)
    assert spool["recovered"] >= 1
    acc = account(run.run_dir)
    guard = read_json(RunDir(run.run_dir).guard_stats)
    table_row(
        "Ctrl-C, trainer SIGKILL, launcher SIGKILL, each resumed",
        int(rows[-1]["step"]),
        total,
        acc,
        max_gap_s(rows),
        f"spool recovered {spool['recovered']}, duplicates dropped {spool['duplicates']}; "
        f"API starts {guard['starts']}, "
        f"groups served again from its journal {guard['resumed_groups']} (last start)",
    )
    # a fifth launch would find the run finished: the launcher's own check on this run directory (a fifth launcher
    # process costs a start-up and its pre-flight; its message and exit code 0 on a finished run are checked in
    # tests/integration/test_faults_units.py::test_resuming_a_finished_run_says_so_and_exits_0)
    overrides = [f"actor_rollout_ref.model.path={tiny_model}", f"atropos.launcher.run_dir={run.run_dir}", *args]
    assert Launcher(TINY_CONFIG, overrides).finished() == total
