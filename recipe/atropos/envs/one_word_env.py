"""OneWordEnv: an offline Atropos environment a small model learns in minutes on CPU.

Task: a seeded stream of everyday questions, each ending in "Answer in exactly one word."; score 1.0 when the reply
is exactly one word (punctuation ignored), else 0.0. A small instruct model learns it in a few GRPO steps (the demo's
measured curve is in docs/atropos.rst): the run teaches the *format*, not knowledge.

Every ``env_advantage_every``-th group also carries token-level ``advantages`` (the group-normalised score on every
completion token, 0 on the prompt), so a training run exercises both of the trainer's advantage paths: the
environment's token-level values and verl's GRPO fallback.

Held-out evaluation (``evaluate``, every ``steps_per_eval`` API steps and once at start-up): a fixed set of questions
on subjects the training stream never asks about, ``eval_samples_per_question`` samples each at the training
temperature; the success rate, the policy version it measured (the endpoint's ``/health``) and the generation-side
counts (groups generated, groups with identical scores, mean score over everything generated) are appended as one
JSON line to ``metrics_file`` (the trainer's metrics file; the launcher sets ``ATROPOS_VERL_METRICS_FILE``).

Run: ``python -m recipe.atropos.envs.one_word_env serve --env.tokenizer_name MODEL_DIR --openai.server_type vllm
--openai.base_url http://127.0.0.1:PORT/v1 --openai.model_name MODEL_DIR``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import re
import time
from pathlib import Path
from typing import Any

import aiohttp
from atroposlib.envs.base import APIServerConfig, BaseEnv, BaseEnvConfig, EvalHandlingEnum, ScoredDataGroup
from pydantic import Field

from recipe.atropos.polling import poll_until_async
from recipe.atropos.records import append_jsonl

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
# Never asked during training: the held-out set pairs these subjects with the training templates.
HELD_OUT_SUBJECTS = (
    "the colour of a lemon",
    "the month after June",
    "the insect that makes honey",
    "the opposite of up",
    "the shape of a ball",
    "the drink cows give",
    "the number after two",
    "the bird that hoots at night",
)
WORD = re.compile(r"[A-Za-z0-9']+")
METRICS_FILE_ENV = "ATROPOS_VERL_METRICS_FILE"
logger = logging.getLogger(__name__)


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


def held_out_questions(n: int) -> list[str]:
    """The fixed evaluation set: ``n`` questions (at most 32) on HELD_OUT_SUBJECTS, the same in every run."""
    pairs = [(t, s) for s in HELD_OUT_SUBJECTS for t in TEMPLATES]
    random.Random(1234).shuffle(pairs)
    return [f"{t.format(s)} {INSTRUCTION}" for t, s in pairs[:n]]


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("held-out evaluation failed", exc_info=task.exception())


class GenerationCounts:
    """What the env generated, before BaseEnv drops any group: groups, identical-score groups, scores."""

    def __init__(self) -> None:
        self.groups = 0
        self.identical = 0
        self.samples = 0
        self.score_sum = 0.0

    def add(self, scores: list[float]) -> None:
        self.groups += 1
        self.identical += int(len(set(scores)) == 1)
        self.samples += len(scores)
        self.score_sum += sum(scores)

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {
            f"{prefix}/groups_generated": float(self.groups),
            f"{prefix}/groups_identical_scores": float(self.identical),
            f"{prefix}/mean_score_generated": self.score_sum / self.samples if self.samples else float("nan"),
        }


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
    eval_questions: int = Field(8, description="Held-out questions per evaluation (at most 32).")
    eval_samples_per_question: int = Field(4, description="Samples per held-out question, at `temperature`.")
    eval_at_start: bool = Field(True, description="Evaluate once before training (when steps_per_eval > 0).")
    metrics_file: str | None = Field(
        default_factory=lambda: os.environ.get(METRICS_FILE_ENV),
        description=f"Append evaluation rows (JSON lines) here; default ${METRICS_FILE_ENV}; None = log only.",
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
            # Held-out evaluation holds the env's training generation back while it runs (atroposlib's STOP_TRAIN; its
            # cancelled requests cost nothing at the trainer's endpoint): the engine samples the held-out set alone, so
            # the score arrives a few seconds after the weights it measures, as verl's own validation would.
            eval_handling=EvalHandlingEnum.STOP_TRAIN,
        )
        server = APIServerConfig(
            server_type="vllm",
            base_url="http://127.0.0.1:8001/v1",
            model_name="policy",
            api_key="x",
            timeout=1200,
            num_requests_for_eval=8,  # every held-out question at once: one policy version per evaluation
        )
        return env_config, [server]

    async def setup(self) -> None:
        self.rng = random.Random(self.config.seed)
        self.groups_sent = 0
        self.counts = GenerationCounts()
        self._start_eval: asyncio.Task | None = None
        self._final_evaluated, self._next_final_check = False, 0.0
        self._last_eval_version: int | None = None
        if self.config.steps_per_eval > 0 and self.config.eval_at_start:
            # In the background: registration (BaseEnv.env_manager registers after setup) does not wait for the
            # endpoint, so the env is admitted and ready while the trainer's workers still start.
            self._start_eval = asyncio.create_task(self.evaluate())
            self._start_eval.add_done_callback(_log_failure)
            self.eval_runner = self._start_eval  # BaseEnv's eval_handling applies to it as to scheduled evaluations

    async def env_step_checks(self) -> None:
        """BaseEnv's checks (an evaluation every ``steps_per_eval`` API steps), plus: with ``steps_per_eval`` 1 an
        evaluation at every new API step (atroposlib 0.4.0's test ``(old % k) > (new % k)`` never holds for k = 1,
        both sides 0, so it would evaluate only at start), and one evaluation of the final policy once the trainer's
        endpoint says training is over (``/health`` ``final``; the trainer waits for it up to
        ``atropos.final_eval_wait_s``)."""
        stepped = self.config.steps_per_eval == 1 and self.curr_step != self.status_dict["current_step"]
        await super().env_step_checks()
        if stepped and (self.eval_runner is None or self.eval_runner.done()):
            self._start_evaluation()
        if self.config.steps_per_eval <= 0 or self._final_evaluated or time.monotonic() < self._next_final_check:
            return
        self._next_final_check = time.monotonic() + 0.5
        if self.eval_runner is not None and not self.eval_runner.done():
            return
        health = await self._health()
        if health and health.get("final"):
            self._final_evaluated = True
            if health.get("policy_version") == self._last_eval_version:
                return  # BaseEnv's own schedule already evaluated the final policy
            self._start_evaluation()

    def _start_evaluation(self) -> None:
        """An evaluation in the background, as BaseEnv starts its scheduled ones (with ``eval_handling`` STOP_TRAIN the
        running groups go back to the backlog and the workers stop until it ends)."""
        if self.config.eval_handling == EvalHandlingEnum.STOP_TRAIN:
            self.backlog.extend(x["item"] for x in self.running_items.values())
            for worker in self.workers:
                worker.cancel()
            self.workers, self.running_items = set(), {}
        self.eval_runner = asyncio.create_task(self.evaluate())
        self.eval_runner.add_done_callback(_log_failure)

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
        self.counts.add(group["scores"])
        self.groups_sent += 1
        every = self.config.env_advantage_every
        if every > 0 and self.groups_sent % every == 0:
            advantages = group_normalised(group["scores"])
            group["advantages"] = [
                [0.0 if m == -100 else a for m in mask] for a, mask in zip(advantages, group["masks"], strict=True)
            ]
        return group, []

    async def _wait_for_endpoint(self, timeout_s: float = 1800.0) -> None:
        """Envs may start before the trainer's endpoint (the launcher overlaps their start-ups): wait for /health."""

        async def answers() -> bool:
            return await self._policy_version(quiet=True) is not None

        # a local GET every 0.2 s: the evaluation at start-up begins as soon as the endpoint is up
        if not await poll_until_async(answers, timeout_s, 0.2):
            raise TimeoutError(f"the inference endpoint did not answer /health within {timeout_s} s")

    async def _policy_version(self, quiet: bool = False, wait_unpaused_s: float = 0.0) -> int | None:
        """The version of the weights the trainer's endpoint serves now (its ``/health``), None if unknown.

        ``wait_unpaused_s`` > 0: first wait (up to that long) while the endpoint is paused for a weight update, so
        the version read is the one the next requests will be served by.
        """
        health: dict[str, Any] | None = None

        async def settled() -> bool:  # not paused, or no version to read
            nonlocal health
            health = await self._health(quiet)
            return health is None or "policy_version" not in health or not health.get("paused")

        await poll_until_async(settled, wait_unpaused_s, 0.2)
        if health is None or "policy_version" not in health:
            return None
        return int(health["policy_version"])

    async def _health(self, quiet: bool = False) -> dict[str, Any] | None:
        """The trainer's endpoint ``GET /health`` (policy version, paused, final), None if it does not answer."""
        base = self.server.servers[0].config.base_url.rstrip("/").removesuffix("/v1")
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
                async with session.get(f"{base}/health") as resp:
                    return dict(await resp.json())
        except (TimeoutError, aiohttp.ClientError, ValueError, TypeError) as exc:
            if not quiet:
                logger.warning("GET %s/health failed: %r", base, exc)
            return None

    async def _sample_scores(self, item: str) -> list[float]:
        system = [{"role": "system", "content": self.config.system_prompt}] if self.config.system_prompt else []
        async with self.server.managed_server(tokenizer=self.tokenizer) as managed:  # the endpoint speaks tokens
            completion = await managed.chat_completion(
                messages=[*system, {"role": "user", "content": item}],
                n=self.config.eval_samples_per_question,
                max_tokens=self.config.max_new_tokens,
                temperature=self.config.temperature,
            )
        return [one_word_score(c.message.content or "") for c in completion.choices]

    async def evaluate(self, *args: object, **kwargs: object) -> dict[str, Any]:
        """Held-out success rate at the training temperature, with the generation-side counts so far."""
        await self._wait_for_endpoint()
        start = time.time()
        # An evaluation triggered while the trainer updates waits for the new weights: it measures that version.
        version = await self._policy_version(wait_unpaused_s=600.0)
        self._last_eval_version = version
        per_question = await asyncio.gather(
            *[self._sample_scores(q) for q in held_out_questions(self.config.eval_questions)]
        )
        scores = [s for qs in per_question for s in qs]
        prefix = f"eval/{self.config.wandb_name or self.name}"
        row: dict[str, Any] = {
            "step": version,
            "source": f"env:{self.config.wandb_name or self.name}",
            "time": time.time(),  # when the evaluation ended (Unix seconds)
            f"{prefix}/held_out_success": sum(scores) / len(scores),
            f"{prefix}/held_out_samples": float(len(scores)),
            f"{prefix}/seconds": time.time() - start,
            f"{prefix}/policy_version_after": await self._policy_version(),
        }
        row.update(self.counts.as_metrics(f"env/{self.config.wandb_name or self.name}"))
        logger.info("held-out evaluation: %s", row)
        if self.config.metrics_file:
            append_jsonl(Path(self.config.metrics_file), [row])
        return row


if __name__ == "__main__":
    OneWordEnv.cli()
