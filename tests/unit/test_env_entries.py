"""Env entries for real layouts (``atropos.launcher.envs``: ``pythonpath``, ``module``/``script``, ``python``,
``policy_server``, ``servers``), the env's interpreter, and its command line (``env_argv``): the endpoint URL per env,
``--openai.*`` flags for a one-server env, ``--config`` with an ``openai:`` list for a multi-server one.

Running the probe and real envs in ``.venv-envs`` is tests/integration/test_env_interpreter.py."""

from __future__ import annotations

import logging
import os
import stat
import sys
from pathlib import Path

import pytest
import yaml

from recipe.atropos.config import EnvConfig, LauncherConfig, atropos_config
from recipe.atropos.launcher import env_python
from recipe.atropos.launcher.config import LaunchError, load_config
from recipe.atropos.launcher.env_entries import EnvServers, checked_envs, env_argv, env_environ, env_pythonpath
from recipe.atropos.launcher.env_probe import cli_class_names
from recipe.atropos.launcher.preflight import PreflightError, check_envs
from tests.factories import TINY_CONFIG

URLS = {"api_url": "http://127.0.0.1:1", "inference_url": "http://127.0.0.1:2", "model": "/models/m"}
LENGTHS = {"max_token_length": 640, "max_policy_lag": 2}
POLICY = {"timeout": 1200, "server_type": "vllm", "model_name": "policy", "base_url": "http://x:1/v1", "api_key": "x"}
JUDGE = {"timeout": 60, "server_type": "vllm", "model_name": "judge", "base_url": "http://judge/v1", "api_key": "j"}
TWO = EnvServers(servers=[POLICY, JUDGE], env_class="TwoServersEnv")


def flags_of(argv: list[str], skip: int) -> dict[str, str]:
    return dict(zip(argv[skip::2], argv[skip + 1 :: 2], strict=True))


def typed_launcher(*overrides: str):
    return atropos_config(load_config(TINY_CONFIG, ["actor_rollout_ref.model.path=/m", *overrides])).launcher


def test_the_entry_keys_are_typed_from_yaml() -> None:
    launcher = typed_launcher(
        "~atropos.launcher.envs.0.module",
        "+atropos.launcher.envs.0.script=envs/two_servers_env.py",
        "+atropos.launcher.envs.0.python=/opt/envs/bin/python",
        "+atropos.launcher.envs.0.pythonpath=['~/atropos/environments',envs]",
        "+atropos.launcher.envs.0.policy_server=1",
        "+atropos.launcher.envs.0.servers=[{base_url: 'http://judge:9/v1', api_key: k},{}]",
        "atropos.launcher.env_python=/opt/python",
    )
    env = launcher.envs[0]
    assert (env.script, env.python, env.policy_server) == ("envs/two_servers_env.py", "/opt/envs/bin/python", 1)
    assert env.pythonpath == ["~/atropos/environments", "envs"]
    assert env.servers == [{"base_url": "http://judge:9/v1", "api_key": "k"}, {}]
    assert launcher.env_python == "/opt/python"
    assert typed_launcher().env_python is None and typed_launcher().envs[0].pythonpath == []
    with pytest.raises(ValueError, match=r"policy_server=-1: use an index >= 0"):
        typed_launcher("+atropos.launcher.envs.0.policy_server=-1")
    with pytest.raises(ValueError, match="pythonpath: Invalid value"):
        typed_launcher("+atropos.launcher.envs.0.pythonpath=envs")  # a string, not a list of folders


def test_env_names_are_url_segments_atroposlib_keeps_whole() -> None:
    for bad in ("a/b", "has space", "v1math", "-x"):
        with pytest.raises(LaunchError, match=r"envs\[0\]: the name .* must be letters, digits"):
            checked_envs(LauncherConfig(envs=[EnvConfig(name=bad, module="m")]), 8)
    assert list(checked_envs(LauncherConfig(envs=[EnvConfig(name="gsm8k.v2-a_b", module="m")]), 8)) == ["gsm8k.v2-a_b"]


def test_pythonpath_folders_are_absolute_from_the_working_directory_and_go_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", "/home/u")
    env = EnvConfig(module="pkg_env.env", pythonpath=["~/atropos/environments", "tests/envs"])
    assert env_pythonpath(env) == ["/home/u/atropos/environments", str(tmp_path / "tests/envs")]
    extra = env_environ(env, base={"PYTHONPATH": "/already", "PATH": "/usr/bin"})
    folders = ["/home/u/atropos/environments", str(tmp_path / "tests/envs"), "/already"]
    assert extra == {"PYTHONPATH": os.pathsep.join(folders)}
    assert env_environ(EnvConfig(module="m"), base={"PYTHONPATH": "/already"}) == {}  # nothing to add


def test_an_env_in_a_venv_runs_as_if_the_venv_were_activated(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "pyvenv.cfg").write_text("home = /usr/bin\n")
    extra = env_environ(EnvConfig(module="m"), str(venv / "bin" / "python"), base={"PATH": "/usr/bin"})
    assert extra == {"VIRTUAL_ENV": str(venv), "PATH": os.pathsep.join([str(venv / "bin"), "/usr/bin"])}
    assert env_environ(EnvConfig(module="m"), "/usr/bin/python3", base={"PATH": "/usr/bin"}) == {}  # not a venv


def test_the_interpreter_is_the_entrys_then_the_launchers_then_the_variable_then_venv_envs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(env_python.ENV_PYTHON_VAR, "/from/var/python")
    monkeypatch.setattr(env_python, "DEFAULT_VENV", tmp_path / ".venv-envs")
    assert env_python.resolve_env_python("venvs/a/bin/python", "/b/python") == (
        str(tmp_path / "venvs/a/bin/python"),
        "the entry's `python`",
    )
    assert env_python.resolve_env_python(None, "/b/python") == ("/b/python", "atropos.launcher.env_python")
    assert env_python.resolve_env_python(None, None) == ("/from/var/python", "$ATROPOS_ENV_PYTHON")
    monkeypatch.delenv(env_python.ENV_PYTHON_VAR)
    with caplog.at_level(logging.WARNING, logger="atropos_launcher"):
        assert env_python.resolve_env_python(None, None) == (sys.executable, env_python.FALLBACK)
    assert "make install" in caplog.text and "recipe.atropos.launcher.env_python" in caplog.text
    (tmp_path / ".venv-envs" / "bin").mkdir(parents=True)
    (tmp_path / ".venv-envs" / "bin" / "python").touch()
    assert env_python.resolve_env_python(None, None) == (
        str(tmp_path / ".venv-envs" / "bin" / "python"),
        str(tmp_path / ".venv-envs"),
    )


def test_preflight_names_an_interpreter_that_cannot_run_envs(tmp_path: Path) -> None:
    launcher = typed_launcher(f"atropos.launcher.env_python={tmp_path}/nowhere/python")
    with pytest.raises(PreflightError) as info:
        check_envs(launcher)
    message = str(info.value)
    assert message.startswith("atropos.launcher.envs[0] (one_word): the env interpreter ")
    assert f"{tmp_path}/nowhere/python does not exist" in message and "atropos.launcher.env_python" in message
    assert "\n" not in message
    fake = tmp_path / "python"  # runs, but has no atroposlib
    fake.write_text("#!/bin/sh\necho \"ModuleNotFoundError: No module named 'atroposlib'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(PreflightError, match="cannot import atroposlib .*No module named 'atroposlib'.*; point"):
        check_envs(typed_launcher(f"+atropos.launcher.envs.0.python={fake}"))


def test_a_one_server_env_gets_openai_flags_for_this_runs_endpoint_of_its_own() -> None:
    env = EnvConfig(script="/x/gsm8k_server.py", args={"openai.timeout": 60})
    argv = env_argv("gsm8k", env, **URLS, **LENGTHS, python="/venv/bin/python", servers=EnvServers(servers=[POLICY]))
    assert argv[:3] == ["/venv/bin/python", "/x/gsm8k_server.py", "serve"]
    flags = flags_of(argv, 3)
    assert flags["--openai.base_url"] == "http://127.0.0.1:2/env/gsm8k/v1"
    assert flags["--openai.server_type"] == "vllm" and flags["--openai.api_key"] == "x"
    assert (
        flags["--openai.model_name"] == flags["--openai.tokenizer_name"] == flags["--env.tokenizer_name"] == "/models/m"
    )
    assert flags["--openai.timeout"] == "60"  # the entry's own flags win
    assert "--config" not in flags
    baseline = env_argv("b", EnvConfig(module="m"), **URLS, **LENGTHS, servers=EnvServers(kind="baseline"))
    assert argv_has_openai(baseline) and baseline[0] == sys.executable  # no interpreter named: this one
    with pytest.raises(LaunchError, match="env 'gsm8k': declares one server: `servers` and `policy_server` are for"):
        env_argv("gsm8k", EnvConfig(module="m", servers=[{"timeout": 5}]), **URLS, **LENGTHS)


def argv_has_openai(argv: list[str]) -> bool:
    return any(a.startswith("--openai.") for a in argv)


def test_a_two_server_env_gets_a_config_yaml_with_the_policy_pointed_at_the_endpoint(tmp_path: Path) -> None:
    env = EnvConfig(
        script="/x/judge_env.py",
        group_size=4,
        servers=[{"timeout": 30}, {"base_url": "http://judge:9/v1", "api_key": "k"}],
        args={"env.max_new_tokens": 8},
    )
    argv = env_argv("judged", env, **URLS, **LENGTHS, api_key="tok", servers=TWO, config_dir=tmp_path / "cfg")
    assert not argv_has_openai(argv)  # atroposlib exits 2 on any --openai.* flag with two servers
    flags = flags_of(argv, 3)
    assert flags["--env.tokenizer_name"] == "/models/m" and flags["--env.group_size"] == "4"
    assert flags["--env.max_new_tokens"] == "8" and flags["--env.wandb_name"] == "judged"
    path = Path(flags["--config"])
    assert path == tmp_path / "cfg" / "judged.yaml"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds API keys
    assert yaml.safe_load(path.read_text()) == {
        "openai": [
            {  # config_init's policy server, pointed at this run's endpoint, then the entry's dict
                **POLICY,
                "server_type": "vllm",
                "base_url": "http://127.0.0.1:2/env/judged/v1",
                "model_name": "/models/m",
                "tokenizer_name": "/models/m",
                "api_key": "tok",
                "timeout": 30,
            },
            {**JUDGE, "base_url": "http://judge:9/v1", "api_key": "k"},  # as declared, the entry's dict merged on
        ]
    }


def test_the_policy_server_can_be_another_index_and_the_envs_own_yaml_is_kept(tmp_path: Path) -> None:
    judge_first = EnvServers(servers=[JUDGE, POLICY])
    own = tmp_path / "own.yaml"
    own.write_text(yaml.safe_dump({"env": {"group_size": 2, "max_token_length": 99}}))
    env = EnvConfig(module="judge_env", policy_server=1, args={"config": str(own)})
    argv = env_argv("j", env, **URLS, **LENGTHS, servers=judge_first, config_dir=tmp_path)
    written = yaml.safe_load(Path(flags_of(argv, 4)["--config"]).read_text())
    assert written["env"] == {"group_size": 2, "max_token_length": 99}  # the CLI's --env.* flags still win over it
    assert written["openai"][0] == JUDGE
    assert written["openai"][1]["base_url"] == "http://127.0.0.1:2/env/j/v1"
    assert flags_of(argv, 4)["--env.group_size"] == "8"  # CLI > YAML > defaults (atroposlib's merge order)

    openai_first = EnvServers(servers=[{**JUDGE, "server_type": "openai"}, POLICY])
    with pytest.raises(LaunchError, match=r"client of servers\[0\] \(server_type openai\).*policy server \(index 1\)"):
        env_argv(
            "j", EnvConfig(module="m", policy_server=1), **URLS, **LENGTHS, servers=openai_first, config_dir=tmp_path
        )
    with pytest.raises(LaunchError, match="policy_server=2 but config_init\\(\\) declares 2 servers"):
        env_argv("j", EnvConfig(module="m", policy_server=2), **URLS, **LENGTHS, servers=TWO, config_dir=tmp_path)
    with pytest.raises(LaunchError, match="move args openai.timeout into `servers`"):
        env_argv("j", EnvConfig(module="m", args={"openai.timeout": 5}), **URLS, **LENGTHS, servers=TWO)


def test_a_servers_dict_past_the_declared_ones_adds_a_server(tmp_path: Path) -> None:
    env = EnvConfig(module="m", servers=[{}, {}, {"server_type": "vllm", "base_url": "http://third/v1"}])
    argv = env_argv("e", env, **URLS, **LENGTHS, servers=TWO, config_dir=tmp_path)
    servers = yaml.safe_load((tmp_path / "e.yaml").read_text())["openai"]
    assert [s["base_url"] for s in servers] == ["http://127.0.0.1:2/env/e/v1", JUDGE["base_url"], "http://third/v1"]
    assert argv[1:4] == ["-m", "m", "serve"]


def test_the_probe_finds_the_class_whose_cli_the_file_calls() -> None:
    source = "class A: ...\nclass B: ...\nif __name__ == '__main__':\n    B.cli()\n"
    assert cli_class_names(source) == ["B"]
    assert cli_class_names("x = 1\n") == []
