"""PkgEnv: a one-server env inside a package (its helpers imported relatively), in the style of the stock Atropos
environments: ``self.server.chat_completion`` generates a group, atroposlib's ``tokenize_for_trainer`` makes tokens
and masks (lists of ids under transformers 4, the environments' interpreter), a one-word reply scores 1.0.

Run: ``PYTHONPATH=tests/envs python -m pkg_env.env serve --env.tokenizer_name MODEL --openai.base_url URL/v1 ...``.
"""

from __future__ import annotations

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer
from env_defaults import env_config, policy_server

from .helpers import one_word_score, question


class PkgEnv(BaseEnv):
    name = "pkg_env"

    @classmethod
    def config_init(cls) -> tuple[BaseEnvConfig, list[APIServerConfig]]:
        config = env_config(BaseEnvConfig, cls.name)
        server = policy_server()
        return config, [server]

    async def setup(self) -> None:
        self.index = 0

    async def get_next_item(self) -> str:
        self.index += 1
        return question(self.index)

    async def collect_trajectories(self, item: str) -> tuple[ScoredDataGroup | None, list]:
        messages = [{"role": "user", "content": item}]
        completion = await self.server.chat_completion(
            messages=messages, n=self.config.group_size, max_tokens=16, temperature=1.0
        )
        group = ScoredDataGroup(tokens=[], masks=[], scores=[])
        for choice in completion.choices:
            reply = choice.message.content or ""
            out = tokenize_for_trainer(self.tokenizer, [*messages, {"role": "assistant", "content": reply}])
            group["tokens"].append(out["tokens"])
            group["masks"].append(out["masks"])
            group["scores"].append(one_word_score(reply))
        return group, []

    async def evaluate(self, *args: object, **kwargs: object) -> None:
        return None


if __name__ == "__main__":
    PkgEnv.cli()
