"""Beyond one machine, on one machine: a 2-node Ray cluster (a head and a worker ``ray start``, each with its own
logical resources, behind Ray's token auth), a launcher in the ``trainer`` role attached to it with ``trainer.nnodes=2``
(the actor's FSDP group spans both nodes, gloo between them), and a second launcher in the ``services`` role (API and
envs) against that trainer; the endpoint and the API listen on every address, behind a token and an allow-list.

Its own tier (``make test-cluster``, marker ``cluster``; ``make test`` leaves it out): ~4 min on 2 cores.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from recipe.atropos.access import API_KEY_ENV
from recipe.atropos.launcher.processes import ManagedProcess, free_port
from recipe.atropos.metrics_file import read_metrics, trainer_rows
from recipe.atropos.rundir import RunDir
from tests.helpers import host_address, launcher_argv, wait_exit, wait_until

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")
TOKEN = "cluster-test-token"
NODE_CPUS = 8  # logical CPUs per node: verl's bundles, the task runner, the agent loop and reward workers fit on one

ACTORS_BY_NODE = """
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
alive = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
# private: Ray's public actor listing (ray.util.state) goes through the dashboard; the GCS actor table does not
actors = ray._private.state.state.actor_table(None)
workers = sorted({a["Address"]["NodeID"] for a in actors.values() if "WorkerDict" in a["ActorClassName"]})
print(json.dumps({"alive": alive, "worker_nodes": workers}))
"""


def node_argv(*args: str) -> list[str]:
    """``ray start --block`` (the process stays ours, so its whole tree stops with it), no agent port shared with
    another node or another cluster on this machine. Ray resolves a loopback ``--node-ip-address`` to the host's
    address (``services.resolve_ip_for_localhost``): the nodes listen there, behind Ray's token."""
    ports = [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]
    common = [f"--num-cpus={NODE_CPUS}", "--num-gpus=1", "--disable-usage-stats"]
    return [RAY, "start", "--block", *common, *ports, *args]


def cluster_view(address: str, env: dict[str, str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", ACTORS_BY_NODE, address],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture()
def ray_dir() -> Iterator[str]:
    """Ray's temp dir, short: its socket paths must stay under 107 bytes (removed afterwards, failed or not)."""
    path = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_two_node_cluster_trainer_and_services_launchers(
    tmp_path: Path, tiny_model: Path, ray_dir: str, no_leftovers: list[ManagedProcess]
) -> None:
    outside = host_address()
    # Ray's own token auth (on by default since Ray 2.5x): every node, driver and client of this cluster presents
    # RAY_AUTH_TOKEN (not ~/.ray/auth_token, which other clusters on this machine may use).
    ray_auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = {"PYTHONPATH": str(REPO), API_KEY_ENV: TOKEN, "RAY_USAGE_STATS_ENABLED": "0", **ray_auth}
    gcs_port = free_port()
    address = f"127.0.0.1:{gcs_port}"
    head_args = [
        "--head",
        f"--port={gcs_port}",
        "--include-dashboard=false",
        f"--ray-client-server-port={free_port()}",
        f"--temp-dir={ray_dir}",
    ]
    head = ManagedProcess("ray-head", node_argv(*head_args), tmp_path / "ray-head.log", env=env, cwd=str(REPO))
    no_leftovers.append(head.start())
    wait_until(lambda: _port_open(gcs_port), 120, "the head's GCS port", head)
    worker = ManagedProcess(
        "ray-worker", node_argv(f"--address={address}"), tmp_path / "ray-worker.log", env=env, cwd=str(REPO)
    )
    no_leftovers.append(worker.start())
    wait_until(lambda: len(cluster_view(address, env)["alive"]) == 2, 180, "two live nodes", worker, interval=3)

    api_port, inference_port = free_port("0.0.0.0"), free_port("0.0.0.0")
    services_run, trainer_run = tmp_path / "services", tmp_path / "trainer"
    services = ManagedProcess(
        "services-launcher",
        launcher_argv(
            tiny_model,
            services_run,
            "atropos.launcher.role=services",
            "atropos.launcher.api_host=0.0.0.0",
            f"atropos.launcher.api_port={api_port}",
            "atropos.launcher.api_allow=[198.51.100.0/24]",  # loopback is always in; this host's address is not
            f"atropos.launcher.endpoint_url=http://127.0.0.1:{inference_port}",
            "atropos.launcher.trainer_gone_s=20",
        ),
        tmp_path / "services-launcher.log",
        env=env,
    )
    no_leftovers.append(services.start())
    wait_until(lambda: _status(f"http://127.0.0.1:{api_port}/status") == 200, 120, "the services' API", services)

    trainer = ManagedProcess(
        "trainer-launcher",
        launcher_argv(
            tiny_model,
            trainer_run,
            "atropos.launcher.role=trainer",
            f"atropos.launcher.inference_port={inference_port}",
            "atropos.inference.host=0.0.0.0",
            f"atropos.api_url=http://127.0.0.1:{api_port}",
            f"+ray_kwargs.ray_init.address={address}",
            "trainer.nnodes=2",
            "trainer.n_gpus_per_node=1",
            # each of the 2 ranks gets 8 / 2 = 4 sequences a step: the micro batches must divide that
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
        ),
        tmp_path / "trainer-launcher.log",
        env=env,
    )
    no_leftovers.append(trainer.start())
    endpoint = f"http://{outside}:{inference_port}"
    wait_until(lambda: _status(f"{endpoint}/health") == 200, 600, "the trainer's endpoint", trainer, interval=2)

    # The endpoint, reached from this host's address, asks the token; the API refuses a client outside its list.
    body = {"prompt": {"prompt_token_ids": [72, 105]}, "n": 1, "max_tokens": 2}
    assert requests.post(f"{endpoint}/generate", json=body, timeout=30).status_code == 401
    auth = {"Authorization": f"Bearer {TOKEN}"}
    served = requests.post(f"{endpoint}/generate", json=body, headers=auth, timeout=300)
    assert served.status_code == 200 and len(served.json()["token_ids"][0]) >= 1
    refused = requests.get(f"http://{outside}:{api_port}/status", timeout=30)
    assert refused.status_code == 403

    assert wait_exit(trainer, 900) == 0
    rows = trainer_rows(read_metrics(RunDir(trainer_run).metrics_file))
    assert [r["step"] for r in rows] == [1, 2, 3], RunDir(trainer_run).trainer_log.read_text()[-3000:]
    assert rows[-1]["atropos/endpoint/unauthorized_requests"] >= 1
    assert wait_exit(services, 120) == 0  # the trainer's endpoint went away: API and envs stopped
    assert json.loads(RunDir(services_run).guard_stats.read_text())["refused_requests"] >= 1
    assert json.loads(RunDir(services_run).env_ids.read_text()) == {"0": "one_word", "1": "one_word_pairs"}

    view = cluster_view(address, env)  # the cluster outlives the trainer; dead actors keep their node in the table
    assert len(view["alive"]) == 2 and view["worker_nodes"] == view["alive"], view
    trainer_log = RunDir(trainer_run).trainer_log.read_text()
    assert "Started a local Ray instance" not in trainer_log  # it joined the cluster
    for proc in (worker, head):
        proc.stop(timeout=30)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return 0
