"""AtroposClient against a real `run-api` process on 127.0.0.1 (fresh per module)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import requests

from recipe.atropos.launcher.processes import free_port
from recipe.atropos.schema import GroupValidationError, validate_group
from recipe.atropos.transport.client import AtroposAPIError, AtroposClient
from tests.factories import X, group


def register(client: AtroposClient, batch_size: int, starting_step: int = 0) -> None:
    client.register(batch_size=batch_size, max_token_len=64, starting_step=starting_step, num_steps=10)


def test_register_post_poll_roundtrip(run_api) -> None:
    client = AtroposClient(run_api.url)
    register(client, batch_size=4, starting_step=7)
    assert client.info()["batch_size"] == 4
    assert client.status()["current_step"] == 7  # the real starting step, e.g. after a resume
    assert client.get_batch() is None  # nothing posted yet
    requests.post(f"{run_api.url}/scored_data", json=group(first=1), timeout=5).raise_for_status()
    requests.post(f"{run_api.url}/scored_data_list", json=[group(first=3)], timeout=5).raise_for_status()
    groups = client.poll_batch(timeout=10)
    assert sorted(g.tokens[0][0] for g in groups) == [1, 3]
    assert sum(g.size for g in groups) == 4
    assert groups[0].inference_logprobs[0] == [1.0, 1.0, -0.5, -0.25]


MALFORMED = {
    "empty group": ({"tokens": [], "masks": [], "scores": []}, "tokens"),
    "empty sequence": ({"tokens": [[]], "masks": [[]], "scores": [1.0]}, "tokens"),
    "negative token id": ({"tokens": [[1, -5]], "masks": [[X, -5]], "scores": [1.0]}, "tokens"),
    "masks count": ({"tokens": [[1, 2], [1, 3]], "masks": [[X, 2]], "scores": [1.0, 0.0]}, "masks"),
    "masks length": ({"tokens": [[1, 2]], "masks": [[X, 2, 3]], "scores": [1.0]}, "masks"),
    "mask value not token": ({"tokens": [[1, 2]], "masks": [[X, 7]], "scores": [1.0]}, "masks"),
    "scores count": ({"tokens": [[1, 2]], "masks": [[X, 2]], "scores": [1.0, 0.0]}, "scores"),
    "nan score": ({"tokens": [[1, 2]], "masks": [[X, 2]], "scores": [float("nan")]}, "scores"),
    "advantages length": (
        {"tokens": [[1, 2]], "masks": [[X, 2]], "scores": [1.0], "advantages": [[0.1]]},
        "advantages",
    ),
    "inf advantage": (
        {"tokens": [[1, 2]], "masks": [[X, 2]], "scores": [1.0], "advantages": [[0.0, float("inf")]]},
        "advantages",
    ),
    "logprobs length": (
        {"tokens": [[1, 2]], "masks": [[X, 2]], "scores": [1.0], "inference_logprobs": [[1.0]]},
        "inference_logprobs",
    ),
    "overrides count": ({"tokens": [[1, 2]], "masks": [[X, 2]], "scores": [1.0], "overrides": [{}, {}]}, "overrides"),
    "tokens missing": ({"masks": [[X, 2]], "scores": [1.0]}, "tokens"),
    "not an object": ([1, 2, 3], "group"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_groups_are_rejected_naming_the_field(case: str) -> None:
    raw, field = MALFORMED[case]
    with pytest.raises(GroupValidationError) as info:
        validate_group(raw)
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_malformed_groups_from_the_api_are_counted_kept_and_do_not_crash(make_run_api, tmp_path: Path) -> None:
    api = make_run_api().start()  # a fresh API: only its first registration counts
    rejected_file = tmp_path / "rejected.jsonl"
    client = AtroposClient(api.url, rejected_groups_file=str(rejected_file))
    register(client, batch_size=4)
    bad = group(first=5)
    bad["scores"] = [1.0]  # 1 score for 2 sequences (the server does not check lengths)
    requests.post(f"{api.url}/scored_data_list", json=[group(first=1), bad], timeout=5).raise_for_status()
    groups = client.poll_batch(timeout=10)
    assert [g.tokens[0][0] for g in groups] == [1]
    metrics = client.metrics()
    assert metrics["atropos/rejected_groups"] == 1.0 and metrics["atropos/rejected_groups/scores"] == 1.0
    kept = [json.loads(line) for line in rejected_file.read_text().splitlines()]
    assert kept[0]["field"] == "scores" and kept[0]["group"]["tokens"][0][0] == 5
    assert client.rejected.total == 1 and client.rejected.counts == {"scores": 1}


def test_api_down_then_up_the_client_waits_and_recovers(make_run_api) -> None:
    api = make_run_api()
    client = AtroposClient(api.url, request_timeout_s=2)
    with pytest.raises(AtroposAPIError, match="unreachable"):
        client.status()

    def start_then_feed() -> None:
        time.sleep(0.5)  # the client polls the API while it is down: this, then the API's own start-up
        api.start()
        register(AtroposClient(api.url), batch_size=2)
        requests.post(f"{api.url}/scored_data", json=group(), timeout=5).raise_for_status()

    feeder = threading.Thread(target=start_then_feed)
    feeder.start()
    try:
        groups = client.poll_batch(timeout=90, interval=0.2, max_interval=1.0)
        assert sum(g.size for g in groups) == 2
    finally:
        feeder.join()


def test_poll_timeout_names_the_api_and_the_likely_causes(tmp_path: Path) -> None:
    client = AtroposClient(f"http://127.0.0.1:{free_port()}", request_timeout_s=1, retries=0)
    with pytest.raises(AtroposAPIError, match="no batch from .* within 1 s"):
        client.poll_batch(timeout=1, interval=0.2)


def test_error_payload_before_registration_is_an_error(make_run_api) -> None:
    api = make_run_api().start()
    with pytest.raises(AtroposAPIError, match="error"):
        AtroposClient(api.url).get_batch()


def test_poll_asks_an_empty_queue_at_a_fixed_interval_and_backs_off_only_on_errors(monkeypatch) -> None:
    """Empty answers: each wait is `interval` (a forming batch is seen within it); failures: 0.1, 0.2, 0.4, 0.5."""
    client = AtroposClient("http://127.0.0.1:9", request_timeout_s=1, retries=0)
    answers: list[object] = [None] * 4 + [AtroposAPIError("down")] * 5 + [None, ["a group"]]
    sleeps: list[float] = []

    def get_batch() -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(client, "get_batch", get_batch)
    monkeypatch.setattr("recipe.atropos.transport.client.time.sleep", sleeps.append)
    assert client.poll_batch(timeout=60, interval=0.1, max_interval=0.5) == ["a group"]
    assert sleeps == pytest.approx([0.1] * 4 + [0.1, 0.2, 0.4, 0.5, 0.5] + [0.1])
