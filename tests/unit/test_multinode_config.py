"""Multi-node settings: launcher roles and their URLs, the access knobs' start-up refusals, the cluster attach's
Ray settings (recipe.atropos.launcher.roles, recipe.atropos.access, recipe.atropos.setup.cluster)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from recipe.atropos.access import API_KEY_ENV, is_loopback, parse_networks
from recipe.atropos.config import atropos_config, check_atropos_config
from recipe.atropos.launcher.config import load_config
from recipe.atropos.launcher.env_entries import EnvServers
from recipe.atropos.launcher.roles import RemoteTrainer, local_host, role_plan
from recipe.atropos.setup.cluster import CLUSTER_DECIDES, cluster_settings, ray_init_kwargs
from recipe.atropos.setup.cpu_runtime import CPU_SETTINGS, apply_cpu_runtime, cpu_runtime_env
from tests.factories import TINY_CONFIG

MODEL = "actor_rollout_ref.model.path=/m"


def typed(*overrides: str):
    return atropos_config(load_config(TINY_CONFIG, [MODEL, *overrides]))


def test_loopback_and_networks() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("trainer-host")
    assert [str(n) for n in parse_networks(["10.0.0.7", "192.168.0.0/16"])] == ["10.0.0.7/32", "192.168.0.0/16"]


def test_api_beyond_loopback_needs_an_allow_list_and_the_guard() -> None:
    with pytest.raises(ValueError, match="set atropos.launcher.api_allow"):
        typed("atropos.launcher.api_host=0.0.0.0")
    assert typed("atropos.launcher.api_host=0.0.0.0", "atropos.launcher.api_allow=[10.0.0.0/24]").launcher.api_allow
    with pytest.raises(ValueError, match="'10.0.0/33' is not a network"):
        typed("atropos.launcher.api_allow=[10.0.0/33]")
    with pytest.raises(ValueError, match="api_allow needs atropos.launcher.guard_api=true"):
        typed("atropos.launcher.api_allow=[10.0.0.0/24]", "atropos.launcher.guard_api=false")


def test_endpoint_beyond_loopback_needs_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    config = load_config(TINY_CONFIG, [MODEL, "atropos.inference.host=0.0.0.0"])
    with pytest.raises(ValueError, match=r"set atropos.inference.api_key \(or \$ATROPOS_INFERENCE_API_KEY\)"):
        check_atropos_config(config)
    monkeypatch.setenv(API_KEY_ENV, "t")
    check_atropos_config(config)
    keyed = load_config(TINY_CONFIG, [MODEL, "atropos.inference.host=0.0.0.0", "atropos.inference.api_key=k"])
    monkeypatch.delenv(API_KEY_ENV)
    check_atropos_config(keyed)


def test_roles_need_the_addresses_of_the_other_side() -> None:
    with pytest.raises(ValueError, match="atropos.launcher.role='both'"):
        typed("atropos.launcher.role=both")
    with pytest.raises(ValueError, match="role=services needs atropos.launcher.endpoint_url"):
        typed("atropos.launcher.role=services", "atropos.launcher.api_port=8000")
    with pytest.raises(ValueError, match="role=trainer needs atropos.launcher.inference_port"):
        typed("atropos.launcher.role=trainer")


def test_role_plans_name_what_runs_and_where_it_is_reached() -> None:
    everything = role_plan(typed(), 8000, 8001)
    assert (everything.runs_api, everything.runs_envs, everything.runs_trainer) == (True, True, True)
    assert (everything.api_url, everything.inference_url) == ("http://127.0.0.1:8000", "http://127.0.0.1:8001")

    services = role_plan(
        typed(
            "atropos.launcher.role=services",
            "atropos.launcher.api_port=8000",
            "atropos.launcher.api_host=0.0.0.0",
            "atropos.launcher.api_allow=[10.0.0.0/24]",
            "atropos.launcher.endpoint_url=http://10.0.0.5:8001/v1",
        ),
        8000,
        1,
    )
    assert (services.runs_api, services.runs_envs, services.runs_trainer) == (True, True, False)
    assert (services.api_url, services.inference_url) == ("http://127.0.0.1:8000", "http://10.0.0.5:8001")

    trainer = role_plan(
        typed(
            "atropos.launcher.role=trainer",
            "atropos.launcher.inference_port=8001",
            "atropos.api_url=http://10.0.0.9:8000/",
            "atropos.inference.host=10.0.0.5",
            "atropos.inference.api_key=k",
        ),
        1,
        8001,
    )
    assert (trainer.runs_api, trainer.runs_envs, trainer.runs_trainer) == (False, False, True)
    assert (trainer.api_url, trainer.inference_url) == ("http://10.0.0.9:8000", "http://10.0.0.5:8001")
    assert local_host("0.0.0.0") == "127.0.0.1" and local_host("::") == "127.0.0.1"


def test_a_services_launcher_waits_for_a_trainer_until_it_was_seen_and_then_gone() -> None:
    now = [0.0]
    watch = RemoteTrainer("http://127.0.0.1:9", gone_after_s=30, clock=lambda: now[0])  # port 9: nothing answers
    now[0] = 1000.0
    assert not watch.gone()  # never seen: a trainer still starting is waited for
    watch.last_seen = 1000.0
    now[0] = 1029.0
    assert not watch.gone()
    now[0] = 1030.0
    assert watch.gone()


def test_the_launcher_services_role_runs_no_trainer(tmp_path: Path) -> None:
    from recipe.atropos.launcher.supervisor import Launcher

    services = Launcher(
        TINY_CONFIG,
        [
            MODEL,
            f"atropos.launcher.run_dir={tmp_path}",
            "atropos.launcher.role=services",
            "atropos.launcher.api_port=1234",
            "atropos.launcher.endpoint_url=http://10.0.0.5:8001",
            "atropos.inference.api_key=tok",
        ],
    )
    services.env_servers = {"one_word": EnvServers(servers=[{}])}  # as the preflight's probe found (one server)
    flags = services.env_argv("one_word")
    assert flags[flags.index("--openai.base_url") + 1] == "http://10.0.0.5:8001/env/one_word/v1"
    assert flags[flags.index("--openai.api_key") + 1] == "tok"  # the endpoint's token goes to every env
    trainer = Launcher(
        TINY_CONFIG,
        [
            MODEL,
            f"atropos.launcher.run_dir={tmp_path}",
            "atropos.launcher.role=trainer",
            "atropos.launcher.inference_port=8123",
            "atropos.api_url=http://10.0.0.9:8000",
        ],
    )
    assert trainer.envs == {}
    argv = trainer.trainer_argv()
    assert "atropos.api_url=http://10.0.0.9:8000" in argv and "atropos.inference.port=8123" in argv
    assert not any(a.startswith("atropos.env_ids_file=") for a in argv)  # no env ids here: FIFO batches


def test_attached_to_a_cluster_the_cluster_decides_nodes_and_resources(monkeypatch: pytest.MonkeyPatch) -> None:
    local = OmegaConf.create({"ray_kwargs": {"ray_init": {"num_cpus": 8}}})
    assert cluster_settings(local, CPU_SETTINGS) == CPU_SETTINGS
    attached = OmegaConf.create(
        {
            "trainer": {"nnodes": 2, "n_gpus_per_node": 1},
            "actor_rollout_ref": {"rollout": {"name": "vllm"}},
            "ray_kwargs": {"ray_init": {"address": "127.0.0.1:6390", "num_cpus": 8, "num_gpus": 1}},
        }
    )
    kept = dict(cluster_settings(attached, CPU_SETTINGS))
    assert not set(CLUSTER_DECIDES) & set(kept) and kept["trainer.device"] == "cpu"

    for key in cpu_runtime_env():
        monkeypatch.setenv(key, "")
    apply_cpu_runtime(attached)
    assert attached.trainer.nnodes == 2 and attached.actor_rollout_ref.rollout.name == "hf_cpu"
    kwargs = ray_init_kwargs(attached, {"env_vars": {"A": "1"}})
    assert "num_cpus" not in kwargs and "num_gpus" not in kwargs and kwargs["address"] == "127.0.0.1:6390"
    assert kwargs["runtime_env"]["env_vars"]["VERL_PLATFORM"] == "cpu" and kwargs["runtime_env"]["env_vars"]["A"] == "1"
    assert ray_init_kwargs(local, {})["num_cpus"] == 8  # a Ray the trainer starts keeps its logical resources
