"""What tests build their inputs from: the shipped configs' paths and a scored group as an environment posts it.

Pure data, no processes (those are in :mod:`tests.helpers`, the fixtures in ``tests/conftest.py``), so every tier may
import it."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipe" / "atropos" / "config"
TINY_CONFIG = CONFIG_DIR / "atropos_grpo_tiny.yaml"  # the tiny model's config, which every process test runs

X = -100  # a mask value: the position is not trained (the prompt)


def group(n: int = 2, first: int = 10, **extra: object) -> dict:
    """A valid group as atroposlib's BaseEnv posts it: ``n`` sequences, prompt ``[first, first+1]`` masked, then 2
    completion tokens ``100+i, 200+i``; scores ``0, 1, ...``; ``extra`` replaces fields."""
    tokens = [[first, first + 1, 100 + i, 200 + i] for i in range(n)]
    body = {
        "tokens": tokens,
        "masks": [[X, X, t[2], t[3]] for t in tokens],
        "scores": [float(i) for i in range(n)],
        "advantages": None,
        "ref_logprobs": None,
        "messages": None,
        "inference_logprobs": [[1.0, 1.0, -0.5, -0.25] for _ in tokens],
        "generation_params": None,
        "group_overrides": {},
        "overrides": [{} for _ in tokens],
        "images": None,
        "env_id": None,
    }
    body.update(extra)
    return body


def distillation_run_config(*overrides: str):  # noqa: ANN201 (DictConfig; omegaconf imported on use)
    """The tiny config as main_atropos runs it on CPU (the CPU runtime's settings), ``distillation.enabled=true``,
    with ``overrides``; no model needed (the path does not exist)."""
    from omegaconf import OmegaConf

    from recipe.atropos.launcher.config import load_config
    from recipe.atropos.setup.cpu_runtime import CPU_SETTINGS

    model = "actor_rollout_ref.model.path=/nonexistent/tiny"
    config = load_config(TINY_CONFIG, [model, "distillation.enabled=true", *overrides])
    for key, value in CPU_SETTINGS:
        OmegaConf.update(config, key, value, force_add=True)
    return config
