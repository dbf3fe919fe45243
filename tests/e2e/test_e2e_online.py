"""Exact env mixture end to end: the launcher runs run-api, the trainer and two real one_word envs weighted
0.25 / 0.75, the 0.25 env the faster one (groups of 4 with 4 new tokens, against groups of 2 with 16); over 8 steps
the trained fractions hold the weights while the API's FIFO batches follow the envs' speeds."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from recipe.atropos.launcher.report import read_metrics
from recipe.atropos.launcher.processes import ManagedProcess, tail
from tests.helpers import launcher_argv

pytestmark = pytest.mark.e2e
logger = logging.getLogger(__name__)


@pytest.mark.timeout(900)
def test_envs_at_025_075_hold_their_weights_over_8_steps_though_the_025_env_is_faster(
    tmp_path: Path, tiny_model: Path
) -> None:
    model = tiny_model
    run_dir = tmp_path / "run"
    argv = launcher_argv(
        model,
        run_dir,
        "trainer.total_training_steps=8",
        "trainer.save_freq=-1",
        "atropos.launcher.envs.0.weight=0.25",
        "atropos.launcher.envs.1.weight=0.75",
        # one_word (0.25): groups of 4, 4 new tokens: the faster env
        "atropos.launcher.envs.0.args={env.ensure_scores_are_not_same:false,env.max_new_tokens:4}",
    )
    launcher = ManagedProcess("launcher", argv, tmp_path / "launcher.log").start()
    try:
        deadline = time.monotonic() + 840
        while launcher.poll() is None and time.monotonic() < deadline:
            time.sleep(2)
        assert launcher.poll() == 0, tail(launcher.log_path, 80)
    finally:
        launcher.stop()

    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert json.loads((run_dir / "env_ids.json").read_text()) == {"0": "one_word", "1": "one_word_pairs"}
    trained = {n: sum(r[f"atropos/env/{n}/sequences"] for r in rows) for n in ("one_word", "one_word_pairs")}
    received = {n: rows[-1][f"atropos/env/{n}/received_fraction"] for n in trained}
    logger.info("trained sequences %s; fractions the API delivered %s", trained, received)
    assert sum(trained.values()) == 64
    # the premise: the faster 0.25 env delivers far more than its share of the API's FIFO batches (0.92 when it started
    # well ahead of the other; 0.46 now that both are admitted while the trainer's workers start)
    assert received["one_word"] > 0.25 + 0.15, received
    assert abs(trained["one_word"] / 64 - 0.25) <= 0.05, trained
    assert abs(trained["one_word_pairs"] / 64 - 0.75) <= 0.05, trained
    assert rows[-1]["atropos/env/one_word/trained_fraction"] == pytest.approx(trained["one_word"] / 64)
