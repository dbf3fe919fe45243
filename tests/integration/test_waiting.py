"""The waiting line from the real services: the guarded API's per-env counters, the endpoint's completions served, the
env names the launcher wrote; the trainer's poll timeout repeats it and leaves the wait file naming the step."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from recipe.atropos.endpoint.backends import Completion, SamplingParams
from recipe.atropos.endpoint.ledger import CompletionLedger
from recipe.atropos.endpoint.server import InferenceEndpoint
from recipe.atropos.sources.api import ApiGroupSource
from recipe.atropos.sources.fifo import FifoBatcher
from recipe.atropos.staleness import LagMeter
from recipe.atropos.transport.client import AtroposAPIError, AtroposClient
from recipe.atropos.waiting import WaitReport, read_wait
from tests.helpers import wait_until
from tests.integration.test_client import group


class Echo:
    """A stand-in policy: every completion is two tokens."""

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> Completion:
        return Completion(token_ids=[5, 6], log_probs=[-0.1, -0.2], finish_reason="stop")


def register_env(api_url: str, name: str, group_size: int) -> int:
    body = {"max_token_length": 64, "desired_name": name, "weight": 1.0, "group_size": group_size}
    body["min_batch_allocation"] = None
    return int(requests.post(f"{api_url}/register-env", json=body, timeout=5).json()["env_id"])


@pytest.mark.timeout(120)
def test_the_wait_line_and_the_poll_timeout_name_each_env_the_queue_and_the_endpoint(
    make_run_api, tmp_path: Path
) -> None:
    api = make_run_api(guard={"vocab_size": 1000, "batch_size": 8}).start()
    endpoint = InferenceEndpoint(Echo(), port=0, max_tokens_cap=4, policy_version=0).start()
    try:
        env_ids_file, wait_file = tmp_path / "env_ids.json", tmp_path / "trainer_wait.json"
        waits = WaitReport(api.url, endpoint.url, str(env_ids_file), str(wait_file))
        source = ApiGroupSource(
            AtroposClient(api.url, vocab_size=1000),
            FifoBatcher(batch_size=8),
            LagMeter(CompletionLedger().sequence_version, max_policy_lag=None),
            registration={"batch_size": 8, "max_token_len": 64, "num_steps": 10},
            poll_timeout_s=2,
            waits=waits,
        )
        source.start(0)  # registers, and its first GET /batch admits environments
        math, silent = register_env(api.url, "math", 4), register_env(api.url, "silent", 4)
        env_ids_file.write_text(json.dumps({str(math): "math", str(silent): "silent"}))
        # math posts one good group of 4 and one of 3 (cannot pack into 8: rejected); silent posts nothing
        assert requests.post(f"{api.url}/scored_data", json=group(n=4, env_id=math), timeout=5).ok
        assert requests.post(f"{api.url}/scored_data", json=group(n=3, env_id=math), timeout=5).status_code == 422
        body = {"prompt": {"prompt_token_ids": [1, 2]}, "n": 3, "max_tokens": 2}
        assert requests.post(f"{endpoint.url}/generate", json=body, timeout=10).ok

        started = time.time()
        with ThreadPoolExecutor(1) as pool:  # 4 of 8 sequences queued: no batch within the 2 s poll timeout
            waiting = pool.submit(source.next_groups, 3, {})
            wait_until(lambda: read_wait(wait_file) is not None, 2.0, "the wait file")
            wait = read_wait(wait_file)  # while the step waits, the file names it
            with pytest.raises(AtroposAPIError) as error:
                waiting.result(timeout=30)
        assert wait["step"] == 3 and started - 1 <= wait["since"] <= time.time()
        assert not wait_file.exists()  # the trainer gave up: it is not waiting any more
        message = str(error.value)
        assert message.startswith(f"no batch from {api.url} within 2 s")
        line = message.splitlines()[-1]
        assert line.startswith("waiting 2 s for step 3 | API queue 1 groups | env math: 2 groups received (1 rejected)")
        assert "last rejection: group_size: 3 sequences do not divide the batch size 8" in line
        assert "| env silent: 0 groups received (0 rejected), last post never | endpoint: 3 completions served" in line

        # the step gets its data: the wait file goes
        assert requests.post(f"{api.url}/scored_data", json=group(n=4, env_id=math, first=20), timeout=5).ok
        assert len(source.next_groups(3, {})) == 2
        assert not wait_file.exists()
    finally:
        endpoint.stop()
