"""TwoServersEnv: an env whose ``config_init`` declares two servers, the policy (index 0) and a judge (index 1), as
judge environments do. atroposlib refuses ``--openai.*`` flags for it (exit 2); the launcher passes ``--config`` with
an ``openai:`` list whose policy entry is the trainer's endpoint.

It generates with the policy server only (``self.server.servers[policy_server]``: ``self.server.chat_completion``
would spread requests over both servers), tokenizes with atroposlib's ``tokenize_for_trainer`` and scores a one-word
reply 1.0; the judge is declared, never called. atroposlib builds every server of the list with the client of
``servers[0]`` (vllm here), which loads its tokenizer at start, so a run names one the judge can load, e.g. the
launcher entry's ``servers: [{}, {tokenizer_name: MODEL_DIR}]``.
"""

from __future__ import annotations

import re

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer
from env_defaults import env_config, policy_server
from pydantic import Field

WORD = re.compile(r"[A-Za-z0-9']+")
QUESTIONS = ("Name a colour.", "Name a fruit.", "Name an animal.", "Name a country.", "Name a metal.")


class TwoServersEnvConfig(BaseEnvConfig):
    policy_server: int = Field(0, description="Index of the server that generates (the launcher's policy_server).")
    max_new_tokens: int = Field(16, description="Most tokens per completion.")


class TwoServersEnv(BaseEnv):
    name = "two_servers"
    env_config_cls = TwoServersEnvConfig

    @classmethod
    def config_init(cls) -> tuple[TwoServersEnvConfig, list[APIServerConfig]]:
        config = env_config(TwoServersEnvConfig, cls.name)
        policy = policy_server()
        judge = APIServerConfig(
            server_type="vllm",
            base_url="http://127.0.0.1:9/v1",
            model_name="judge",
            api_key="judge-key",
            timeout=60,
            health_check=False,
        )
        return config, [policy, judge]

    async def setup(self) -> None:
        self.index = 0

    async def get_next_item(self) -> str:
        self.index += 1
        return f"{QUESTIONS[self.index % len(QUESTIONS)]} Answer in exactly one word."

    async def collect_trajectories(self, item: str) -> tuple[ScoredDataGroup | None, list]:
        messages = [{"role": "user", "content": item}]
        policy = self.server.servers[self.config.policy_server]
        completion = await policy.chat_completion(
            messages=messages, n=self.config.group_size, max_tokens=self.config.max_new_tokens, temperature=1.0
        )
        group = ScoredDataGroup(tokens=[], masks=[], scores=[])
        for choice in completion.choices:
            reply = choice.message.content or ""
            out = tokenize_for_trainer(self.tokenizer, [*messages, {"role": "assistant", "content": reply}])
            group["tokens"].append(out["tokens"])
            group["masks"].append(out["masks"])
            group["scores"].append(1.0 if len(WORD.findall(reply)) == 1 else 0.0)
        return group, []

    async def evaluate(self, *args: object, **kwargs: object) -> None:
        return None


if __name__ == "__main__":
    TwoServersEnv.cli()
