"""The waiting line from the real services: the guarded API's per-env counters, the endpoint's completions served (and,
per env, its completions and failing calls), the env names the launcher wrote, the errors the launcher counts in the
env logs; the trainer's poll timeout repeats the line with what to check and leaves the wait file naming the step;
the trainer process stops on it with one paragraph (no Hydra traceback), which the launcher shows as the reason."""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from ray.exceptions import RayTaskError
from transformers import AutoTokenizer

from recipe.atropos.endpoint.backends import Completion, SamplingParams
from recipe.atropos.endpoint.ledger import CompletionLedger
from recipe.atropos.endpoint.server import InferenceEndpoint
from recipe.atropos.launcher.watch import ConsoleWatch
from recipe.atropos.main_atropos import stop_reason
from recipe.atropos.rundir import RunDir
from recipe.atropos.sources.api import ApiGroupSource
from recipe.atropos.sources.fifo import FifoBatcher
from recipe.atropos.staleness import LagMeter
from recipe.atropos.transport.client import AtroposAPIError, AtroposClient
from recipe.atropos.waiting import STOPPED, WaitReport, find_stop, read_wait
from tests.factories import TINY_CONFIG, group
from tests.helpers import wait_until


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
        env_ids_file, wait_file = RunDir(tmp_path).env_ids, RunDir(tmp_path).wait_file
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
        line, check = message.splitlines()[-2:]
        assert check.startswith("What to check: the API refuses env math's groups (last rejection above;")
        assert line.startswith("waiting 2 s for step 3 | API queue 1 groups | env math: 2 groups received (1 rejected)")
        assert "last rejection: group_size: 3 sequences do not divide the batch size 8" in line
        assert "| env silent: 0 groups received (0 rejected), last post never | endpoint: 3 completions served" in line

        # the step gets its data: the wait file goes
        assert requests.post(f"{api.url}/scored_data", json=group(n=4, env_id=math, first=20), timeout=5).ok
        assert len(source.next_groups(3, {})) == 2
        assert not wait_file.exists()
    finally:
        endpoint.stop()


def log_to(path: Path, *records: tuple[int, str]) -> None:
    """Write ``records`` (level, message) to ``path`` as a stock env's module logger does (message only)."""
    handler = logging.FileHandler(path)
    env_logger = logging.getLogger(f"stock-env-{path.stem}")
    env_logger.addHandler(handler)
    env_logger.propagate = False
    try:
        for level, message in records:
            env_logger.log(level, message)
    finally:
        env_logger.removeHandler(handler)
        handler.close()


FUTURE = "RetryError[<Future at 0x7f3a2c1d9e50 state=finished raised ClientResponseError>]"


@pytest.mark.timeout(120)
def test_an_env_whose_calls_fail_is_named_with_its_failing_calls_and_errors_not_as_equal_scores(
    make_run_api, tiny_model: Path, tmp_path: Path
) -> None:
    """A stock env whose every call the endpoint refuses (the blackjack env asks for its own default model by name:
    404, as vLLM answers): every episode logs "LLM API error" and scores 0, so BaseEnv drops every group as equal. The
    console names the failing calls and the error (counted), says the env got no completions (not "drops every group
    whose scores are equal": that is for the env that did), and the poll timeout ends in a paragraph that the launcher
    shows with the errors it counted."""
    api = make_run_api(guard={"vocab_size": 1000, "batch_size": 8}).start()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    endpoint = InferenceEndpoint(
        Echo(), port=0, max_tokens_cap=4, tokenizer=tokenizer, policy_version=0, served_model_name=str(tiny_model)
    ).start()
    try:
        run_dir, logs = tmp_path, {"blackjack": tmp_path / "blackjack.log", "math": tmp_path / "math.log"}
        for log in logs.values():
            log.write_text("an earlier run's line: LLM API error: old\n")
        env_ids_file, wait_file = RunDir(run_dir).env_ids, RunDir(run_dir).wait_file
        console = ConsoleWatch(RunDir(run_dir), logs, api_url=api.url, inference_url=endpoint.url, interval_s=1)
        source = ApiGroupSource(
            AtroposClient(api.url, vocab_size=1000),
            FifoBatcher(batch_size=8),
            LagMeter(CompletionLedger().sequence_version, max_policy_lag=None),
            registration={"batch_size": 8, "max_token_len": 64, "num_steps": 10},
            poll_timeout_s=5,
            waits=WaitReport(api.url, endpoint.url, str(env_ids_file), str(wait_file)),
        )
        source.start(0)
        blackjack, math = register_env(api.url, "blackjack", 4), register_env(api.url, "math", 4)
        env_ids_file.write_text(json.dumps({str(blackjack): "blackjack", str(math): "math"}))
        # blackjack (its base URL as the launcher gives it): each episode's chat call fails, the env logs it, scores 0
        for seed in range(3):
            body = {
                "model": "NousResearch/DeepHermes-3-Llama-3-8B-Preview",
                "messages": [{"role": "user", "content": "hit?"}],
            }
            answer = requests.post(f"{endpoint.url}/env/blackjack/v1/chat/completions", json=body, timeout=5)
            assert answer.status_code == 404, answer.text
            future = FUTURE.replace("2c1d", f"{seed:04x}")
            log_to(logs["blackjack"], (logging.ERROR, f"[Seed: {123456 + seed}] LLM API error: {future}"))
        log_to(logs["blackjack"], (logging.WARNING, "Scores are the same in a group, skipping..."))
        # math: generates, and drops its groups as equal: that one is the equal-score filter
        body = {"prompt": {"prompt_token_ids": [1, 2]}, "n": 4, "max_tokens": 2}
        assert requests.post(f"{endpoint.url}/env/math/generate", json=body, timeout=5).ok
        log_to(logs["math"], (logging.WARNING, "Scores are the same in a group, skipping..."))

        printed: list[str] = []

        def print_console() -> bool:  # the launcher's supervision loop: True once a waiting line was printed
            printed.extend(console.lines())
            return any(x.startswith("waiting") for x in printed)

        with ThreadPoolExecutor(1) as pool:  # nothing reaches the API: no batch within the 5 s poll timeout
            waiting = pool.submit(source.next_groups, 1, {})
            wait_until(print_console, 5, "a waiting line (interval 1 s)")
            with pytest.raises(AtroposAPIError) as error:
                waiting.result(timeout=30)
        print("\n".join(printed))
        kind = "LLM API error: RetryError[<Future at 0x... state=finished raised ClientResponseError>]"
        assert printed[0] == f"env blackjack: {kind} (log: {logs['blackjack']})"  # once for 3, old lines ignored
        assert printed[1].startswith("env blackjack: the env got no completions from the endpoint")
        assert printed[2].startswith("env math: the env drops every group whose scores are all equal")
        assert not any("scores are all equal" in x for x in printed if x.startswith("env blackjack"))
        line = next(x for x in printed if x.startswith("waiting"))
        assert re.fullmatch(
            r"waiting \d s for step 1 \| API queue 0 groups \| env blackjack: 0 groups received \(0 rejected\), last "
            r"post never, 0 completions served, 3 calls to /v1/chat/completions failed \(404: the endpoint serves no "
            r"such route, or no such model: its model is actor_rollout_ref\.model\.path\), dropped itself: 1 group "
            r"\(scores all equal\), errors in its log: 3 x "
            rf'"{re.escape(kind)}" \| env math: 0 groups received \(0 rejected\), last post never, 4 completions '
            r"served, dropped itself: 1 group \(scores all equal\) \| endpoint: 4 completions served",
            line,
        ), line

        # the trainer stops: its error, out of Ray's wrapper, is one paragraph; the launcher shows it as the reason
        wrapped = RayTaskError("AtroposTaskRunner.run", "Traceback ...", error.value, "ray", 1, "127.0.0.1")
        paragraph = stop_reason(wrapped.as_instanceof_cause())
        print(paragraph)
        first, waiting_line, check = paragraph.strip().splitlines()
        assert first.startswith(f"{STOPPED} no batch from {api.url} within 5 s: ")
        assert re.match(r"waiting \d+ s for step 1 \| API queue 0 groups \| env blackjack: 0 groups", waiting_line)
        assert "3 calls to /v1/chat/completions failed (404: the endpoint serves no such route, or no such model" in (
            waiting_line
        )
        assert check.startswith(
            "What to check: env blackjack's calls to the endpoint fail (what each status means is above); env math "
            "generates but posts no group: it drops them itself"
        )
        assert re.search(
            rf"each env's log in {re.escape(str(RunDir(run_dir).logs))}; docs/atropos.rst, \"Using stock Atropos "
            r'environments"; raise atropos.poll_timeout_s \(waited \d+ s\) only if the envs are just slow\.$',
            check,
        )
        trainer_log = RunDir(run_dir).trainer_log
        trainer_log.parent.mkdir(exist_ok=True)
        trainer_log.write_text(f"(AtroposTaskRunner pid=7) INFO registered\n{paragraph}\n")
        reason = console.trainer_stopped(trainer_log)
        print(reason)
        assert reason == (
            f"{paragraph.strip()}\nErrors counted in the envs' logs:\n"
            f'env blackjack: 3 x "{kind}" (log: {logs["blackjack"]})'
        )
    finally:
        endpoint.stop()


STAND_IN_TRAINER = """
import sys
from ray.exceptions import RayTaskError
import recipe.atropos.main_atropos as main_atropos
from recipe.atropos.transport.client import AtroposAPIError

CASE = sys.argv[1]

def run_atropos(config, trainer_cls=None):  # what ray.get raises when the Ray actor's fit() raised
    cause = AtroposAPIError("no batch from http://127.0.0.1:1 within 30 s: the API's queue stayed empty."
                            "\\nwaiting 30 s for step 1 | API queue 0 groups\\nWhat to check: each env's log.")
    cause = cause if CASE == "timeout" else KeyError("tokens")
    raise RayTaskError("AtroposTaskRunner.run", "Traceback ...", cause, "ray", 1, "127.0.0.1").as_instanceof_cause()

main_atropos.run_atropos = run_atropos
sys.argv = [main_atropos.__file__, *sys.argv[2:]]
main_atropos.main()
"""


@pytest.mark.timeout(180)
def test_the_trainer_process_stops_with_one_paragraph_and_keeps_tracebacks_for_bugs(tmp_path: Path) -> None:
    """main_atropos under Hydra (Ray's part stood in for: its error as ``ray.get`` raises it): the poll timeout and a
    config error end with the paragraph and exit code 1, no traceback, no HYDRA_FULL_ERROR hint; a bug keeps both."""
    steps = "trainer.total_training_steps=1"
    cases = {"timeout": [steps], "bad_config": [], "bug": [steps]}  # bad_config: no total steps
    procs = [  # at once: each spends its ~8 s importing verl and Ray
        subprocess.Popen(
            [sys.executable, "-c", STAND_IN_TRAINER, case.replace("bad_config", "timeout"), *overrides]
            + ["actor_rollout_ref.model.path=/nowhere", f"hydra.run.dir={tmp_path / case}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, overrides in cases.items()
    ]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=150)
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    timeout, bad_config, bug = done
    print(timeout.stderr[-2000:])
    assert timeout.returncode == 1
    assert find_stop(timeout.stderr) == (
        f"{STOPPED} no batch from http://127.0.0.1:1 within 30 s: the API's queue stayed empty.\n"
        "waiting 30 s for step 1 | API queue 0 groups\nWhat to check: each env's log."
    )
    assert "Traceback" not in timeout.stderr and "HYDRA_FULL_ERROR" not in timeout.stderr
    assert bad_config.returncode == 1
    assert find_stop(bad_config.stderr).startswith(f"{STOPPED} trainer.total_training_steps is required")
    assert "Traceback" not in bad_config.stderr and "HYDRA_FULL_ERROR" not in bad_config.stderr
    assert bug.returncode == 1 and find_stop(bug.stderr) is None
    assert "Traceback" in bug.stderr and "KeyError" in bug.stderr


def test_the_launcher_shows_the_trainers_paragraph_as_the_reason_the_run_ended(tmp_path: Path) -> None:
    """Supervision with a stand-in trainer process that writes Ray's lines and the stop paragraph, then exits 1: the
    reason the run ended is the paragraph (with the errors counted in the env logs), not the log's last lines."""
    from recipe.atropos.launcher.config import LaunchError
    from recipe.atropos.launcher.processes import ManagedProcess
    from recipe.atropos.launcher.supervisor import Launcher

    launcher = Launcher(TINY_CONFIG, ["actor_rollout_ref.model.path=/nowhere", f"atropos.launcher.run_dir={tmp_path}"])
    paragraph = (
        f"{STOPPED} no batch from http://127.0.0.1:1 within 30 s: ...\nwaiting 30 s for step 1 | ...\nWhat to check"
    )
    code = (
        f"import sys; print('(AtroposTaskRunner pid=9) INFO step'); print({paragraph!r}, file=sys.stderr); sys.exit(1)"
    )
    # the stand-in takes the trainer's place among the launcher's children (the processes supervise() watches)
    trainer = ManagedProcess("trainer", [sys.executable, "-c", code], RunDir(tmp_path).trainer_log).start()
    launcher.children["trainer"] = trainer
    try:
        wait_until(lambda: trainer.poll() is not None, 30, "the stand-in trainer to exit")
        with pytest.raises(LaunchError) as error:
            launcher.supervise()
        assert str(error.value) == f"trainer exited with code 1 (log: {RunDir(tmp_path).trainer_log}): {paragraph}"
    finally:
        launcher.stop_all()
