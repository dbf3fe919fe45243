"""The launcher's console explains a wait (one launcher run, poll timeout 20 s): with environments that send the API
nothing it can train on — one whose groups all score alike (BaseEnv drops them itself), one whose every
``chat_completion`` gets 404 (it asks for another model by name, as a stock env's own config does), one whose group
size (3) cannot pack into the batch (8) — the console prints the waiting line every ``atropos.launcher.wait_report_s``
(env ids -> names, each env's completions and failed endpoint calls), names each env's errors or dropped groups, and
the trainer ends on one readable paragraph that repeats the line (no traceback)."""

from __future__ import annotations

import re

import pytest

from recipe.atropos.rundir import RunDir
from tests.helpers import Launch

pytestmark = pytest.mark.timeout(700)

ENVS = (
    "atropos.launcher.envs=["
    "{name:equal,module:tests.e2e.symptom_envs,group_size:4,args:{env.symptom:equal_scores,env.max_new_tokens:4}},"
    "{name:chat,module:tests.e2e.symptom_envs,group_size:4,"
    "args:{env.symptom:chat,openai.model_name:NousResearch/DeepHermes-3-Llama-3-8B-Preview}},"
    "{name:gs,module:tests.e2e.symptom_envs,group_size:4,"
    "args:{env.symptom:none,env.group_size:3,env.ensure_scores_are_not_same:false,env.max_new_tokens:4}}]"
)
GS = r"env gs: (\d+) groups received \((\d+) rejected\), last post \d+ s ago, last rejection: (.*)"
TIMEOUT = r"no batch from \S+ within 20 s: .*\n.*waiting 2\d s for step 1 \| API queue 0 groups \| env equal"


def test_the_console_says_why_step_1_waits_and_names_each_envs_fault(launch) -> None:  # noqa: ANN001
    run: Launch = launch(ENVS, "atropos.poll_timeout_s=20", "atropos.launcher.wait_report_s=6")
    assert run.wait_exit(600) == 1  # no batch within the poll timeout: the trainer fails, the launcher says so
    console = run.log_text()
    waits = re.findall(r"^waiting (\d+) s for step 1 \| (.*)$", console, re.MULTILINE)
    assert len(waits) >= 2, console[-6000:]  # every 6 s while step 1 waits
    assert all(int(s) >= 6 for s, _ in waits)
    # The last line of the wait (the trainer removes its wait file as it gives up; a line composed in that instant may
    # find the endpoint already stopping: "endpoint: no answer")
    seconds, rest = [w for w in waits if w[1].endswith("completions served")][-1]
    parts = rest.split(" | ")
    assert parts[0] == "API queue 0 groups", rest
    # env id 0 -> its name; it generates (completions served), only its groups never arrive
    equal = re.fullmatch(
        r"env equal: 0 groups received \(0 rejected\), last post never, (\d+) completions served", parts[1]
    )
    assert equal and int(equal[1]) > 0, rest
    chat = re.fullmatch(
        r"env chat: 0 groups received \(0 rejected\), last post never, 0 completions served, "
        r"(\d+) calls to /v1/chat/completions failed \(404: .*",
        parts[2],
    )
    assert chat and int(chat[1]) > 0, rest
    gs = re.fullmatch(GS, parts[3])
    assert gs and gs[1] == gs[2] and int(gs[1]) > 0, rest
    assert gs[3].startswith("group_size: 3 sequences do not divide the batch size 8")
    served = re.fullmatch(r"endpoint: (\d+) completions served", parts[4])
    assert served and int(served[1]) > 0, rest  # the envs generate: only their groups never arrive
    # each env's fault, named once, with what the env's own log shows
    assert re.search(r"^env chat: .*(RetryError|NotFoundError|404)", console, re.MULTILINE), console[-6000:]
    assert "env equal: the env got no completions" not in console
    assert "env equal: the env drops every group whose scores are all equal (env.ensure_scores_are_not_same" in console
    assert "env gs: the API refused the env's groups (422)" in console
    # no exception of their own in the two envs while the trainer waited (once its endpoint stops, an env's requests
    # fail: that error, if the env logs it before the launcher stops it, is a consequence, not the env's fault). The
    # wait is what comes before the last periodic waiting line ahead of the trainer's exit (the paragraph the launcher
    # shows then repeats a waiting line of its own)
    exited = console.find("trainer exited with code")
    before_exit = console[:exited] if exited >= 0 else console
    waited = before_exit[: before_exit.rfind("waiting ")]
    assert "env equal: Error" not in waited and "env gs: Error" not in waited
    # the trainer's poll-timeout error repeats the line
    trainer_log = RunDir(run.run_dir).trainer_log.read_text(errors="replace")
    assert re.search(TIMEOUT, trainer_log), trainer_log[-4000:]
    # ... in one readable paragraph, which the launcher shows as the reason the run ended (no Ray/Hydra traceback)
    assert "atropos-verl: the trainer stopped: no batch from" in console
    assert "Traceback" not in trainer_log and "HYDRA_FULL_ERROR" not in trainer_log
