"""Start-up checks for the GPU path (verl's CUDA runtime: FSDP + vLLM), run before Ray starts.

Nothing here is needed on the CPU runtime, which switches flash-attention off. On a GPU, verl loads the model with
``attn_implementation=flash_attention_2`` unless ``actor_rollout_ref.model.override_config.attn_implementation``
says otherwise (``verl/workers/config/model.py``), and ``use_remove_padding=true`` unpads with flash-attn's
``bert_padding`` helpers (``verl/utils/attention_utils.py``). flash-attn is a source build against the installed
torch, so the ``gpu`` extra cannot carry it: a run that needs it and cannot import it stops here with the command.
"""

from __future__ import annotations

import importlib.util

from omegaconf import DictConfig

FLASH_ATTN_INSTALL = "pip install flash-attn==2.8.3 --no-build-isolation"


def needs_flash_attn(config: DictConfig) -> bool:
    """True when verl will import flash-attn for this config (the actor, reference and rollout share one model)."""
    model = config.actor_rollout_ref.model
    attn = (model.get("override_config") or {}).get("attn_implementation", "flash_attention_2")
    return bool(model.get("use_remove_padding", False)) or attn == "flash_attention_2"


def flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def check_gpu_runtime(config: DictConfig) -> None:
    """Raise one clear error when the GPU config needs a package that is not installed."""
    if needs_flash_attn(config) and not flash_attn_importable():
        raise RuntimeError(
            "this GPU config needs flash-attn (actor_rollout_ref.model.use_remove_padding=true or attn_implementation="
            f"flash_attention_2) and it is not installed: run `{FLASH_ATTN_INSTALL}` after `pip install -e '.[gpu]'`, "
            "or set actor_rollout_ref.model.use_remove_padding=false "
            "+actor_rollout_ref.model.override_config.attn_implementation=sdpa"
        )
