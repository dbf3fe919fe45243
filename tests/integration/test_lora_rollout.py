"""LoRA into the hf_cpu rollout, in-process: the tensors verl's colocated weight sync sends with ``lora_rank > 0``
(built with verl's own ``collect_lora_params`` / ``replace_lora_wrapper`` from a peft model, the names and order
``verl/workers/engine/fsdp/transformer_impl.py: get_per_tensor_param`` produces) reach :class:`HFGenerator`, which
then computes what the peft actor computes. The launcher-level proof is tests/e2e/test_lora_e2e.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, TaskType, get_peft_model
from transformers import AutoModelForCausalLM
from verl.utils.fsdp_utils import collect_lora_params, replace_lora_wrapper

from recipe.atropos.cpu.hf_cpu import HFGenerator
from recipe.atropos.cpu.hf_cpu_lora import lora_delta, lora_layers


def lora_actor(model_dir: Path, target_modules: object = "all-linear") -> torch.nn.Module:
    """The actor as verl's FSDP engine builds it (``_build_lora_module``): peft LoRA on the HF model."""
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=8, lora_alpha=16, target_modules=target_modules, bias="none")
    return get_peft_model(base, config)


def verl_push(actor: torch.nn.Module, base_sync_done: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, peft_config) as verl's engine hands them to the rollout's ``update_weights`` (unsharded module)."""
    peft_config = actor.peft_config["default"]
    params = collect_lora_params(module=actor, layered_summon=False, base_sync_done=base_sync_done)
    if not base_sync_done:
        params = {replace_lora_wrapper(k, peft_config): v for k, v in params.items()}
    return dict(params), peft_config.to_dict()


def train_a_little(actor: torch.nn.Module, seed: int) -> None:
    """Stand-in for an optimizer step: new random LoRA A/B (B no longer zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in actor.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05)


def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("target_modules", ["all-linear", ["q_proj", "v_proj"]])
def test_adapter_push_makes_the_rollout_compute_the_trained_policy(tiny_model: Path, target_modules: object) -> None:
    actor = lora_actor(tiny_model, target_modules)
    actor.eval()
    gen = HFGenerator(str(tiny_model), response_length=8)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    before = logits(gen.model, ids)
    assert gen.weight_probe()["lora_modules"] == 0

    # push 0 (verl's fit(): load_format=dummy, so base weights first, then the untrained adapter)
    base, peft_config = verl_push(actor, base_sync_done=False)
    assert any(".base_layer." in k for k in base)  # verl's names for targeted layers' own weights
    gen.load_weights(base, 0, peft_config, base_sync_done=False)
    assert "start_module_weight_checksum" not in gen.weight_probe()  # base weights alone are not the policy yet
    adapter, peft_config = verl_push(actor, base_sync_done=True)
    assert adapter and all("lora_" in k for k in adapter)
    gen.load_weights(adapter, 0, peft_config, base_sync_done=True)
    probe0 = gen.weight_probe()
    assert probe0["lora_modules"] == len(lora_layers(actor)) > 0
    assert probe0["lora_delta_norm"] == 0.0  # lora_B starts at zero: the initial policy
    assert probe0["start_module_weight_checksum"] == probe0["module_weight_checksum"]
    torch.testing.assert_close(logits(gen.model, ids), before)

    checksums = []
    for step in (1, 2):
        train_a_little(actor, seed=step)
        adapter, peft_config = verl_push(actor, base_sync_done=True)
        gen.load_weights(adapter, step, peft_config, base_sync_done=True)
        probe = gen.weight_probe()
        assert gen.policy_version == step and probe["adapter_loads"] == step + 1
        torch.testing.assert_close(logits(gen.model, ids), logits(actor, ids), rtol=1e-5, atol=1e-5)
        # the probe is the actor's effective weight of the probe module, computed independently here
        module = lora_layers(actor)[gen.probe_module]
        expected = module.base_layer.weight.detach().to(torch.float64) + lora_delta(module)
        assert probe["module_weight_checksum"] == pytest.approx(float(expected.sum()), abs=1e-9)
        assert probe["lora_delta_norm"] > 0
        assert probe["start_module_weight_checksum"] == probe0["module_weight_checksum"]
        checksums.append(probe["module_weight_checksum"])
    assert len(set(checksums)) == 2  # each push changed what the rollout samples with
    assert not torch.allclose(logits(gen.model, ids), before)


def test_a_partial_or_foreign_adapter_is_refused(tiny_model: Path) -> None:
    actor = lora_actor(tiny_model)
    gen = HFGenerator(str(tiny_model), response_length=8)
    adapter, peft_config = verl_push(actor, base_sync_done=True)
    gen.load_weights(adapter, 0, peft_config, base_sync_done=True)
    partial = dict(list(adapter.items())[:-1])
    with pytest.raises(KeyError, match="lacks 1 tensors"):
        gen.load_weights(partial, 1, peft_config, base_sync_done=True)
    with pytest.raises(KeyError, match="does not have"):
        gen.load_weights({**adapter, "base_model.model.nope.lora_A.weight": torch.zeros(1)}, 1, peft_config)
    with pytest.raises(ValueError, match="LoRA config changed"):
        gen.load_weights(adapter, 1, {**peft_config, "r": 4}, base_sync_done=True)


def test_merged_push_loads_as_full_weights(tiny_model: Path) -> None:
    """``lora.merge=true``: verl merges B·A into the base weights and sends HF names, peft_config None."""
    actor = lora_actor(tiny_model)
    train_a_little(actor, seed=3)
    actor.eval()
    ids = torch.tensor([[2, 4, 6, 8]])
    expected = logits(actor, ids)
    merged = actor.merge_and_unload()
    gen = HFGenerator(str(tiny_model), response_length=8)
    gen.load_weights({k: v.clone() for k, v in merged.state_dict().items()}, 1)
    assert gen.lora_config is None and gen.weight_probe()["lora_modules"] == 0
    torch.testing.assert_close(logits(gen.model, ids), expected, rtol=1e-4, atol=1e-4)
