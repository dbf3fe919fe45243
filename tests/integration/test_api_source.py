"""ApiGroupSource against a real guarded `run-api`: every fetched group is on disk before it is handed out, the
policy-lag cap drops what the endpoint's ledger says is too old, ready batches are prefetched after a step, and after
a crash a new source trains the spooled groups first."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import requests

from recipe.atropos.endpoint.ledger import CompletionLedger
from recipe.atropos.rundir import SpoolDir
from recipe.atropos.sources.api import ApiGroupSource
from recipe.atropos.sources.fifo import FifoBatcher
from recipe.atropos.spool import GroupSpool
from recipe.atropos.staleness import LagMeter
from recipe.atropos.transport.client import AtroposClient
from tests.factories import group

REGISTRATION = {"batch_size": 2, "max_token_len": 64, "num_steps": 10}


def make_source(url: str, spool_dir: Path, ledger: CompletionLedger, step: dict) -> ApiGroupSource:
    return ApiGroupSource(
        AtroposClient(url, current_step=lambda: step["now"], vocab_size=1000),
        FifoBatcher(batch_size=2),
        LagMeter(ledger.sequence_version, max_policy_lag=1),
        registration=REGISTRATION,
        poll_timeout_s=10,
        spool=GroupSpool(spool_dir),
        drain_max_sequences=4,
    )


def post(url: str, first: int) -> None:
    requests.post(f"{url}/scored_data", json=group(first=first), timeout=5).raise_for_status()


def pending_firsts(spool_dir: Path) -> list[int]:
    files = sorted(SpoolDir(spool_dir).pending.glob("*.json"))
    return [json.loads(f.read_text())["group"]["tokens"][0][0] for f in files]


@pytest.mark.timeout(120)
def test_spool_lag_cap_prefetch_and_resume(make_run_api, tmp_path: Path) -> None:
    api = make_run_api(guard={"vocab_size": 1000, "batch_size": 2}).start()
    spool_dir, ledger, step = tmp_path / "spool", CompletionLedger(), {"now": 0}
    source = make_source(api.url, spool_dir, ledger, step)
    source.start(0)
    assert source.registered_step == 0

    # step 1: the group is on disk under the step it was fetched in before the trainer sees it
    post(api.url, first=10)
    step["now"] = 1
    metrics: dict[str, float] = {}
    (got,) = source.next_groups(1, metrics)
    assert got.tokens[0][0] == 10 and pending_firsts(spool_dir) == [10]
    assert json.loads(next(SpoolDir(spool_dir).pending.glob("*.json")).read_text())["fetched_step"] == 1
    assert metrics["atropos/polls"] >= 1 and metrics["atropos/policy_lag_unknown"] == 2.0
    source.trained([got], 1)
    source.checkpointed(1)
    assert pending_firsts(spool_dir) == []

    # after step 1's weight push: a ready batch is fetched into the spool without waiting
    post(api.url, first=20)
    source.prefetch(1)
    assert pending_firsts(spool_dir) == [20]

    # step 4 trains version 3; the group at the front was sampled by version 0 (lag 3 > cap 1): dropped, set aside
    for tokens in got.tokens:
        ledger.record(tokens[:2], tokens[2:], 0)
    source.batcher.add([got], front=True)
    post(api.url, first=30)
    step["now"] = 4
    metrics = {}
    chosen = source.next_groups(4, metrics)
    assert [g.tokens[0][0] for g in chosen] == [20]  # prefetched: no poll needed
    assert metrics["atropos/polls"] == 0.0 and metrics["atropos/stale_groups_dropped"] == 1.0

    # crash before step 4 is trained: a new source registers at the checkpoint's step and trains the spool first
    again = make_source(api.url, spool_dir, CompletionLedger(), step)
    again.registered_step = 1  # as start(1) would record; the API keeps its registration from the first source
    again.resume(1)
    assert [g.tokens[0][0] for g in again.batcher.pending_groups()] == [20]
    with pytest.raises(RuntimeError, match="registered with the Atropos API at step 1 but the checkpoint"):
        again.resume(2)
    assert source.metrics()["atropos/spool_written"] == 2.0
