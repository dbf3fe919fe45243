"""What the small test envs of this folder share: their ``config_init`` defaults (the launcher overrides the API, the
tokenizer, the group size and the endpoint with flags). Imported as a top-level module: a script's folder, or the
entry's ``pythonpath`` (``tests/envs``), is on the env's import path."""

from __future__ import annotations

from typing import Any

from atroposlib.envs.base import APIServerConfig, BaseEnvConfig


def env_config(config_cls: type[BaseEnvConfig], name: str, **overrides: Any) -> Any:
    """``config_cls`` with the defaults every test env starts from, then ``overrides``."""
    defaults: dict[str, Any] = {
        "tokenizer_name": "set --env.tokenizer_name to the model directory",
        "group_size": 4,
        "use_wandb": False,
        "rollout_server_url": "http://127.0.0.1:8000",
        "total_steps": 100000,
        "batch_size": -1,  # taken from the trainer's registration
        "steps_per_eval": 0,
        "max_token_length": 256,
        "wandb_name": name,
    }
    return config_cls(**{**defaults, **overrides})


def policy_server() -> APIServerConfig:
    """The policy server entry (the launcher points it at the trainer's endpoint)."""
    return APIServerConfig(
        server_type="vllm", base_url="http://127.0.0.1:8001/v1", model_name="policy", api_key="x", timeout=600
    )
