"""verl on CPU: the modules verl's own processes import (its workers, rollout servers and the driver); of the recipe
they import only the names in :mod:`recipe.atropos.setup.weight_sync`.

Named by :mod:`recipe.atropos.setup.cpu_runtime` in ``VERL_USE_EXTERNAL_MODULES`` (and the checkpoint engine in
``checkpoint_engine.custom_backend_module``), each registers itself in one of verl's registries on import:
``platform`` (the ``cpu`` platform), ``hf_cpu`` (the HF-transformers rollout; ``hf_cpu_lora``: its LoRA loading),
``vllm_cpu`` (verl's vLLM rollout on vLLM's CPU build), ``weight_transfer`` (the ``gloo`` checkpoint engine for a
split rollout).
"""
