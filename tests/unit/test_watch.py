"""The launcher's console watches: exceptions and error lines found in environment logs (real tracebacks, atroposlib's
own error lines, an env's ``logger.error`` lines in any usual format), once each and counted; equal scores named as
such only for an env the endpoint served; the waiting line's wording (with the endpoint's per-env counters) and
cadence; what to check; the paragraph a trainer stops with, found in its log, and Ray's errors unwrapped."""

from __future__ import annotations

import json
import logging
import traceback
from pathlib import Path

from recipe.atropos.launcher.watch import (
    MAX_PER_ENV,
    ConsoleWatch,
    EnvLogWatch,
    WaitWatch,
    error_kind,
    error_line,
    exception_lines,
)
from recipe.atropos.rundir import RunDir
from recipe.atropos.waiting import STOPPED, check_line, failed_calls, find_stop, wait_line


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
    wait_file = RunDir(tmp_path).wait_file
    watch = WaitWatch(
        wait_file,
        api_url="http://127.0.0.1:9",  # nothing listens: the line says so
        inference_url="http://127.0.0.1:9",
        env_ids_file=RunDir(tmp_path).env_ids,
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


# ---- an env whose calls fail (the stock blackjack env against an endpoint that answered its chat calls 404) --------
FUTURE = "RetryError[<Future at 0x7f3a2c1d9e50 state=finished raised ClientResponseError>]"
BLACKJACK_HEALTH = {
    "status": "ok",
    "policy_version": 0,
    "paused": False,
    "final": False,
    "stats": {
        "requests": 89,
        "completions": 48,
        "failed_requests": 41,
        "routes": {"/v1/chat/completions": {"404": 41}, "/generate": {"200": 12, "422": 2}, "/v1/models": {"401": 1}},
        "envs": {
            "blackjack": {"routes": {"/v1/chat/completions": {"404": 41}}, "completions": 0},
            "math": {"routes": {"/generate": {"200": 12, "422": 2}}, "completions": 48},
        },
    },
}


def test_error_lines_of_any_usual_log_format_are_found_and_warnings_are_not() -> None:
    message = f"[Seed: 123456] LLM API error: {FUTURE}"
    assert error_line(message) == message  # logging's last resort: the message only
    assert error_line(f"ERROR:__main__:{message}") == message  # logging.basicConfig's default format
    assert error_line(f"2026-01-02 10:00:00,123 blackjack ERROR {message}") == message
    assert error_line("[10:00:00] CRITICAL  model gone") == "model gone"
    assert error_line("ValueError: bad seed") == "ValueError: bad seed"
    for quiet in (
        f"WARNING:__main__:{message}",  # a level shown, and not an error
        "2026-01-02 10:00:00,123 env INFO no error: all fine",
        "[Seed: 7] Invalid action parsed. Ending episode.",
        # the last line of a multi-line WARNING quoting the model's reply (stock blackjack env, invalid answer)
        "It's possible to hit'. Error: -ERROR-",
        "Client error: 422, not retrying",  # a drop: named by DROPS
        "The above exception was the direct cause of the following exception:",
        "    raise ValueError('x')",
    ):
        assert error_line(quiet) is None or quiet.startswith("The above"), quiet
    assert exception_lines(["The above exception was the direct cause of the following exception:"])[0] == []
    assert (
        error_kind(message) == "LLM API error: RetryError[<Future at 0x... state=finished raised ClientResponseError>]"
    )
    assert error_kind("[Seed: 99] Failed to reset environment with seed 123456: boom") == (
        "Failed to reset environment with seed N: boom"
    )


def test_an_envs_error_lines_are_named_once_and_counted_and_equal_scores_without_completions_say_so(
    tmp_path: Path,
) -> None:
    logs = {"blackjack": tmp_path / "blackjack.log", "math": tmp_path / "math.log"}
    for log in logs.values():
        log.write_text("")
    served = {"blackjack": 0, "math": 48}
    asked: list[str] = []

    def served_to(name: str) -> int:
        asked.append(name)
        return served[name]

    watch = EnvLogWatch(logs, served=served_to)
    handler = logging.FileHandler(logs["blackjack"])  # the stock env logs through its module's logger, message only
    env_logger = logging.getLogger("blackjack-env-test")
    env_logger.addHandler(handler)
    try:
        for seed in range(41):
            env_logger.error("[Seed: %d] LLM API error: %s", 100000 + seed, FUTURE.replace("3a2c", f"{seed:04x}"))
            env_logger.warning("Scores are the same in a group, skipping...")
    finally:
        env_logger.removeHandler(handler)
        handler.close()
    logs["math"].write_text("Scores are the same in a group, skipping...\n")
    lines = watch.scan()
    kind = "LLM API error: RetryError[<Future at 0x... state=finished raised ClientResponseError>]"
    assert lines[0] == f"env blackjack: {kind} (log: {logs['blackjack']})"  # once, not 41 times
    assert lines[1].startswith("env blackjack: the env got no completions from the endpoint (its calls fail")
    assert "scores are all equal" not in lines[1] and "ensure_scores_are_not_same" not in lines[1]
    assert lines[2].startswith("env math: the env drops every group whose scores are all equal")  # it got 48
    assert len(lines) == 3
    assert watch.notes() == {
        "blackjack": f'dropped itself: 41 groups (scores all equal), errors in its log: 41 x "{kind}"',
        "math": "dropped itself: 1 group (scores all equal)",
    }
    assert watch.summary() == [f'env blackjack: 41 x "{kind}" (log: {logs["blackjack"]})']
    # the math env's equal scores are named: the endpoint is not asked again for it
    asked.clear()
    with open(logs["math"], "a") as fh:
        fh.write("Scores are the same in a group, skipping...\n" * 2)
    assert watch.scan() == [] and asked == []
    # once blackjack gets completions, equal scores of its own are named as such
    served["blackjack"] = 16
    with open(logs["blackjack"], "a") as fh:
        fh.write("Scores are the same in a group, skipping...\n")
    assert watch.scan()[0].startswith("env blackjack: the env drops every group whose scores are all equal")
    # no endpoint counters (an older endpoint, or none answering): the hint as before
    unknown = EnvLogWatch({"math": logs["math"]}, served=lambda name: None)
    with open(logs["math"], "a") as fh:
        fh.write("Scores are the same in a group, skipping...\n")
    assert unknown.scan()[0].startswith("env math: the env drops every group whose scores are all equal")


def test_the_wait_line_names_each_envs_completions_and_failing_calls_with_what_the_status_means() -> None:
    guard = {"queue_groups": 0, "envs": {"0": {"received": 0, "rejected": 0}, "1": {"received": 0, "rejected": 0}}}
    names = {"0": "blackjack", "1": "math"}
    notes = {"blackjack": 'errors in its log: 41 x "LLM API error: RetryError[...]"'}
    line = wait_line(1, 30, guard=guard, status=None, health=BLACKJACK_HEALTH, env_names=names, env_notes=notes)
    print(line)
    assert line == (
        "waiting 30 s for step 1 | API queue 0 groups | env blackjack: 0 groups received (0 rejected), last post "
        "never, 0 completions served, 41 calls to /v1/chat/completions failed (404: the endpoint serves no such "
        'route, or no such model: its model is actor_rollout_ref.model.path), errors in its log: 41 x "LLM API error: '
        'RetryError[...]" | env math: 0 groups received (0 '
        "rejected), last post never, 48 completions served, 2 calls to /generate failed (422: the endpoint refused "
        "the request: the trainer's log says why (each reason once)) | endpoint: 48 completions served, "
        "1 call to /v1/models "
        "failed (401: no or a wrong token: give the env atropos.inference.api_key as --openai.api_key)"
    )
    assert failed_calls({"/generate": {"200": 3, "500": 2, "503": 1, "499": 4}}) == [
        "7 calls to /generate failed (4 x 499, 2 x 500: the endpoint failed to answer: see the trainer's log, 1 x 503: "
        "the endpoint failed to answer: see the trainer's log)"
    ]
    # an env the API knows no name of, but the endpoint does (the trainer's side of role=services)
    line = wait_line(1, 30, guard=guard, status=None, health=BLACKJACK_HEALTH, env_names={})
    assert "| env id 0: 0 groups received (0 rejected), last post never | env id 1:" in line
    assert "| env blackjack (endpoint counters only): 0 completions served, 41 calls to /v1/chat/completions" in line
    # an env that made no call at all; an endpoint without per-env counters (older ones): the totals only
    quiet = {"stats": {"completions": 0, "routes": {}, "envs": {}}}
    assert "env math: 0 groups received (0 rejected), last post never, 0 completions served |" in wait_line(
        1, 30, guard=guard, status=None, health=quiet, env_names=names
    )
    old = wait_line(1, 30, guard=guard, status=None, health={"stats": {"completions": 5}}, env_names=names)
    assert old.endswith("env math: 0 groups received (0 rejected), last post never | endpoint: 5 completions served")


def test_what_to_check_after_a_wait_names_each_envs_fault() -> None:
    guard = {
        "queue_groups": 0,
        "envs": {"0": {"received": 0}, "1": {"received": 0}, "2": {"received": 3, "rejected": 3}},
    }
    health = json.loads(json.dumps(BLACKJACK_HEALTH))
    health["stats"]["envs"]["math"]["routes"] = {"/generate": {"200": 12}}
    health["stats"]["envs"]["gs"] = {"routes": {"/generate": {"200": 3}}, "completions": 12}
    health["stats"]["envs"]["quiet"] = {"routes": {}, "completions": 0}
    names = {"0": "blackjack", "1": "math", "2": "gs", "3": "quiet"}
    check = check_line(guard=guard, status=None, health=health, env_names=names, waited_s=30, logs_dir="/run/logs")
    print(check)
    assert check == (
        "What to check: env blackjack's calls to the endpoint fail (what each status means is above); env math "
        "generates but posts no group: it drops them itself (equal scores, group size, length: its log says which); "
        "the API refuses env gs's groups (last rejection above; rejected_groups.jsonl); env quiet got no completion "
        "from the endpoint: its log says why (it fails before it generates, or calls another server than "
        '--openai.base_url); each env\'s log in /run/logs; docs/atropos.rst, "Using stock Atropos environments"; '
        "raise atropos.poll_timeout_s (waited 30 s) only if the envs are just slow."
    )
    assert check_line(guard=None, status=None, health=None, env_names={}, waited_s=5).startswith(
        "What to check: the Atropos API did not answer: is run-api running at atropos.api_url?; each env's log;"
    )


def test_the_stop_paragraph_is_found_in_a_trainers_log_and_ray_errors_are_unwrapped(tmp_path: Path) -> None:
    from ray.exceptions import RayTaskError

    from recipe.atropos.main_atropos import stop_reason, unwrap_ray_error
    from recipe.atropos.transport.client import AtroposAPIError

    timeout = AtroposAPIError(
        "no batch from http://127.0.0.1:8000 within 30 s: the API's queue stayed empty.\n"
        "waiting 30 s for step 1 | API queue 0 groups | env blackjack: ...\nWhat to check: each env's log."
    )

    def from_ray(cause: BaseException) -> BaseException:  # what ray.get raises for an actor method's exception
        task = RayTaskError(
            "AtroposTaskRunner.run", "Traceback (most recent call last): ...", cause, "ray", 1, "1.2.3.4"
        )
        return task.as_instanceof_cause()

    wrapped = from_ray(timeout)
    assert isinstance(wrapped, RayTaskError) and isinstance(wrapped, AtroposAPIError)
    assert str(wrapped) != str(timeout)  # Ray's header and the actor's traceback: not the message
    assert unwrap_ray_error(wrapped) is not wrapped and str(unwrap_ray_error(wrapped)) == str(timeout)
    nested = from_ray(RayTaskError("inner", "tb", timeout, "ray", 1, "1.2.3.4"))
    assert str(unwrap_ray_error(nested)) == str(timeout)
    paragraph = stop_reason(wrapped)
    print(paragraph)
    assert paragraph == f"{STOPPED} {timeout}\n"
    assert stop_reason(timeout) == paragraph  # raised in the driver: the same
    assert stop_reason(from_ray(KeyError("tokens"))) is None  # a bug: its traceback stays
    assert stop_reason(RuntimeError("boom")) is None
    # the trainer's log: Ray's lines, the paragraph, then whatever the interpreter prints as it exits
    log = RunDir(tmp_path).trainer_log  # where the launcher has the trainer write
    log.parent.mkdir()
    log.write_text(f"(AtroposTaskRunner pid=1) INFO step\n{paragraph}\n(raylet) shutting down\n")
    assert find_stop(log.read_text()) == paragraph.strip()
    assert find_stop("no paragraph here\n") is None
    assert find_stop(f"quoted {STOPPED} in a line\n") is None
    # the launcher shows it, with the errors it counted in the envs' logs, as the reason the run ended; what an
    # earlier run of the same run directory wrote to the (appended) trainer log is not this run's reason
    env_log = tmp_path / "blackjack.log"
    env_log.write_text("")
    console = ConsoleWatch(
        RunDir(tmp_path), {"blackjack": env_log}, api_url="http://127.0.0.1:9", inference_url="", interval_s=30
    )
    env_log.write_text(f"[Seed: 5] LLM API error: {FUTURE}\n" * 2)
    console.lines()
    with open(log, "a") as fh:
        fh.write("Traceback (most recent call last):\n  File \"x.py\", line 1\nKeyError: 'tokens'\n")
    assert console.trainer_stopped(log) is None  # this run's trainer crashed: its traceback is the reason
    with open(log, "a") as fh:
        fh.write(f"(AtroposTaskRunner pid=2) INFO step\n{paragraph}\n")
    reason = console.trainer_stopped(log)
    print(reason)
    assert reason == (
        f"{paragraph.strip()}\nErrors counted in the envs' logs:\nenv blackjack: 2 x \"LLM API error: "
        f'RetryError[<Future at 0x... state=finished raised ClientResponseError>]" (log: {env_log})'
    )
    assert console.trainer_stopped(tmp_path / "missing.log") is None
