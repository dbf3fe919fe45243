"""PatternsEnv: the ways stock Atropos environments call the model and tokenise, one per ``--env.pattern``.

- ``chat_tokenize``: ``self.server.chat_completion`` (``/v1/chat/completions``), then atroposlib's
  ``tokenize_for_trainer`` over the chat (most of the Atropos catalog, e.g. blackjack);
- ``completion``: ``self.server.completion`` (``/v1/completions``) on the chat template's text, then the env encodes
  prompt and reply itself (tokens = prompt + reply, masks -100 on the prompt);
- ``apply_template``: ``chat_completion``, then ``tokenizer.apply_chat_template(chat, tokenize=True)`` by hand (the
  stock envs that tokenise with the template directly: a list of ids under transformers 4, the envs' interpreter);
- ``managed``: ``self.server.managed_server`` (``/generate``: tokens and log-probs exactly as sampled).

Each asks a short question and scores a one-word reply 1.0, else 0.0; a two-turn episode (``--env.turns 2``) asks a
second question after the first reply, so one sequence carries two trained spans.
"""

from __future__ import annotations

import asyncio
import re

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from atroposlib.utils.tokenize_for_trainer import tokenize_for_trainer
from env_defaults import env_config, policy_server
from pydantic import Field

WORD = re.compile(r"[A-Za-z0-9']+")
QUESTIONS = ("Name a colour.", "Name a fruit.", "Name an animal.", "Name a country.", "Name a metal.")
PATTERNS = ("chat_tokenize", "completion", "apply_template", "managed")


class PatternsEnvConfig(BaseEnvConfig):
    pattern: str = Field("chat_tokenize", description=f"How the env generates and tokenises: one of {PATTERNS}.")
    turns: int = Field(1, description="Questions per episode (chat patterns): each reply is one trained span.")
    max_new_tokens: int = Field(8, description="Most tokens per completion.")


def score(reply: str) -> float:
    return 1.0 if len(WORD.findall(reply)) == 1 else 0.0


class PatternsEnv(BaseEnv):
    name = "patterns"
    env_config_cls = PatternsEnvConfig

    @classmethod
    def config_init(cls) -> tuple[PatternsEnvConfig, list[APIServerConfig]]:
        # a tiny model's replies often score alike: keep them
        config = env_config(PatternsEnvConfig, cls.name, ensure_scores_are_not_same=False)
        server = policy_server()
        return config, [server]

    async def setup(self) -> None:
        if self.config.pattern not in PATTERNS:
            raise ValueError(f"--env.pattern {self.config.pattern!r}: use one of {PATTERNS}")
        self.index = 0

    async def get_next_item(self) -> int:
        self.index += 1
        return self.index

    async def collect_trajectories(self, item: int) -> tuple[ScoredDataGroup | None, list]:
        group = ScoredDataGroup(tokens=[], masks=[], scores=[])
        episodes = await self._episodes(item)
        for tokens, masks, reply in episodes:
            group["tokens"].append(tokens)
            group["masks"].append(masks)
            group["scores"].append(score(reply))
        return group, []

    async def _episodes(self, item: int) -> list[tuple[list[int], list[int], str]]:
        n, max_tokens = self.config.group_size, self.config.max_new_tokens
        first = [{"role": "user", "content": f"{QUESTIONS[item % len(QUESTIONS)]} Answer in one word."}]
        if self.config.pattern == "managed":
            async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
                out = await managed.chat_completion(messages=first, n=n, max_tokens=max_tokens, temperature=1.0)
                nodes = managed.get_state()["nodes"]
            return [
                (list(node.tokens), list(node.masked_tokens), choice.message.content or "")
                for choice, node in zip(out.choices, nodes, strict=True)
            ]
        if self.config.pattern == "completion":
            prompt = self.tokenizer.apply_chat_template(first, tokenize=False, add_generation_prompt=True)
            out = await self.server.completion(prompt=prompt, n=n, max_tokens=max_tokens, temperature=1.0)
            prompt_ids = self.tokenizer.encode(prompt, add_special_tokens=False)
            episodes = []
            for choice in out.choices:
                reply_ids = self.tokenizer.encode(choice.text, add_special_tokens=False)
                episodes.append(([*prompt_ids, *reply_ids], [-100] * len(prompt_ids) + reply_ids, choice.text))
            return episodes
        return list(await asyncio.gather(*[self._chat_episode(first, max_tokens) for _ in range(n)]))

    async def _chat_episode(self, chat: list[dict], max_tokens: int) -> tuple[list[int], list[int], str]:
        chat = list(chat)
        reply = ""
        for turn in range(self.config.turns):
            if turn:
                chat.append({"role": "user", "content": f"And {QUESTIONS[(turn + 2) % len(QUESTIONS)].lower()}"})
            out = await self.server.chat_completion(messages=chat, n=1, max_tokens=max_tokens, temperature=1.0)
            reply = (out.choices[0].message.content or "").strip()
            chat.append({"role": "assistant", "content": reply})
        if self.config.pattern == "chat_tokenize":
            out = tokenize_for_trainer(self.tokenizer, chat, train_on_all_assistant_turns=True)
            return out["tokens"], out["masks"], reply
        # apply_template: the prompt part masked, the last reply trained (the template's ids, as a list)
        tokens = list(self.tokenizer.apply_chat_template(chat, tokenize=True))
        prefix = list(self.tokenizer.apply_chat_template(chat[:-1], tokenize=True, add_generation_prompt=True))
        return tokens, [-100] * len(prefix) + tokens[len(prefix) :], reply

    async def evaluate(self, *args: object, **kwargs: object) -> None:
        return None


if __name__ == "__main__":
    PatternsEnv.cli()
