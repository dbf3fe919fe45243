"""Small environments that reproduce what goes wrong with stock Atropos environments (docs/atropos.rst, *Using stock
Atropos environments*), each a :class:`OneWordEnv` that generates through the trainer's endpoint as usual, then:

- ``equal_scores``: scores every sequence 0.0, so atroposlib's ``BaseEnv`` drops every group itself
  (``ensure_scores_are_not_same``, true by default): completions are served, the API never hears of a group;
- ``chat``: generates with ``self.server.chat_completion`` (the endpoint's ``/v1/chat/completions``) as most stock
  envs do; run with ``--openai.model_name`` set to another model (a stock env's own default, as a user who copies its
  config would), every call gets 404 from the endpoint, atroposlib retries, then ``BaseEnv`` logs the error and goes
  on with the next item;
- ``none``: the bundled env unchanged (a wrong group size is reproduced with ``--env.group_size 3`` on a batch of 8).

Run as any env: ``python -m tests.e2e.symptom_envs serve --env.symptom equal_scores ...``.
"""

from __future__ import annotations

from atroposlib.envs.base import APIServerConfig, ScoredDataGroup
from pydantic import Field

from recipe.atropos.envs.one_word_env import OneWordEnv, OneWordEnvConfig

SYMPTOMS = ("equal_scores", "chat", "none")


class SymptomEnvConfig(OneWordEnvConfig):
    symptom: str = Field("equal_scores", description=f"What goes wrong: one of {', '.join(SYMPTOMS)}.")


class SymptomEnv(OneWordEnv):
    name = "symptom"
    env_config_cls = SymptomEnvConfig

    @classmethod
    def config_init(cls) -> tuple[SymptomEnvConfig, list[APIServerConfig]]:
        env_config, servers = OneWordEnv.config_init()  # atroposlib's CLI takes its flags from this config's class
        return SymptomEnvConfig(**env_config.model_dump()), servers

    async def collect_trajectories(self, item: str) -> tuple[ScoredDataGroup | None, list]:
        if self.config.symptom not in SYMPTOMS:
            raise ValueError(f"--env.symptom {self.config.symptom!r}: use one of {SYMPTOMS}")
        if self.config.symptom == "chat":
            messages = [{"role": "user", "content": item}]
            out = await self.server.chat_completion(messages=messages, n=self.config.group_size, max_tokens=4)
            replies = [choice.message.content or "" for choice in out.choices]
            prompt = self.tokenizer.encode(item)
            tokens = [prompt + self.tokenizer.encode(reply) for reply in replies]
            masks = [[-100] * len(prompt) + t[len(prompt) :] for t in tokens]
            return {"tokens": tokens, "masks": masks, "scores": [float(i % 2) for i in range(len(tokens))]}, []
        group, backlog = await super().collect_trajectories(item)
        if self.config.symptom == "equal_scores":
            group["scores"] = [0.0] * len(group["scores"])
        return group, backlog


if __name__ == "__main__":
    SymptomEnv.cli()
