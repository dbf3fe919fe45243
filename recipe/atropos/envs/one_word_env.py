"""OneWordEnv: an offline Atropos environment a small model learns in minutes on CPU.

Task: a seeded stream of everyday questions, each ending in "Answer in exactly one word."; score 1.0 when the reply
is exactly one word (punctuation ignored), else 0.0. SmolLM2-135M-Instruct starts near 0.1 and reaches ~0.9 within
15 GRPO steps (``shared/notes/demo-feasibility.md``): the run teaches the *format*, not knowledge.

Every ``env_advantage_every``-th group also carries token-level ``advantages`` (the group-normalised score on every
completion token, 0 on the prompt), so a training run exercises both of the trainer's advantage paths: the
environment's token-level values and verl's GRPO fallback.

Run: ``python -m recipe.atropos.envs.one_word_env serve --env.tokenizer_name MODEL_DIR --openai.server_type vllm
--openai.base_url http://127.0.0.1:PORT/v1 --openai.model_name MODEL_DIR``.
"""

from __future__ import annotations

import math
import random
import re

from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, ScoredDataGroup
from pydantic import Field

INSTRUCTION = "Answer in exactly one word."
SUBJECTS = (
    "the sky on a clear day",
    "fresh snow",
    "a ripe banana",
    "the planet closest to the sun",
    "the opposite of hot",
    "a baby cat",
    "the largest ocean",
    "the capital of France",
    "frozen water",
    "the animal that says moo",
    "the season after winter",
    "the metal in a wedding ring",
    "the organ that pumps blood",
    "the star at the centre of our solar system",
    "the color of grass",
    "the day after Monday",
    "a young dog",
    "the fruit that keeps the doctor away",
    "the tool used to cut paper",
    "the place where books are lent",
)
TEMPLATES = (
    "What word describes {}?",
    "Name {}.",
    "Which single word best fits {}?",
    "Tell me about {}.",
)
WORD = re.compile(r"[A-Za-z0-9']+")


def one_word_score(reply: str) -> float:
    """1.0 if ``reply`` holds exactly one word (letters, digits, apostrophes; punctuation ignored), else 0.0."""
    return 1.0 if len(WORD.findall(reply)) == 1 else 0.0


def group_normalised(scores: list[float], epsilon: float = 1e-6) -> list[float]:
    """``(s - mean) / (std + epsilon)`` with the population std (0 for a group of equal scores)."""
    mean = sum(scores) / len(scores)
    std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
    return [(s - mean) / (std + epsilon) for s in scores]


def question(rng: random.Random) -> str:
    return f"{rng.choice(TEMPLATES).format(rng.choice(SUBJECTS))} {INSTRUCTION}"


class OneWordEnvConfig(BaseEnvConfig):
    seed: int = Field(0, description="Seed of the question stream (deterministic across runs).")
    max_new_tokens: int = Field(32, description="Most tokens per completion.")
    temperature: float = Field(1.0, description="Sampling temperature (match actor_rollout_ref.rollout.temperature).")
    system_prompt: str | None = Field(
        None, description="System message before each question (None: the chat template's default, if any)."
    )
    env_advantage_every: int = Field(
        2, description="Every k-th group carries token-level `advantages` (0 = never); the rest use trainer GRPO."
    )


class OneWordEnv(BaseEnv):
    name = "one_word"
    env_config_cls = OneWordEnvConfig

    @classmethod
    def config_init(cls) -> tuple[OneWordEnvConfig, list[APIServerConfig]]:
        env_config = OneWordEnvConfig(
            tokenizer_name="set --env.tokenizer_name to the model directory",
            group_size=8,
            use_wandb=False,
            rollout_server_url="http://127.0.0.1:8000",
            total_steps=100000,
            batch_size=-1,  # taken from the trainer's registration (GET /info)
            steps_per_eval=0,
            max_token_length=512,
            max_batches_offpolicy=2,
            wandb_name="one_word",
        )
        server = APIServerConfig(
            server_type="vllm",
            base_url="http://127.0.0.1:8001/v1",
            model_name="policy",
            api_key="x",
            timeout=1200,
            num_requests_for_eval=4,
        )
        return env_config, [server]

    async def setup(self) -> None:
        self.rng = random.Random(self.config.seed)
        self.groups_sent = 0

    async def get_next_item(self) -> str:
        return question(self.rng)

    async def collect_trajectories(self, item: str) -> tuple[ScoredDataGroup | None, list]:
        system = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        messages = [*system, {"role": "user", "content": item}]
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:
            completion = await managed.chat_completion(
                messages=messages,
                n=self.config.group_size,
                max_tokens=self.config.max_new_tokens,
                temperature=self.config.temperature,
            )
            nodes = managed.get_state()["nodes"]
        group = ScoredDataGroup(tokens=[], masks=[], scores=[], inference_logprobs=[], messages=[], overrides=[])
        for choice, node in zip(completion.choices, nodes, strict=True):
            reply = choice.message.content or ""
            group["tokens"].append(list(node.tokens))
            group["masks"].append(list(node.masked_tokens))  # -100 on the prompt
            group["inference_logprobs"].append(list(node.logprobs))  # 1.0 on the prompt
            group["scores"].append(one_word_score(reply))
            group["messages"].append([*messages, {"role": "assistant", "content": reply}])
            group["overrides"].append({})
        self.groups_sent += 1
        every = self.config.env_advantage_every
        if every > 0 and self.groups_sent % every == 0:
            advantages = group_normalised(group["scores"])
            group["advantages"] = [
                [0.0 if m == -100 else a for m in mask] for a, mask in zip(advantages, group["masks"], strict=True)
            ]
        return group, []

    async def evaluate(self, *args: object, **kwargs: object) -> None:
        return None  # the training score is the signal here; held-out evaluation adds minutes on CPU


if __name__ == "__main__":
    OneWordEnv.cli()
