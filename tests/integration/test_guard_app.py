"""The guard's FastAPI app in-process (Starlette's TestClient, atroposlib's app mounted under it, state reset per
test): a body is read once (gzip, JSON) and the group parsed from it is what atroposlib queues, with the journal's id;
a group that waited on disk is queued from its journal line; typed bodies answer as before; every path the guard does
not change is atroposlib's; concurrent posts share one fsync, and none is answered before the fsync covering it."""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from atroposlib.api import server
from fastapi.testclient import TestClient
from starlette.datastructures import State

from recipe.atropos.guard.journal import GroupCommit, GroupJournal, journal_ids
from recipe.atropos.guard.routes import build_app
from recipe.atropos.guard.state import GuardSettings, GuardState
from recipe.atropos.schema import GROUP_ID_KEY

VOCAB, BATCH = 1000, 8
REGISTRATION = {"wandb_group": "g", "wandb_project": "p", "batch_size": BATCH, "max_token_len": 64}
REGISTRATION |= {"checkpoint_dir": "", "save_checkpoint_interval": -1, "starting_step": 0, "num_steps": 10}


def group(n: int = 4, first: int = 10) -> dict:
    """A valid group of ``n`` sequences ``[first, first+1, 100+i, 200+i]``, the prompt masked."""
    tokens = [[first, first + 1, 100 + i, 200 + i] for i in range(n)]
    masks = [[-100, -100, t[2], t[3]] for t in tokens]
    return {"tokens": tokens, "masks": masks, "scores": [float(i) for i in range(n)], "group_overrides": {}}


@pytest.fixture()
def guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[TestClient, GuardState]]:
    """A registered trainer, a memory bound of one batch (8 sequences), a fresh atroposlib state."""
    monkeypatch.setattr(server.app, "state", State())
    state = GuardState(
        GuardSettings(
            vocab_size=VOCAB,
            batch_size=BATCH,
            rejected_file=str(tmp_path / "rejected.jsonl"),
            stats_file=str(tmp_path / "stats.json"),
            journal_dir=str(tmp_path / "journal"),
            max_queued_sequences=BATCH,
        )
    )
    with TestClient(build_app(state)) as client:
        assert client.post("/register", json=REGISTRATION).status_code == 200
        assert client.get("/batch").json() == {"batch": None}  # the trainer's first call starts the API
        yield client, state
    state.journal.close()


def test_a_gzip_group_is_journaled_and_queued_with_its_id(guard, tmp_path: Path) -> None:
    client, _ = guard
    body = gzip.compress(json.dumps(group(first=10)).encode())
    answer = client.post("/scored_data", content=body, headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 200, answer.text
    gid = answer.json()["id"]
    (queued,) = server.app.state.queue
    assert queued["tokens"] == group(first=10)["tokens"] and queued["group_overrides"] == {GROUP_ID_KEY: gid}
    (line,) = (tmp_path / "journal" / "groups.jsonl").read_text().splitlines()
    row = json.loads(line)
    assert row["group"] == group(first=10) and row["id"] == gid  # on disk as posted, the id in its row
    assert json.loads((tmp_path / "stats.json").read_text())["accepted_groups"] == 1  # replaced at each change


def test_a_group_past_the_memory_bound_is_queued_from_its_journal_line(guard) -> None:
    client, state = guard
    ids = [client.post("/scored_data", json=group(first=f)).json()["id"] for f in (10, 20, 30)]
    assert [g["group_overrides"][GROUP_ID_KEY] for g in server.app.state.queue] == ids[:2]  # 4 + 4: the bound
    assert state.journal.depth()["backlog_groups"] == 1
    batch = client.get("/batch").json()["batch"]  # the two in memory; then the third is read back from disk
    assert [g["group_overrides"][GROUP_ID_KEY] for g in batch] == ids[:2]
    (queued,) = server.app.state.queue
    assert queued["tokens"] == group(first=30)["tokens"] and queued["group_overrides"] == {GROUP_ID_KEY: ids[2]}
    assert state.journal.depth()["backlog_groups"] == 0


def test_a_body_that_does_not_gunzip_is_refused_as_body_counted_and_kept(guard, tmp_path: Path) -> None:
    client, state = guard
    answer = client.post("/scored_data", content=b"not gzip", headers={"Content-Encoding": "gzip"})
    assert answer.status_code == 422 and answer.json()["field"] == "body"
    assert state.rejected["body"] == 1
    (kept,) = (tmp_path / "rejected.jsonl").read_text().splitlines()
    assert json.loads(kept)["group"] == "not gzip"


def test_a_post_cut_by_a_disconnect_is_dropped_quietly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.app, "state", State())
    state = GuardState(GuardSettings(vocab_size=VOCAB, batch_size=BATCH, journal_dir=str(tmp_path / "journal")))
    messages = [{"type": "http.request", "body": b'{"tokens": [[1, 2', "more_body": True}, {"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return messages.pop(0)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/scored_data", "headers": [], "query_string": b""}
    asyncio.run(build_app(state)(scope | {"client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}, receive, send))
    assert sent[0]["status"] == 400  # never read: the client is gone
    assert state.counters()["rejected_groups"] == 0 and state.counters()["journal_groups"] == 0


def test_a_nan_literal_is_read_and_refused_naming_the_field(guard) -> None:
    client, _ = guard
    body = json.dumps({**group(), "scores": [float("nan"), 0.0, 1.0, 0.0]})  # Python's json writes NaN
    answer = client.post("/scored_data", content=body)
    assert answer.status_code == 422 and answer.json()["field"] == "scores"
    assert server.app.state.queue == []


def test_typed_bodies_answer_in_their_own_shapes(guard) -> None:
    client, _ = guard
    bad_ack = client.post("/ack", json={"ids": [1, 2]})
    assert bad_ack.status_code == 422 and bad_ack.json()["field"] == "ids"
    bad_env = client.post("/register-env", json={"desired_name": "e"})  # FastAPI's answer, as atroposlib's app gives
    assert bad_env.status_code == 422 and {e["loc"][-1] for e in bad_env.json()["detail"]} >= {"group_size"}
    env = {"max_token_length": 64, "desired_name": "e", "weight": 1.0, "group_size": 4}
    assert client.post("/register-env", json=env).json()["env_id"] == 0
    assert client.request("GET", "/status-env", json={"env_id": 0}).json()["queue_size"] == 0


def test_every_other_path_is_atroposlibs(guard) -> None:
    client, _ = guard
    assert client.get("/info").json() == {"batch_size": BATCH, "max_token_len": 64}
    assert client.get("/status").json() == {"current_step": 0, "queue_size": 0}
    assert client.get("/wandb_info").json() == {"group": "g", "project": "p"}


def test_concurrent_posts_share_one_fsync_and_each_answer_waits_for_it(tmp_path: Path) -> None:
    journal = GroupJournal(tmp_path)
    commit = GroupCommit(journal)
    covered: list[int] = []  # lines in the file as each fsync starts (what it makes durable)
    finished: list[int] = []

    def sync() -> None:
        covered.append(len((tmp_path / "groups.jsonl").read_bytes().splitlines()))
        time.sleep(0.05)  # a slow disk: the other posts are written meanwhile
        finished.append(1)

    journal.sync = sync  # type: ignore[method-assign]

    async def post(first: int) -> int:
        journal.append([group(first=first)], durable=False)
        await commit.durable(commit.wrote())
        return len(finished)  # fsyncs finished when this post could be answered

    async def five_posts() -> list[int]:
        first = asyncio.create_task(post(10))
        await asyncio.sleep(0.01)  # its fsync is running
        return await asyncio.gather(first, *(post(f) for f in (20, 30, 40, 50)))

    assert asyncio.run(five_posts()) == [1, 2, 2, 2, 2]
    assert covered == [1, 5]  # the first post's fsync, then one for the four written while it ran


def test_a_journal_line_stays_one_line_whatever_the_text_in_a_group(tmp_path: Path) -> None:
    text = "a\u2028b\x85c\u2029d"  # line breaks to str.splitlines() (journal_ids reads the file with it)
    journal = GroupJournal(tmp_path)
    ids = journal.append([{**group(), "messages": [[{"role": "user", "content": text}]]}])
    assert journal_ids(tmp_path) == (set(ids), set(ids))
    (read,) = journal.take(100, at_least_one=True)
    assert read["messages"][0][0]["content"] == text


def test_a_posted_document_is_journaled_as_it_came_unless_it_spans_lines(tmp_path: Path) -> None:
    flat = json.dumps({**group(first=10), "generation_params": {"t": float("nan")}}).encode()  # NaN outside the checks
    pretty = json.dumps(group(first=20), indent=1).encode()
    journal = GroupJournal(tmp_path)
    ids = journal.append([json.loads(flat), json.loads(pretty)], posted=[flat, pretty])
    lines = (tmp_path / "groups.jsonl").read_bytes().splitlines()
    assert flat in lines[0] and pretty not in lines[1] and len(lines) == 2
    journal.close()
    again = GroupJournal(tmp_path)  # as after a restart: both lines whole, each group with its id
    assert [g["group_overrides"][GROUP_ID_KEY] for g in again.take(100, at_least_one=True)] == ids
    assert journal_ids(tmp_path) == (set(ids), set(ids))
