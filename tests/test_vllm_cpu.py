"""verl's own vLLM rollout driving the whole loop on CPU: vLLM 0.24.0's CPU build in ``.venv-vllm``.

Through the launcher (run-api, the trainer, its inference endpoint, both bundled envs) with the tiny model and
``atropos.cpu_rollout=vllm``: verl's ``vLLMReplica``/``vLLMHttpServer`` start vLLM inside Ray, verl's bucketed weight
transfer pushes the trained weights into vLLM's worker after every step (our CPU worker extension reloads them in
place), and the environments' completions come from that vLLM — through verl's ``generate`` (``ray`` backend) or
vLLM's own OpenAI server (``vllm_http`` backend). Nothing is a stand-in.

Needs vLLM (``make vllm-env``; ``make test-vllm`` runs this file): skipped where ``import vllm`` fails.
"""

from __future__ import annotations

import importlib.util
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import torch

from recipe.atropos.plotting import read_metrics
from recipe.atropos.processes import ManagedProcess, tail
from recipe.atropos.runtime.assets import build_tiny_model

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.e2e,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM's CPU build (make vllm-env)"),
]

CONFIG = Path(__file__).resolve().parents[1] / "recipe" / "atropos" / "config" / "atropos_grpo_tiny.yaml"
STEPS = 3
# |rollout log-prob - trainer log-prob| on the same tokens and weights (both fp32; measured: ~1e-6).
MAX_LOGPROB_DIFF = 0.05


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture()
def no_leftovers() -> Iterator[list[ManagedProcess]]:
    """Processes the test starts; afterwards none of them, nor any descendant (Ray, vLLM workers), may remain."""
    started: list[ManagedProcess] = []
    yield started
    for proc in reversed(started):
        proc.stop()
    deadline = time.monotonic() + 30
    left = [p for p in psutil.Process().children(recursive=True) if p.is_running()]
    while left and time.monotonic() < deadline:
        time.sleep(1)
        left = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, f"processes left behind: {[p.cmdline() for p in left]}"


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


@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["ray", "vllm_http"])
def test_verl_vllm_rollout_runs_the_loop_on_cpu(
    backend: str, tiny_model: Path, tmp_path: Path, no_leftovers: list[ManagedProcess]
) -> None:
    run_dir = tmp_path / "run"
    argv = [
        sys.executable,
        "-m",
        "recipe.atropos.launch_atropos_verl_services",
        "--config",
        str(CONFIG),
        f"actor_rollout_ref.model.path={tiny_model}",
        f"atropos.launcher.run_dir={run_dir}",
        "atropos.cpu_rollout=vllm",
        f"atropos.inference.backend={backend}",
        f"trainer.total_training_steps={STEPS}",
        "trainer.save_freq=1",  # the checkpoints hold the weights the trainer pushed (checked against vLLM's)
        # train only on completions of the current policy: the log-prob diff then measures vLLM against the trainer
        # on identical weights (stale groups are dropped and counted)
        "atropos.max_policy_lag=0",
    ]
    launcher = ManagedProcess("launcher", argv, tmp_path / "launcher.log")
    no_leftovers.append(launcher.start())
    deadline = time.monotonic() + 840
    while launcher.poll() is None and time.monotonic() < deadline:
        time.sleep(2)
    trainer_log = run_dir / "logs" / "trainer.log"
    assert launcher.poll() == 0, tail(launcher.log_path, 40) + "\n--- trainer ---\n" + tail(trainer_log, 60)

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
