"""LoRA settings: which push verl makes (:func:`lora_as_adapter`), the start-up refusals of the combinations that
would leave the rollout on the base model (``check_lora_config``), and the CPU runtime's ``load_format`` for vLLM."""

from __future__ import annotations

import importlib.util

import pytest

from recipe.atropos.config.checks import check_atropos_config
from recipe.atropos.launcher.config import load_config
from recipe.atropos.setup.cpu_runtime import apply_cpu_runtime, cpu_runtime_env
from recipe.atropos.setup.weight_sync import lora_as_adapter
from tests.factories import CONFIG_DIR, TINY_CONFIG

LORA = ["actor_rollout_ref.model.lora_rank=8", "actor_rollout_ref.model.lora_alpha=16"]


def tiny(*overrides: str):
    return load_config(TINY_CONFIG, ["actor_rollout_ref.model.path=/m", *overrides])


@pytest.mark.parametrize(
    ("overrides", "adapter"),
    [
        ([], False),
        (LORA, True),
        ([*LORA, "actor_rollout_ref.model.lora.merge=true"], False),
        (["actor_rollout_ref.model.lora.rank=4"], True),
    ],
)
def test_lora_as_adapter(overrides: list[str], adapter: bool) -> None:
    assert lora_as_adapter(tiny(*overrides)) is adapter


def test_lora_with_the_colocated_sync_and_the_ray_backend_is_accepted() -> None:
    check_atropos_config(tiny(*LORA))


def test_lora_adapter_over_a_checkpoint_engine_is_refused_naming_merge() -> None:
    """verl issue 7495: that path sends the frozen base weights only."""
    config = tiny(*LORA, "actor_rollout_ref.rollout.checkpoint_engine.backend=nccl")
    with pytest.raises(ValueError, match=r"7495.*lora\.merge=true"):
        check_atropos_config(config)
    check_atropos_config(tiny(*LORA, "actor_rollout_ref.model.lora.merge=true"))  # merged weights: fine


def test_lora_adapter_with_vllms_http_server_is_refused() -> None:
    config = tiny(*LORA, "atropos.inference.backend=vllm_http", "actor_rollout_ref.rollout.name=vllm")
    with pytest.raises(ValueError, match="would serve the base model"):
        check_atropos_config(config)
    merged = tiny(
        *LORA,
        "actor_rollout_ref.model.lora.merge=true",
        "atropos.inference.backend=vllm_http",
        "actor_rollout_ref.rollout.name=vllm",
    )
    check_atropos_config(merged)


@pytest.mark.parametrize(("cpu_rollout", "lora", "load_format"), [("vllm", True, "auto"), ("vllm", False, "dummy")])
def test_cpu_runtime_loads_the_base_from_disk_for_vllm_lora(
    monkeypatch: pytest.MonkeyPatch, cpu_rollout: str, lora: bool, load_format: str
) -> None:
    for key in cpu_runtime_env():  # apply_cpu_runtime exports these: setenv records them, so they are restored
        monkeypatch.setenv(key, "")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a)
    )
    config = tiny(f"atropos.cpu_rollout={cpu_rollout}", *(LORA if lora else []))
    apply_cpu_runtime(config)
    assert config.actor_rollout_ref.rollout.name == "vllm_cpu"
    assert config.actor_rollout_ref.rollout.load_format == load_format


def flat(tree: object, prefix: str = "") -> dict[str, object]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict[str, object] = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def test_the_lora_demo_is_the_cpu_demo_plus_lora() -> None:
    """The LoRA demo extends the demo: only the LoRA keys and the experiment's name differ."""
    from omegaconf import OmegaConf

    demo, lora = (
        flat(OmegaConf.to_container(load_config(CONFIG_DIR / f"{name}.yaml", []), resolve=True))
        for name in ("atropos_grpo_cpu_demo", "atropos_grpo_cpu_demo_lora")
    )
    differ = {k for k in demo.keys() | lora.keys() if demo.get(k, "<missing>") != lora.get(k, "<missing>")}
    assert differ == {
        "actor_rollout_ref.model.lora_rank",
        "actor_rollout_ref.model.lora_alpha",
        "actor_rollout_ref.actor.optim.lr",
        # the experiment's name and what verl derives from it
        "trainer.experiment_name",
        "trainer.default_local_dir",
        "actor_rollout_ref.rollout.trace.experiment_name",
    }
    assert (lora["actor_rollout_ref.model.lora_rank"], lora["actor_rollout_ref.model.lora_alpha"]) == (16, 32)
    assert lora["actor_rollout_ref.model.target_modules"] == "all-linear"
    check_atropos_config(load_config(CONFIG_DIR / "atropos_grpo_cpu_demo_lora.yaml", []))
