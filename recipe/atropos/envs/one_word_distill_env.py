"""OneWordEnv with a teacher: every group it posts carries ``distill_token_ids`` / ``distill_logprobs`` from the
teacher endpoint at ``--env.teacher_base_url`` (:class:`~recipe.atropos.envs.distill.TeacherDistillation`), for the
trainer's on-policy distillation (``distillation.enabled=true``).

Run: ``python -m recipe.atropos.envs.one_word_distill_env serve --env.tokenizer_name MODEL_DIR --env.teacher_base_url
http://127.0.0.1:TEACHER_PORT/v1 --env.teacher_top_k 0 --openai.server_type vllm --openai.base_url
http://127.0.0.1:PORT/v1 --openai.model_name MODEL_DIR``.
"""

from __future__ import annotations

import asyncio

from atroposlib.envs.base import EvalHandlingEnum

from recipe.atropos.envs.distill import TeacherConfig, TeacherDistillation
from recipe.atropos.envs.one_word_env import OneWordEnv, OneWordEnvConfig, _log_failure


class OneWordDistillEnvConfig(OneWordEnvConfig, TeacherConfig):
    """OneWordEnv's config and the teacher's fields."""


class OneWordDistillEnv(TeacherDistillation, OneWordEnv):
    name = "one_word_distill"
    env_config_cls = OneWordDistillEnvConfig

    @classmethod
    def config_init(cls) -> tuple[OneWordDistillEnvConfig, list]:
        env_config, servers = OneWordEnv.config_init()
        return OneWordDistillEnvConfig(**{**env_config.model_dump(), "wandb_name": cls.name}), servers

    async def env_step_checks(self) -> None:
        """OneWordEnv's checks, plus with ``steps_per_eval`` 1 an evaluation at every new API step: atroposlib 0.4.0's
        test ``(old % k) > (new % k)`` never holds for k = 1 (both sides 0), so it would evaluate only at start and
        after the last step (``make demo-distill`` evaluates after every step)."""
        stepped = self.config.steps_per_eval == 1 and self.curr_step != self.status_dict["current_step"]
        await super().env_step_checks()
        if stepped and (self.eval_runner is None or self.eval_runner.done()):
            if self.config.eval_handling == EvalHandlingEnum.STOP_TRAIN:  # as BaseEnv does for its scheduled evals
                self.backlog.extend(x["item"] for x in self.running_items.values())
                for worker in self.workers:
                    worker.cancel()
                self.workers, self.running_items = set(), {}
            self.eval_runner = asyncio.create_task(self.evaluate())
            self.eval_runner.add_done_callback(_log_failure)


if __name__ == "__main__":
    OneWordDistillEnv.cli()
