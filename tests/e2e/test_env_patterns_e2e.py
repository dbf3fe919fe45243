"""Every way a stock Atropos environment calls the model, trained in one launcher run (tiny model, 2 steps): six small
envs of our own (tests/envs/) run in the environments' interpreter (.venv-envs, transformers 4), each reproducing one
pattern of the Atropos catalog:

- ``chat2``: ``server.chat_completion`` for a two-turn episode, then atroposlib's ``tokenize_for_trainer`` (two trained
  spans per sequence, re-tokenised);
- ``completion``: ``server.completion`` (``/v1/completions``) on the template's text, then the env's own encoding;
- ``template``: ``chat_completion``, then ``apply_chat_template(tokenize=True)`` by hand;
- ``managed``: ``server.managed_server`` (``/generate``: tokens and log-probs as sampled);
- ``two_servers``: ``config_init`` declares a policy and a judge server (the launcher passes an ``openai:`` list);
- ``pkg``: a module in a package with relative imports, reached through the entry's ``pythonpath``.

The env mixture (equal weights, a batch of 6 groups of 4) trains one group of each env in every step; every trained
sequence's policy lag is matched to a completion the endpoint served (by tokens, or by text for the re-tokenised ones),
none assumed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from recipe.atropos.metrics_file import read_metrics
from recipe.atropos.rundir import RunDir
from tests.helpers import Launch, launcher_factory, no_processes_left

pytestmark = pytest.mark.timeout(900)

STEPS = 2
PATTERNS = "tests/envs/patterns_env.py"


def envs(model: Path) -> str:
    """``atropos.launcher.envs=[...]`` of the six envs (Hydra's override syntax)."""
    pattern = "{{name:{name},script:" + PATTERNS + ",group_size:4,args:{{env.pattern:{pattern}{extra}}}}}"
    entries = [
        pattern.format(name="chat2", pattern="chat_tokenize", extra=",env.turns:2"),
        pattern.format(name="completion", pattern="completion", extra=""),
        pattern.format(name="template", pattern="apply_template", extra=""),
        pattern.format(name="managed", pattern="managed", extra=""),
        # the judge (never called) loads a tokenizer at start, as atroposlib's vllm client does for every server
        "{name:two_servers,script:tests/envs/two_servers_env.py,group_size:4,"
        f"servers:[{{}},{{tokenizer_name:'{model}'}}],args:{{env.ensure_scores_are_not_same:false}}}}",
        "{name:pkg,module:pkg_env.env,pythonpath:[tests/envs],group_size:4,"
        "args:{env.ensure_scores_are_not_same:false}}",
    ]
    return f"atropos.launcher.envs=[{','.join(entries)}]"


NAMES = ("chat2", "completion", "template", "managed", "two_servers", "pkg")


@pytest.fixture(scope="module")
def patterns_run(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[tuple[Launch, list[dict]]]:
    with no_processes_left(), launcher_factory(tiny_model, tmp_path_factory.mktemp("patterns")) as launch:
        run = launch(
            envs(tiny_model),
            f"trainer.total_training_steps={STEPS}",
            "trainer.save_freq=-1",
            "data.train_batch_size=24",
            "data.max_response_length=48",  # the two-turn episode: reply, the second question, reply
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=12",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=12",
        )
        assert run.wait_exit(840) == 0, run.log_text()[-8000:]
        yield run, read_metrics(RunDir(run.run_dir).metrics_file)


def test_every_pattern_trains_in_every_step(patterns_run: tuple[Launch, list[dict]]) -> None:
    _, rows = patterns_run
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for row in rows:
        assert row["atropos/sequences"] == 24
        for name in NAMES:
            assert row[f"atropos/env/{name}/sequences"] == 4, (name, row)


def test_every_trained_sequence_has_a_matched_policy_lag(patterns_run: tuple[Launch, list[dict]]) -> None:
    """Re-tokenised turns (chat2's two spans, template, pkg, two_servers) are matched to the completions the endpoint
    served by their text, the others by their tokens: no lag is bounded or unknown."""
    _, rows = patterns_run
    for row in rows:
        assert row["atropos/policy_lag_unknown"] == 0, row
        assert row["atropos/lag/unmatched_fraction"] == 0.0, row
        assert 0 <= row["atropos/policy_lag_max"] <= 2, row
