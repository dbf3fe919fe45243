"""Our GPU extras against verl 0.9.1's own pins (read from the installed verl's metadata): fails when they drift."""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement

from recipe.atropos.setup.gpu import FLASH_ATTN_INSTALL

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def _project() -> dict:
    return tomllib.loads(PYPROJECT.read_text())["project"]


def _ours(extra: str) -> dict[str, Requirement]:
    return {Requirement(r).name: Requirement(r) for r in _project()["optional-dependencies"][extra]}


def _verls(extra: str) -> dict[str, Requirement]:
    """verl's requirements that apply only with ``verl[extra]`` (marker ``extra == "<extra>"``)."""
    out = {}
    for text in importlib.metadata.requires("verl") or []:
        req = Requirement(text)
        if req.marker is None:
            continue
        env = {**default_environment(), "extra": extra}
        if req.marker.evaluate(env) and not req.marker.evaluate({**env, "extra": "__none__"}):
            out[req.name] = req
    return out


def _pin(req: Requirement) -> str | None:
    pins = [s.version for s in req.specifier if s.operator == "=="]
    return pins[0] if pins else None


def test_verl_itself_is_the_pinned_release() -> None:
    core = {Requirement(r).name: Requirement(r) for r in _project()["dependencies"]}
    assert _pin(core["verl"]) == importlib.metadata.version("verl") == "0.9.1"


def test_gpu_extra_carries_every_pin_of_verls_vllm_extra() -> None:
    ours, verls = _ours("gpu"), _verls("vllm")
    pinned = {name: _pin(req) for name, req in verls.items() if _pin(req)}
    assert {"vllm", "torch", "transformers"} <= set(pinned)  # verl still pins the stack this extra mirrors
    for name, version in pinned.items():
        assert name in ours, f"gpu extra lacks {name}=={version} (verl[vllm] pins it)"
        assert _pin(ours[name]) == version, f"gpu extra pins {ours[name]}, verl[vllm] pins {name}=={version}"
    assert ours["verl"].extras == {"vllm"} and _pin(ours["verl"]) == importlib.metadata.version("verl")


def test_no_core_dependency_pins_torch_against_the_gpu_stack() -> None:
    core = {Requirement(r).name: Requirement(r) for r in _project()["dependencies"]}
    gpu_torch = _pin(_ours("gpu")["torch"])
    assert core["torch"].specifier.contains(gpu_torch), f"core torch {core['torch']} excludes the GPU stack's torch"
    assert core["torch"].specifier.contains("2.13.0"), "core torch must accept the local CPU wheel (2.13.0)"


def test_sglang_extra_is_on_verls_torch_and_inside_verls_transformers_range() -> None:
    ours, verls_sglang = _ours("sglang"), _verls("sglang")
    for name in ("torch", "torchvision", "torchaudio"):
        assert _pin(ours[name]) == _pin(verls_sglang[name]), name
    core = {Requirement(r).name: Requirement(r) for r in importlib.metadata.requires("verl") if ";" not in r}
    ours_tf = _pin(ours["transformers"])
    assert core["transformers"].specifier.contains(ours_tf), f"verl excludes transformers {ours_tf}"
    # verl's own sglang extra pins sglang 0.5.12, whose transformers==5.6.0 verl's core excludes: why ours differs.
    assert _pin(verls_sglang["sglang"]) == "0.5.12" and not core["transformers"].specifier.contains("5.6.0")
    assert _pin(ours["sglang"]) == "0.5.14"


@pytest.mark.parametrize("extra", ["flash-attn-cu130torch211"])
def test_flash_attn_second_step_matches_verls_pin(extra: str) -> None:
    version = _pin(_verls(extra)["flash-attn"])
    assert f"flash-attn=={version} " in FLASH_ATTN_INSTALL + " "
