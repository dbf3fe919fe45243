"""The launcher's view of the config: composition, env checks and command lines, the env-ids file, the run report.

Supervision with real processes is in tests/integration/test_launcher.py; whole runs through the launcher in
tests/e2e."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recipe.atropos.config import EnvConfig, atropos_config
from recipe.atropos.launcher.config import LaunchError, load_config
from recipe.atropos.launcher.env_entries import EnvServers, checked_envs, env_argv, write_env_ids
from recipe.atropos.launcher.report import env_lines, fault_line, step_line, summarize, write_run_report
from recipe.atropos.metrics_file import read_metrics
from recipe.atropos.rundir import RunDir
from tests.factories import CONFIG_DIR, TINY_CONFIG


@pytest.mark.parametrize("name", ["atropos_grpo", "atropos_grpo_tiny", "atropos_grpo_cpu_demo", "atropos_grpo_gpu"])
def test_every_shipped_config_composes(name: str) -> None:
    config = load_config(CONFIG_DIR / f"{name}.yaml", [])
    assert config.algorithm.adv_estimator == "grpo"  # env advantages are combined by the trainer, not an estimator
    assert config.actor_rollout_ref.actor.policy_loss.loss_mode == "advantage_weighted_ce"
    launcher = atropos_config(config).launcher  # the typed block accepts every shipped config
    if launcher.envs:  # atropos_grpo.yaml names none: its environments are started elsewhere
        checked_envs(launcher, int(config.data.train_batch_size))


def envs_of(*overrides: str) -> dict[str, EnvConfig]:
    config = load_config(TINY_CONFIG, list(overrides))
    return checked_envs(atropos_config(config).launcher, int(config.data.train_batch_size))


def test_batch_size_must_be_a_multiple_of_every_group_size() -> None:
    with pytest.raises(LaunchError, match="train_batch_size=6 is not a multiple of env 'one_word' group_size=4"):
        envs_of("data.train_batch_size=6")


def test_env_entry_needs_exactly_one_of_module_or_script() -> None:  # the typed config's check
    with pytest.raises(ValueError, match=r"envs\[0\] \(one_word\): give exactly one of `module` or `script`"):
        envs_of("+atropos.launcher.envs.0.script=x.py")


def test_env_weights_must_be_non_negative_with_a_positive_sum() -> None:  # the typed config's check
    with pytest.raises(ValueError, match=r"envs\[\]\.weight .*: use weights >= 0 with a positive sum"):
        envs_of("atropos.launcher.envs.0.weight=0", "atropos.launcher.envs.1.weight=0")
    with pytest.raises(ValueError, match=r"envs\[\]\.weight"):
        envs_of("atropos.launcher.envs.0.weight=-1")


def test_envs_are_named_by_index_unless_named_and_names_must_differ() -> None:
    assert list(envs_of()) == ["one_word", "one_word_pairs"]
    assert list(envs_of("atropos.launcher.envs.1.name=null")) == ["one_word", "env1"]
    with pytest.raises(LaunchError, match=r"envs\[1\]: the name 'one_word' is taken"):
        envs_of("atropos.launcher.envs.1.name=one_word")
    with pytest.raises(LaunchError, match="atropos.launcher.envs is empty"):
        envs_of("atropos.launcher.envs=[]")


def argv_flags(argv: list[str], skip: int) -> dict[str, str]:
    return dict(zip(argv[skip::2], argv[skip + 1 :: 2], strict=True))


def test_env_command_line_fills_in_endpoints_and_lets_env_flags_win() -> None:
    env = EnvConfig(script="/x/gsm8k_server.py", group_size=8, weight=2.0, args={"env.use_wandb": True})
    urls = {"api_url": "http://127.0.0.1:1", "inference_url": "http://127.0.0.1:2", "model": "/models/m"}
    argv = env_argv("gsm8k", env, **urls, max_token_length=640, max_policy_lag=None)
    assert argv[1:3] == ["/x/gsm8k_server.py", "serve"]
    flags = argv_flags(argv, 3)
    assert flags["--env.rollout_server_url"] == "http://127.0.0.1:1"
    assert flags["--openai.base_url"] == "http://127.0.0.1:2/env/gsm8k/v1"  # the endpoint counts requests per env
    assert flags["--openai.server_type"] == "vllm"
    assert flags["--env.group_size"] == "8" and flags["--env.inference_weight"] == "2.0"
    assert flags["--env.max_token_length"] == "640" and flags["--env.wandb_name"] == "gsm8k"
    assert flags["--env.use_wandb"] == "true"  # the env's own flag overrides the launcher default (false)
    assert "--env.max_batches_offpolicy" not in flags  # no lag cap: the env's own default


def test_env_command_line_keeps_the_env_within_the_lag_cap() -> None:
    env = EnvConfig(module="some.env")
    urls = {"api_url": "http://a", "inference_url": "http://b", "model": "/m", "max_token_length": 64}
    for lag, ahead in [(0, "1"), (2, "1"), (4, "3")]:
        argv = env_argv("e", env, **urls, max_policy_lag=lag)
        assert argv[1:4] == ["-m", "some.env", "serve"]
        assert argv_flags(argv, 4)["--env.max_batches_offpolicy"] == ahead
    capped = env_argv("e", EnvConfig(module="m", args={"env.max_batches_offpolicy": 7}), **urls, max_policy_lag=2)
    assert argv_flags(capped, 4)["--env.max_batches_offpolicy"] == "7"  # the env's own flag wins here too


def test_the_launcher_gives_each_env_this_runs_endpoints_and_lag_cap(tmp_path: Path) -> None:
    from recipe.atropos.launcher.supervisor import Launcher

    demo = CONFIG_DIR / "atropos_grpo_cpu_demo.yaml"
    launcher = Launcher(demo, [f"atropos.launcher.run_dir={tmp_path}", "atropos.launcher.api_port=1234"])
    name = next(iter(launcher.envs))
    launcher.env_servers = {name: EnvServers(servers=[{}])}  # as the preflight's probe found (one server)
    flags = argv_flags(launcher.env_argv(name), 4)
    assert flags["--env.rollout_server_url"] == "http://127.0.0.1:1234" and flags["--env.wandb_name"] == name
    assert flags["--openai.base_url"] == f"{launcher.inference_url}/env/{name}/v1"
    assert flags["--env.max_batches_offpolicy"] == "1"  # the demo's max_policy_lag 2: one batch queued ahead
    deeper = Launcher(demo, [f"atropos.launcher.run_dir={tmp_path}", "atropos.max_policy_lag=4"])
    deeper.env_servers = launcher.env_servers
    assert argv_flags(deeper.env_argv(name), 4)["--env.max_batches_offpolicy"] == "3"


def test_env_ids_file_maps_id_to_name_as_json(tmp_path: Path) -> None:
    write_env_ids(RunDir(tmp_path).env_ids, {0: "one_word", 1: "one_word_pairs"})
    assert json.loads(RunDir(tmp_path).env_ids.read_text()) == {"0": "one_word", "1": "one_word_pairs"}
    assert [p.name for p in tmp_path.iterdir()] == [RunDir(tmp_path).env_ids.name]  # no temporary file left


def test_summary_and_step_line_from_a_metrics_file(tmp_path: Path) -> None:
    path = RunDir(tmp_path).metrics_file
    scores = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
    path.write_text("".join(f'{{"step": {i + 1}, "atropos/mean_score": {s}}}\n' for i, s in enumerate(scores)) + "{")
    rows = read_metrics(path)  # the half-written last line is skipped
    assert len(rows) == 7
    assert summarize(rows) == "mean score first 5 steps 0.200 -> last 5 steps 0.400 (7 steps)"
    assert step_line(rows[0], 7).startswith("step 1/7 | mean score 0.000")


def test_fault_line_counts_restarts_and_rejections(tmp_path: Path) -> None:
    assert fault_line(RunDir(tmp_path), 0, 0) == ""  # no faults, no guard stats: no line
    stats = {"accepted_groups": 12, "rejected": {"tokens": 2, "scores": 1}}
    RunDir(tmp_path).guard_stats.write_text(json.dumps(stats))
    assert fault_line(RunDir(tmp_path), 1, 3) == (
        f"faults: api restarts 1, env restarts 3, groups accepted 12, rejected 3 (scores 1, tokens 2; kept in "
        f"{RunDir(tmp_path).rejected_groups})"
    )


def test_run_report_writes_the_summary_and_the_plot(tmp_path: Path) -> None:
    metrics = RunDir(tmp_path).metrics_file
    metrics.write_text("".join(json.dumps({"step": i, "atropos/mean_score": 0.5}) + "\n" for i in (1, 2)))
    summary = write_run_report(RunDir(tmp_path), "tiny", api_restarts=1, env_restarts=0)
    assert summary.splitlines() == [
        "mean score first 2 steps 0.500 -> last 2 steps 0.500 (2 steps)",
        fault_line(RunDir(tmp_path), 1, 0),
    ]
    assert RunDir(tmp_path).summary.read_text() == summary + "\n"
    assert RunDir(tmp_path).metrics_plot.stat().st_size > 0
    empty = tmp_path / "empty"
    assert write_run_report(RunDir(empty), "tiny", 0, 0) == "no steps recorded"
    assert not RunDir(empty).metrics_plot.exists()


def test_env_lines_say_which_env_posted_nothing_and_why(tmp_path: Path) -> None:
    """blackjack (ids 0 and 2: restarted) posts and trains; reasoning generates but posts nothing (drops its groups
    itself); dead got no completion at all. Figures from the guard's stats, env_ids.json and the trainer's rows."""
    RunDir(tmp_path).env_ids.write_text(json.dumps({"0": "blackjack", "1": "reasoning", "2": "blackjack", "3": "dead"}))
    guard = {"envs": {"0": {"received": 3, "rejected": 1}, "2": {"received": 2, "rejected": 0}}}
    RunDir(tmp_path).guard_stats.write_text(json.dumps(guard))
    rows = [
        {
            "step": 1,
            "atropos/env/blackjack/sequences": 8.0,
            "atropos/endpoint/env/blackjack/completions": 16.0,
            "atropos/endpoint/env/reasoning/completions": 8.0,
            "atropos/endpoint/env/dead/failed_calls": 3.0,
        },
        {
            "step": 2,
            "atropos/env/blackjack/sequences": 16.0,
            "atropos/endpoint/env/blackjack/completions": 40.0,
            "atropos/endpoint/env/reasoning/completions": 24.0,
            "atropos/endpoint/env/dead/failed_calls": 7.0,
        },
    ]
    blackjack, reasoning, dead = env_lines(RunDir(tmp_path), rows)
    assert (
        blackjack
        == "env blackjack: posted 5 groups (1 rejected), trained 24 sequences, 40 completions served, 0 failed calls"
    )
    assert reasoning.startswith(
        "env reasoning: posted 0 groups (0 rejected), trained 0 sequences, 24 completions served"
    )
    assert reasoning.endswith(
        "it generates but posts nothing, so it drops its groups itself (scores all equal, length, "
        "or a filter of its own): see its log"
    )
    assert dead.startswith(
        "env dead: posted 0 groups (0 rejected), trained 0 sequences, 0 completions served, 7 failed"
    )
    assert dead.endswith(
        "it got no completion from the endpoint (its calls fail, or it fails before calling): see its log"
    )
    assert env_lines(RunDir(tmp_path / "none"), rows) == []


def test_env_lines_of_fifo_batches_count_the_trained_sequences_of_a_lone_env_only(tmp_path: Path) -> None:
    """FIFO batches carry no per-env counts: one env trained every sequence; with two, the line says it cannot tell."""
    run = RunDir(tmp_path)
    run.guard_stats.write_text(json.dumps({"envs": {"0": {"received": 4, "rejected": 0}}}))
    rows = [{"step": 1, "atropos/sequences": 16.0}, {"step": 2, "atropos/sequences": 16.0}]
    run.env_ids.write_text(json.dumps({"0": "blackjack"}))
    assert env_lines(run, rows)[0].startswith("env blackjack: posted 4 groups (0 rejected), trained 32 sequences, ")
    run.env_ids.write_text(json.dumps({"0": "blackjack", "1": "math"}))
    assert "trained sequences not counted per env (FIFO batches" in env_lines(run, rows)[0]
