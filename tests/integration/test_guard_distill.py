"""The guarded API and the teacher fields, in-process (the guard's FastAPI app, atroposlib's app mounted under it): a
group whose ``distill_token_ids`` / ``distill_logprobs`` break the schema is refused with 422 naming the field and
kept in the rejected file; a valid one is journaled, queued by atroposlib and handed out by ``GET /batch`` with both
fields as posted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from atroposlib.api import server
from fastapi.testclient import TestClient
from starlette.datastructures import State

from recipe.atropos.guard.routes import build_app
from recipe.atropos.guard.state import GuardSettings, GuardState

VOCAB, BATCH = 1000, 4
REGISTRATION = {"wandb_group": "g", "wandb_project": "p", "batch_size": BATCH, "max_token_len": 64}
REGISTRATION |= {"checkpoint_dir": "", "save_checkpoint_interval": -1, "starting_step": 0, "num_steps": 10}


def group(ids: list, lps: list) -> dict:
    tokens = [[10, 11, 100 + i, 200 + i] for i in range(BATCH)]
    return {
        "tokens": tokens,
        "masks": [[-100, -100, t[2], t[3]] for t in tokens],
        "scores": [float(i) for i in range(BATCH)],
        "group_overrides": {},
        "distill_token_ids": [ids] * BATCH,
        "distill_logprobs": [lps] * BATCH,
    }


IDS = [[], [11, 5], [100, 7], [200, 9]]
LPS = [[], [-0.1, -2.5], [-0.2, -1.9], [-0.05, -3.0]]


@pytest.fixture()
def guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, Path]]:
    monkeypatch.setattr(server.app, "state", State())
    rejected = tmp_path / "rejected.jsonl"
    state = GuardState(
        GuardSettings(
            vocab_size=VOCAB,
            batch_size=BATCH,
            rejected_file=str(rejected),
            stats_file=str(tmp_path / "stats.json"),
            journal_dir=str(tmp_path / "journal"),
            max_queued_sequences=BATCH,
        )
    )
    with TestClient(build_app(state)) as client:
        assert client.post("/register", json=REGISTRATION).status_code == 200
        assert client.get("/batch").json() == {"batch": None}
        yield client, rejected
    state.journal.close()


@pytest.mark.parametrize(
    ("ids", "lps", "field"),
    [
        ([[], [11, 5], [100, 7], [200, 5000]], LPS, "distill_token_ids"),  # past the vocabulary
        (IDS, [[], [-0.1, 0.5], [-0.2, -1.9], [-0.05, -3.0]], "distill_logprobs"),  # a log-prob > 0
        (
            [[], [11, 5], [100, 7, 8], [200, 9]],
            [[], [-0.1, -2.5], [-0.2, -1.9, -3.0], [-0.05, -3.0]],
            "distill_token_ids",
        ),
        (IDS[:3], LPS[:3], "distill_token_ids"),  # 3 positions for 4 tokens
    ],
)
def test_a_bad_teacher_payload_is_refused_naming_the_field(guard, ids: list, lps: list, field: str) -> None:
    client, rejected = guard
    answer = client.post("/scored_data", json=group(ids, lps))
    assert answer.status_code == 422 and answer.json()["field"] == field, answer.text
    assert json.loads(rejected.read_text().splitlines()[0])["field"] == field
    assert client.get("/batch").json() == {"batch": None}  # nothing queued


def test_a_valid_teacher_payload_reaches_the_trainer_as_posted(guard) -> None:
    client, _ = guard
    assert client.post("/scored_data", json=group(IDS, LPS)).status_code == 200
    (handed,) = client.get("/batch").json()["batch"]
    assert handed["distill_token_ids"] == [IDS] * BATCH and handed["distill_logprobs"] == [LPS] * BATCH
