"""Conformance with the stock Atropos catalog (`make test-stock`, marker `stock`, left out of `make test`): stock
environment files, unmodified, trained through the launcher with the demo model (SmolLM2-135M) in one run:

- ``blackjack_env_no_thinking.py`` (``server.chat_completion`` + atroposlib's ``tokenize_for_trainer``) trains >= 3
  steps on its own groups with the shipped config (recipe/atropos/config/atropos_grpo_stock_cpu.yaml), every trained
  sequence's lag matched or bounded, never assumed;
- ``reasoning_gym_environment.py`` (``server.managed_server``, the PyPI package ``reasoning-gym`` installed into the
  environments' interpreter by ``make test-stock``) trains on a task where the model's scores vary, or the launcher's
  closing lines name why it cannot (it generates, but drops its groups itself: scores all equal).

The env files come from ``$ATROPOS_ENVS_DIR`` (an Atropos checkout's ``environments/``: found by file name) or from
``../shared/stock-envs`` beside the project; without either the tier skips, naming what is missing. The per-step table
(score, unmatched lag share, step time) is printed for the record (``-s``)."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from recipe.atropos.launcher.env_python import PROJECT_ROOT, default_env_python
from recipe.atropos.metrics_file import read_metrics, trainer_rows
from recipe.atropos.rundir import RunDir
from tests.factories import CONFIG_DIR
from tests.helpers import Launch, launcher_factory, no_processes_left

pytestmark = [pytest.mark.stock, pytest.mark.timeout(2400)]

STOCK_CONFIG = CONFIG_DIR / "atropos_grpo_stock_cpu.yaml"
DEMO_MODEL = "embedded:SmolLM2-135M-Instruct"
STEPS = 3
SHARED_STOCK_ENVS = PROJECT_ROOT.parent / "shared" / "stock-envs"


def stock_env(file_name: str) -> Path:
    """The stock env file: under ``$ATROPOS_ENVS_DIR`` (searched by name), else in ``../shared/stock-envs``; skips
    the test naming both places when neither has it."""
    envs_dir = os.environ.get("ATROPOS_ENVS_DIR")
    if envs_dir:
        found = sorted(Path(envs_dir).expanduser().rglob(file_name))
        if found:
            return found[0]
    if (SHARED_STOCK_ENVS / file_name).exists():
        return SHARED_STOCK_ENVS / file_name
    pytest.skip(
        f"{file_name} not found: set ATROPOS_ENVS_DIR=<atropos checkout>/environments or add {SHARED_STOCK_ENVS}"
    )


def env_python_imports(module: str) -> bool:
    python, _ = default_env_python()
    return subprocess.run([python, "-c", f"import {module}"], capture_output=True, timeout=120).returncode == 0


@pytest.fixture(scope="module")
def stock_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Launch, list[dict]]]:
    blackjack = stock_env("blackjack_env_no_thinking.py")
    reasoning = stock_env("reasoning_gym_environment.py")
    if not env_python_imports("reasoning_gym"):
        pytest.skip("reasoning-gym is not in the environments' interpreter: `make test-stock` installs it")
    envs = (
        "atropos.launcher.envs=["
        f"{{name:blackjack,script:'{blackjack}',group_size:4,"
        "args:{env.max_episode_turns:1,env.max_token_length:2048,env.eval_episodes:8,env.steps_per_eval:1000,"
        # groups of 4 whose scores are all -1 (no valid tool call) are common at first: kept (zero advantage), so a
        # step never waits minutes for a mixed group; the demo keeps atroposlib's default filter
        "env.ensure_scores_are_not_same:false}},"
        # its own defaults ask 8k tokens per answer and evaluate 20 tasks x 5 at start: a budget the CPU can give;
        # min_batch_allocation 0.1 (its default) would hold every batch back until it posts a group: no minimum
        f"{{name:reasoning_gym,script:'{reasoning}',group_size:4,args:{{env.max_token_length:1024,"
        "env.num_eval_samples_per_task:1,env.steps_per_eval:1000,env.min_batch_allocation:0.0}}]"
    )
    with no_processes_left(), launcher_factory(DEMO_MODEL, tmp_path_factory.mktemp("stock")) as launch:
        run = launch(
            envs,
            f"trainer.total_training_steps={STEPS}",
            "trainer.save_freq=-1",
            # half the shipped config's work per step (groups of 4, not 8): the tier checks conformance, the demo
            # (`make demo-stock`) the learning
            "data.train_batch_size=8",
            # reasoning_gym may send nothing: a step waits at most this long for it, then trains blackjack's groups
            "atropos.mixture_wait_s=30",
            config=STOCK_CONFIG,
        )
        assert run.wait_exit(2200) == 0, run.log_text()[-8000:]
        yield run, trainer_rows(read_metrics(RunDir(run.run_dir).metrics_file))


def test_blackjack_trains_three_steps_on_its_own_groups(stock_run: tuple[Launch, list[dict]]) -> None:
    run, rows = stock_run
    print("\nstep | blackjack seqs | mean score | unmatched lag share | lag max | step s")
    for r in rows:
        print(
            f"{r['step']:>4} | {r.get('atropos/env/blackjack/sequences', 0):>14.0f} | "
            f"{r.get('atropos/env/blackjack/mean_score', float('nan')):>10.3f} | "
            f"{r.get('atropos/lag/unmatched_fraction', float('nan')):>19.3f} | "
            f"{r.get('atropos/policy_lag_max', float('nan')):>7.0f} | {r.get('timing_s/step', float('nan')):>6.1f}"
        )
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for r in rows:
        assert r["atropos/env/blackjack/sequences"] >= 4, r  # at least one of its groups in every step
        assert -1.0 <= r["atropos/env/blackjack/mean_score"] <= 1.0
        assert r["atropos/policy_lag_unknown"] == 0, r  # every lag matched or bounded, none assumed
        assert 0.0 <= r["atropos/lag/unmatched_fraction"] <= 1.0
        assert r["atropos/rows_without_rollout_logprobs"] > 0  # blackjack sends no inference_logprobs
    console = run.log_text()
    assert not re.search(r"env blackjack: .*calls to /v1/chat/completions failed", console), console[-6000:]


def test_reasoning_gym_trains_or_the_console_names_why(stock_run: tuple[Launch, list[dict]]) -> None:
    """It trains where the model's scores vary; else the launcher's closing lines say what it did instead (its own
    equal-score filter returns None at debug level, so only the counts can tell: completions served, nothing posted)."""
    run, rows = stock_run
    trained = sum(r.get("atropos/env/reasoning_gym/sequences", 0) for r in rows)
    (line,) = [x for x in RunDir(run.run_dir).summary.read_text().splitlines() if x.startswith("env reasoning_gym:")]
    print(f"\n{line}")
    assert trained > 0 or line.endswith("see its log"), run.log_text()[-8000:]
