"""The launcher's console watches: exceptions found in environment logs (real tracebacks, atroposlib's own error lines),
once each, and the waiting line's wording and cadence."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from recipe.atropos.launcher.watch import MAX_PER_ENV, EnvLogWatch, WaitWatch, exception_lines
from recipe.atropos.waiting import wait_line


def _traceback_of(func) -> str:  # noqa: ANN001
    try:
        func()
    except Exception:
        return traceback.format_exc()
    raise AssertionError("did not raise")


def _chained() -> None:
    try:
        {}["tokens"]
    except KeyError as error:
        raise TypeError('can only concatenate list (not "BatchEncoding") to list') from error


def _during_handling() -> None:
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        raise ValueError("second") from None


def test_the_last_exception_of_a_chain_is_reported_and_a_pending_traceback_waits() -> None:
    text = "INFO starting\n" + _traceback_of(_chained) + "INFO still alive\n"
    found, done = exception_lines(text.splitlines())
    assert found == ['TypeError: can only concatenate list (not "BatchEncoding") to list']  # not the KeyError
    assert done == len(text.splitlines())
    # The process died right after its traceback: nothing follows, so the chain may go on ... until the log stops.
    dying = _traceback_of(_during_handling).splitlines()
    assert exception_lines(dying) == ([], 0)
    assert exception_lines(dying, final=True)[0] == ["ValueError: second"]


def test_env_log_watch_names_each_new_exception_once(tmp_path: Path) -> None:
    log = tmp_path / "math.log"
    log.write_text("ERROR an earlier run's line: Error in collect_trajectories: old\n")
    watch = EnvLogWatch({"math": log})
    assert watch.scan() == []  # an earlier run's lines are not news
    # atroposlib's BaseEnv logs collect_trajectories' exceptions with the message only, through the root logger
    handler = logging.FileHandler(log)
    root = logging.getLogger("watch-test")
    root.addHandler(handler)
    try:
        for _ in range(3):
            root.error('Error in collect_trajectories: can only concatenate list (not "BatchEncoding") to list')
    finally:
        root.removeHandler(handler)
        handler.close()
    assert watch.scan() == [
        f'env math: Error in collect_trajectories: can only concatenate list (not "BatchEncoding") to list (log: {log})'
    ]
    assert watch.scan() == []
    with open(log, "a") as fh:
        fh.write(_traceback_of(_during_handling))  # the env died: its traceback is the last thing in the log
    assert watch.scan() == []  # the chain could still go on
    assert watch.scan() == [f"env math: ValueError: second (log: {log})"]  # the log stopped growing
    with open(log, "a") as fh:
        for i in range(MAX_PER_ENV + 3):
            fh.write(f"Scoring exception: number {i}\n")
    lines = watch.scan()  # 2 seen so far: 3 more, then one notice, then silence
    assert len(lines) == MAX_PER_ENV - 2 + 1 and "more exceptions than" in lines[-1]
    assert watch.scan() == []


def test_wait_line_wording() -> None:
    guard = {
        "queue_groups": 0,
        "envs": {"0": {"received": 3, "rejected": 3, "last_post": 90.0, "last_rejection": "group_size: 3 sequences"}},
    }
    health = {"stats": {"completions": 272}}
    line = wait_line(3, 60.4, guard=guard, status=None, health=health, env_names={"0": "gs", "1": "math"}, now=100.0)
    assert line == (
        "waiting 60 s for step 3 | API queue 0 groups | env gs: 3 groups received (3 rejected), last post 10 s ago, "
        "last rejection: group_size: 3 sequences | env math: 0 groups received (0 rejected), last post never | "
        "endpoint: 272 completions served"
    )
    assert wait_line(1, 5, guard=None, status=None, health=None, env_names={}) == (
        "waiting 5 s for step 1 | API: no answer | no environment registered | endpoint: no answer"
    )
    plain = wait_line(1, 5, guard=None, status={"queue_size": 2}, health=None, env_names={"0": "a"})
    assert "API queue 2 groups | env a: no per-env counts (plain run-api)" in plain


def test_wait_watch_prints_every_interval_while_the_wait_file_names_a_step(tmp_path: Path) -> None:
    now = [1000.0]
    wait_file = tmp_path / "trainer_wait.json"
    watch = WaitWatch(
        wait_file,
        api_url="http://127.0.0.1:9",  # nothing listens: the line says so
        inference_url="http://127.0.0.1:9",
        env_ids_file=tmp_path / "env_ids.json",
        interval_s=30,
        clock=lambda: now[0],
    )
    wait_file.write_text(json.dumps({"step": 2, "since": 990.0}))  # an earlier launcher's trainer
    now[0] = 1100.0
    assert watch.line() is None
    wait_file.write_text(json.dumps({"step": 3, "since": 1080.0}))
    assert watch.line() is None  # 20 s: not yet
    now[0] = 1110.0
    assert watch.line().startswith("waiting 30 s for step 3 | API: no answer")
    now[0] = 1130.0
    assert watch.line() is None
    now[0] = 1140.0
    assert watch.line().startswith("waiting 60 s for step 3")
    wait_file.unlink()  # the step got its data
    now[0] = 1200.0
    assert watch.line() is None


def test_groups_an_env_drops_itself_are_named_once_with_their_cause(tmp_path: Path) -> None:
    log = tmp_path / "equal.log"
    log.write_text("")
    watch = EnvLogWatch({"equal": log})
    with open(log, "a") as fh:  # atroposlib's BaseEnv warnings, as its logger prints them
        fh.write("Scores are the same in a group, skipping...\n" * 3)
        fh.write("Token length is too long in a group, skipping...\n")
    lines = watch.scan()
    assert len(lines) == 2
    assert lines[0].startswith("env equal: the env drops every group whose scores are all equal")
    assert "env.ensure_scores_are_not_same" in lines[0] and "data.max_prompt_length" in lines[1]
    with open(log, "a") as fh:
        fh.write("Scores are the same in a group, skipping...\n")
    assert watch.scan() == []
