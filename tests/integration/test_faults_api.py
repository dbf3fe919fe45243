"""Fault suite, HTTP level: malformed ScoredData against the real guarded API (``python -m recipe.atropos.guard.app``:
atroposlib's app behind validation).

One guarded API process serves the whole module (vocabulary 1000, batch size 8). Every malformed input must get 422
naming the field, be counted by field in ``/guard/stats``, be kept in the rejected-groups file, and never reach the
queue: after all of them, valid groups still form batches and ``GET /batch`` answers 200.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import requests

from recipe.atropos.launcher.processes import free_port
from recipe.atropos.transport.client import AtroposClient
from tests.factories import X, group
from tests.helpers import RunApi

VOCAB = 1000
BATCH = 8


def ok(**extra: object) -> dict:
    """A valid group of 4 (divides the batch size 8)."""
    return group(n=4, **extra)


def seq_field(name: str, values: list) -> dict:
    body = ok()
    body[name] = [values] + body[name][1:]
    return body


# name -> (request body for POST /scored_data, field named in the 422)
MALFORMED: dict[str, tuple[object, str]] = {
    "empty group": ({"tokens": [], "masks": [], "scores": []}, "tokens"),
    "empty sequence": ({"tokens": [[]], "masks": [[]], "scores": [1.0]}, "tokens"),
    "negative token id": (seq_field("tokens", [1, -5, 100, 200]), "tokens"),
    "token id = vocab size": (
        {**ok(), "tokens": [[1, 2, VOCAB, 5]] * 4, "masks": [[X, X, VOCAB, 5]] * 4},
        "tokens",
    ),
    "token id far past vocab": (
        {**ok(), "tokens": [[1, 2, 10**9, 5]] * 4, "masks": [[X, X, 10**9, 5]] * 4},
        "tokens",
    ),
    "float token id": (seq_field("tokens", [1, 2.5, 100, 200]), "tokens"),
    "tokens missing": ({"masks": [[X, 2]], "scores": [1.0]}, "tokens"),
    "tokens not a list": ({**ok(), "tokens": "hello"}, "tokens"),
    "masks count": ({**ok(), "masks": ok()["masks"][:3]}, "masks"),
    "masks length": (seq_field("masks", [X, X, 100]), "masks"),
    "mask value not the token": (seq_field("masks", [X, X, 7, 200]), "masks"),
    "masks missing": ({"tokens": [[1, 2]], "scores": [1.0]}, "masks"),
    "scores count": ({**ok(), "scores": [1.0, 0.0]}, "scores"),
    "nan score": ({**ok(), "scores": [float("nan"), 0.0, 1.0, 0.0]}, "scores"),
    "inf score": ({**ok(), "scores": [float("inf"), 0.0, 1.0, 0.0]}, "scores"),
    "score is a word": ({**ok(), "scores": ["high", 0.0, 1.0, 0.0]}, "scores"),
    "advantages count": ({**ok(), "advantages": [[0.0] * 4]}, "advantages"),
    "advantages length": ({**ok(), "advantages": [[0.1]] * 4}, "advantages"),
    "inf advantage": ({**ok(), "advantages": [[0.0, 0.0, float("inf"), 0.0]] * 4}, "advantages"),
    "nan inference logprob": (
        {**ok(), "inference_logprobs": [[1.0, 1.0, float("nan"), -0.1]] * 4},
        "inference_logprobs",
    ),
    "inference logprobs length": ({**ok(), "inference_logprobs": [[1.0]] * 4}, "inference_logprobs"),
    "ref logprobs length": ({**ok(), "ref_logprobs": [[0.0, 0.0]] * 4}, "ref_logprobs"),
    "overrides count": ({**ok(), "overrides": [{}]}, "overrides"),
    "group of 5 (cannot pack into 8)": (group(n=5), "group_size"),
    "group of 3 (cannot pack into 8)": (group(n=3), "group_size"),
    "group larger than the batch": (group(n=16), "group_size"),
    "not an object": ([1, 2, 3], "group"),
}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory):
    run = tmp_path_factory.mktemp("guarded")
    api = RunApi(
        port=free_port(),
        log_dir=run,
        guard={
            "vocab_size": VOCAB,
            "batch_size": BATCH,
            "rejected_file": run / "rejected.jsonl",
            "stats_file": run / "stats.json",
        },
    ).start()
    client = AtroposClient(api.url)
    client.register(batch_size=BATCH, max_token_len=64, starting_step=0, num_steps=10)
    try:
        yield api, run
    finally:
        api.stop()


def stats(api: RunApi) -> dict:
    return requests.get(f"{api.url}/guard/stats", timeout=5).json()


def post(api: RunApi, path: str, body: object) -> requests.Response:
    data = json.dumps(body)  # allow_nan: environments written in Python send NaN literals
    return requests.post(f"{api.url}{path}", data=data, headers={"Content-Type": "application/json"}, timeout=5)


def test_suite_has_at_least_twenty_distinct_malformed_inputs() -> None:
    assert len(MALFORMED) >= 20
    assert len({json.dumps(body, sort_keys=True) for body, _ in MALFORMED.values()}) == len(MALFORMED)


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_group_gets_422_naming_the_field_is_counted_and_kept(guarded, case: str) -> None:
    api, run = guarded
    body, field = MALFORMED[case]
    before = stats(api)
    answer = post(api, "/scored_data", body)
    assert answer.status_code == 422, answer.text
    assert answer.json()["field"] == field
    after = stats(api)
    assert after["rejected"].get(field, 0) == before["rejected"].get(field, 0) + 1
    assert after["rejected_groups"] == before["rejected_groups"] + 1
    assert after["queue_groups"] == before["queue_groups"]  # never entered the queue
    kept = [json.loads(line) for line in (run / "rejected.jsonl").read_text().splitlines()]
    assert kept[-1]["field"] == field


def test_not_json_and_bad_gzip_are_rejected_as_body(guarded) -> None:
    api, _ = guarded
    before = stats(api)["rejected"].get("body", 0)
    junk = requests.post(f"{api.url}/scored_data", data=b"{tokens: [", timeout=5)
    assert junk.status_code == 422 and junk.json()["field"] == "body"
    bad_gzip = requests.post(
        f"{api.url}/scored_data", data=b"not gzip", headers={"Content-Encoding": "gzip"}, timeout=5
    )
    assert bad_gzip.status_code == 422
    not_a_list = post(api, "/scored_data_list", ok())
    assert not_a_list.status_code == 422 and "expects a JSON list" in not_a_list.json()["reason"]
    assert stats(api)["rejected"]["body"] == before + 3


def test_a_list_queues_its_valid_groups_and_refuses_the_bad_ones(guarded) -> None:
    api, _ = guarded
    before = stats(api)
    bad = {**ok(), "scores": [float("nan")] * 4}
    answer = post(api, "/scored_data_list", [ok(first=1), bad, ok(first=3)])
    assert answer.status_code == 422
    body = answer.json()
    assert body["accepted"] == 2 and [r["index"] for r in body["rejected"]] == [1]
    after = stats(api)
    assert after["accepted_groups"] == before["accepted_groups"] + 2
    assert after["rejected"]["scores"] == before["rejected"]["scores"] + 1


def test_gzip_bodies_are_checked_too(guarded) -> None:
    api, _ = guarded
    before = stats(api)["rejected"].get("tokens", 0)
    bad = {**ok(), "tokens": [[1, 2, VOCAB + 5, 5]] * 4, "masks": [[X, X, VOCAB + 5, 5]] * 4}
    packed = gzip.compress(json.dumps(bad).encode())
    answer = requests.post(
        f"{api.url}/scored_data",
        data=packed,
        headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
        timeout=5,
    )
    assert answer.status_code == 422 and answer.json()["field"] == "tokens"
    assert stats(api)["rejected"]["tokens"] == before + 1
    good = gzip.compress(json.dumps(ok(first=7)).encode())
    accepted = requests.post(
        f"{api.url}/scored_data", data=good, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
    )
    assert accepted.status_code == 200, accepted.text


def test_after_all_the_bad_input_valid_groups_still_form_batches(guarded) -> None:
    """Runs last (file order): the queue holds only valid groups, so /batch answers 200 with whole batches."""
    api, _ = guarded
    client = AtroposClient(api.url, vocab_size=VOCAB)
    assert post(api, "/scored_data", ok(first=20)).status_code == 200
    assert post(api, "/scored_data", group(n=2, first=30)).status_code == 200
    assert post(api, "/scored_data", group(n=2, first=40)).status_code == 200
    seen = 0
    report = stats(api)
    assert report["can_form_batch"] is True
    while True:
        got = client.get_batch()
        if got is None:
            break
        assert sum(g.size for g in got) == BATCH
        seen += sum(g.size for g in got)
    final = stats(api)
    # everything accepted was served, apart from what cannot fill a last batch
    assert seen + final["queue_sequences"] == final["accepted_sequences"]
    assert client.metrics()["atropos/rejected_groups"] == 0.0  # nothing bad got through to the trainer


def test_env_registering_an_unpackable_group_size_is_reported(guarded) -> None:
    api, _ = guarded
    reg = {"max_token_length": 64, "desired_name": "fives", "weight": 1.0, "group_size": 5}
    assert requests.post(f"{api.url}/register-env", json=reg, timeout=5).status_code == 200
    assert stats(api)["unpackable_envs"][-1] == {"desired_name": "fives", "group_size": 5, "batch_size": BATCH}


def test_counters_survive_a_restart_of_the_guarded_api(guarded, make_run_api, tmp_path: Path) -> None:
    api = make_run_api(guard={"vocab_size": VOCAB, "batch_size": BATCH, "stats_file": tmp_path / "s.json"}).start()
    assert post(api, "/scored_data", {**ok(), "scores": [float("nan")] * 4}).status_code == 422
    api.stop()
    api.start()
    after = stats(api)
    assert after["starts"] == 2 and after["rejected"] == {"scores": 1}
