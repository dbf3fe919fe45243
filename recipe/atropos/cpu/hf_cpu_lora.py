"""LoRA in the ``hf_cpu`` rollout: loading verl's weight pushes into a peft-wrapped HF model, and fingerprints of the
weights the rollout samples with.

verl's colocated ("naive") sync pushes, with ``lora_rank > 0``: once the frozen base weights (``base_sync_done=False``;
names of targeted layers end in ``.base_layer.weight``) when ``rollout.load_format`` is ``dummy``, then on every push
the adapter tensors only (``base_sync_done=True``; ``get_peft_model_state_dict`` names, fp32). With
``actor_rollout_ref.model.lora.merge=true`` it pushes merged full weights instead, which load like a full fine-tune's.
Invariants: a push's names all match the model's (else ``KeyError``); an adapter push is complete (a partial one would
mix two policies); the LoRA config never changes mid-run.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)


def with_base_layer(name: str) -> str:
    """``a.q_proj.weight`` → ``a.q_proj.base_layer.weight`` (peft's name of a wrapped layer's own parameter)."""
    head, _, leaf = name.rpartition(".")
    return f"{head}.base_layer.{leaf}" if head else name


def lora_shape(peft_config: dict[str, Any]) -> tuple:
    """What must stay equal between two pushes' peft configs: rank, alpha, targets, rsLoRA."""
    targets = peft_config.get("target_modules")
    targets = tuple(sorted(targets)) if isinstance(targets, list | set | tuple) else targets
    return (peft_config.get("r"), peft_config.get("lora_alpha"), targets, peft_config.get("use_rslora"))


def lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """peft LoRA layers with the ``default`` adapter, by HF module name (the ``base_model.model.`` prefix cut)."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in getattr(module, "lora_A", {}):
            layers[name.removeprefix("base_model.model.")] = module
    return layers


def lora_delta(layer: torch.nn.Module, adapter: str = "default") -> torch.Tensor:
    """A linear LoRA layer's weight delta ``B·A·scaling`` [out, in] in float64 (what the forward adds to W·x)."""
    a = layer.lora_A[adapter].weight.detach().to(torch.float64)
    b = layer.lora_B[adapter].weight.detach().to(torch.float64)
    delta = (b @ a) * float(layer.scaling[adapter])
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def load_full(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Full or base weights into the HF ``model``; a name verl gave ``.base_layer`` (its LoRA wrapper naming) or not
    is matched to the model's own. A tied ``lm_head`` may be absent; other absent weights are logged."""
    own = set(model.state_dict().keys())
    renamed: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    for name, tensor in state_dict.items():
        for candidate in (name, name.replace(".base_layer.", "."), with_base_layer(name)):
            if candidate in own:
                renamed[candidate] = tensor
                break
        else:
            unexpected.append(name)
    if unexpected:
        raise KeyError(f"hf_cpu rollout received weights it does not have: {unexpected[:5]}")
    missing, _ = model.load_state_dict(renamed, strict=False)
    missing = [m for m in missing if "lora_" not in m]
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if set(missing) - tied:
        logger.warning("hf_cpu rollout: %d parameters not in the update, e.g. %s", len(missing), missing[:3])


def wrap_with_lora(model: torch.nn.Module, peft_config: dict[str, Any]) -> torch.nn.Module:
    """``model`` wrapped with verl's LoRA config (``LoraConfig.to_dict()``), for inference."""
    from peft import get_peft_model
    from peft.config import PeftConfig

    config = PeftConfig.from_peft_type(**{**peft_config, "inference_mode": True})
    wrapped = get_peft_model(model, config)
    wrapped.eval()
    logger.info(
        "hf_cpu rollout: LoRA r=%s alpha=%s on %d modules", config.r, config.lora_alpha, len(lora_layers(wrapped))
    )
    return wrapped


def load_adapter(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """A complete adapter (every ``lora_*`` tensor of ``model``) into the peft-wrapped ``model``."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, state_dict)
    if result.unexpected_keys:
        raise KeyError(f"hf_cpu rollout received adapter weights it does not have: {result.unexpected_keys[:5]}")
    not_sent = [k for k in result.missing_keys if "lora_" in k]
    if not_sent:  # a partial adapter would mix two policies
        raise KeyError(f"hf_cpu rollout: the adapter update lacks {len(not_sent)} tensors, e.g. {not_sent[:3]}")


@torch.no_grad()
def module_fingerprint(model: torch.nn.Module, hf_model: torch.nn.Module) -> tuple[str, dict[str, float]]:
    """The probe module (the first LoRA-targeted linear layer, else the first decoder linear layer) and, in float64:
    ``lora_modules``, ``lora_delta_norm`` (Frobenius norm of every module's B·A·scaling together: 0 while the adapter
    is untrained), ``module_delta_checksum`` and ``module_weight_checksum`` (Σ of the probe module's base + delta)."""
    layers = lora_layers(model) if model is not hf_model else {}
    name = next(iter(layers), None) or next(
        n for n, m in hf_model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in f".{n}"
    )
    module = hf_model.get_submodule(name)
    base = (module.base_layer if name in layers else module).weight.detach().to(torch.float64)
    deltas = {n: lora_delta(m) for n, m in layers.items()}
    delta = deltas.get(name, torch.zeros_like(base))
    return name, {
        "lora_modules": float(len(layers)),
        "lora_delta_norm": float(sum((d**2).sum().item() for d in deltas.values()) ** 0.5),
        "module_delta_checksum": float(delta.sum()),
        "module_weight_checksum": float((base + delta).sum()),
    }
