"""OneWordEnv with a teacher: every group it posts carries ``distill_token_ids`` / ``distill_logprobs`` from the
teacher endpoint at ``--env.teacher_base_url`` (:class:`~recipe.atropos.envs.distill.TeacherDistillation`), for the
trainer's on-policy distillation (``distillation.enabled=true``).

Run: ``python -m recipe.atropos.envs.one_word_distill_env serve --env.tokenizer_name MODEL_DIR --env.teacher_base_url
http://127.0.0.1:TEACHER_PORT/v1 --env.teacher_top_k 0 --openai.server_type vllm --openai.base_url
http://127.0.0.1:PORT/v1 --openai.model_name MODEL_DIR``.
"""

from __future__ import annotations

from recipe.atropos.envs.distill import TeacherConfig, TeacherDistillation
from recipe.atropos.envs.one_word_env import OneWordEnv, OneWordEnvConfig


class OneWordDistillEnvConfig(OneWordEnvConfig, TeacherConfig):
    """OneWordEnv's config and the teacher's fields."""


class OneWordDistillEnv(TeacherDistillation, OneWordEnv):
    name = "one_word_distill"
    env_config_cls = OneWordDistillEnvConfig

    @classmethod
    def config_init(cls) -> tuple[OneWordDistillEnvConfig, list]:
        env_config, servers = OneWordEnv.config_init()
        return OneWordDistillEnvConfig(**{**env_config.model_dump(), "wandb_name": cls.name}), servers


if __name__ == "__main__":
    OneWordDistillEnv.cli()
