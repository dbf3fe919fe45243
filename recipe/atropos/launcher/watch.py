"""What the launcher's console says between two steps: why a step waits, and which environment raised what.

- :class:`WaitWatch`: while the trainer's wait file (:mod:`recipe.atropos.waiting`) names a step, one line every
  ``atropos.launcher.wait_report_s`` s: ``waiting 60 s for step 3 | API queue 0 groups | env blackjack: 0 groups
  received (0 rejected), last post never, 0 completions served, 41 calls to /v1/chat/completions failed (404: the
  endpoint serves no such route, or no such model: ...), errors in its log: 41 x "LLM API error: RetryError[...]" |
  endpoint: 0 completions served``.
- :class:`EnvLogWatch`: reads each environment's log as it grows; every Python exception it shows (the last line of a
  traceback, the last of a chain only), every exception atroposlib's ``BaseEnv`` logs without a traceback (it
  swallows those of ``collect_trajectories``, scoring and sending, then carries on) and every other error line
  (logged at ERROR, or without a level shown, reading ``... error: ...`` as ``LLM API error: ...`` does) becomes one
  console line ``env <name>: <error>`` — once per distinct text and env (numbers of 5+ digits, addresses and leading
  ``[...]`` tags aside: :func:`error_kind`), at most :data:`MAX_PER_ENV` per env; each is counted, and the counts go
  into the waiting line and the reason a run ended. So is each kind of group BaseEnv drops itself (:data:`DROPS`:
  equal scores, wrong size, too long) or the API refused; equal scores are named so only when the endpoint served the
  env completions (with none, its scores are not the model's: :data:`NO_COMPLETIONS`).
"""

from __future__ import annotations

import re
import time
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

from recipe.atropos.rundir import RunDir
from recipe.atropos.waiting import describe_wait, find_stop, get_json, read_wait, served_to

__all__ = ["ConsoleWatch", "EnvLogWatch", "WaitWatch", "error_kind", "error_line", "exception_lines"]

MAX_PER_ENV = 5
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
# atroposlib.envs.base.BaseEnv logs these exceptions with their message only, and goes on with the next item.
_SWALLOWED = re.compile(
    r"(Error in collect_trajectories: .*|Scoring exception: .*|Error in handle_send_to_api: .*"
    r"|Failed to send .* after retries: .*|Error registering env: .*)$"
)
# A log line's level, as logging's usual formats show it (``ERROR:name:msg``, ``... name ERROR msg``, ``[ERROR]``).
_LEVEL = re.compile(r"(?:^|[\s\[|(])(DEBUG|INFO|WARNING|WARN|ERROR|CRITICAL|FATAL)(?=$|[\]\s|:)-])")
_BASIC_FORMAT = re.compile(r"^(?:ERROR|CRITICAL):[\w.<>-]*:")  # logging.basicConfig's default format
# Without a level shown (logging's last-resort handler prints the message only): "LLM API error: ...", "X exception:
# ...", "ValueError: ...", after any "[Seed: 12] " tags, the error word within the first 80 characters.
# No quote or sentence punctuation before the error word: the continuation lines of a multi-line WARNING (the stock
# blackjack env logs "Failed to parse tool call. Full response: '<the model's reply, over several lines>'. Error: ..."
# for each invalid answer) are the model's words, not an error of the env.
_ERRORISH = re.compile(r"^(?=\S)(?:\[[^\]]*\]\s*)*[^:'\"`,;!?]{0,80}?\w*(?:error|exception)\s*:", re.IGNORECASE)

EQUAL_SCORES = "Scores are the same in a group, skipping"
# atroposlib.envs.base.BaseEnv drops a group itself, before the API sees it, with one of these warnings (or the API
# refused it): what each means, printed once per env with the first such line.
DROPS = {
    EQUAL_SCORES: "the env drops every group whose scores are all equal "
    "(env.ensure_scores_are_not_same, atroposlib's default true)",
    "Group structure invalid, or token count mismatch": "the env drops groups whose size is not its env.group_size",
    "Token length is too long in a group, skipping": "the env drops groups with a sequence of max_token_length tokens "
    "or more (data.max_prompt_length + data.max_response_length)",
    "Client error: 422": "the API refused the env's groups (422): the reasons are in <run_dir>/rejected_groups.jsonl",
}
# The same, in a few words, for the waiting line's count: ``dropped itself: 37 groups (scores all equal)``.
DROP_COUNTS = {
    EQUAL_SCORES: "scores all equal",
    "Group structure invalid, or token count mismatch": "wrong group size",
    "Token length is too long in a group, skipping": "too long",
    "Client error: 422": "refused by the API",
}
# Equal scores from an env the endpoint served no completion: its scores are not the model's, but its defaults.
NO_COMPLETIONS = (
    "the env got no completions from the endpoint (its calls fail, or it fails before it calls), so its groups, "
    f'scored without the model, all score alike and are dropped ("{EQUAL_SCORES}..."): see its errors and the '
    "waiting line"
)


def _drop_text(key: str) -> str:
    return f'{DROPS[key]}: "{key}..."'


def drop_lines(lines: list[str], served: Callable[[], int | None] | None = None) -> list[str]:
    """What the env dropped itself (or had refused), one text per :data:`DROPS` kind seen in ``lines``; ``served``
    (asked only when equal scores are seen) gives the completions the endpoint served the env (None: unknown)."""
    out = []
    for key in DROPS:
        if any(key in line for line in lines):
            none_served = key == EQUAL_SCORES and served is not None and served() == 0
            out.append(NO_COMPLETIONS if none_served else _drop_text(key))
    return out


def error_line(line: str) -> str | None:
    """The message of a log line logged at ERROR (or CRITICAL), or showing no level but reading as an error
    (``LLM API error: ...``); None for any other line and for the drops :data:`DROPS` names."""
    if any(key in line for key in DROPS):
        return None
    level = _LEVEL.search(line[:120])
    if level is None:
        return line.strip() if _ERRORISH.match(line) else None
    if level.group(1) not in ("ERROR", "CRITICAL", "FATAL"):
        return None
    basic = _BASIC_FORMAT.match(line)
    message = line[basic.end() :] if basic else line[level.end() :].lstrip(" ]|:-\t")
    return message.strip() or None


def error_kind(message: str) -> str:
    """``message`` with what differs between two occurrences of one error taken out: leading ``[...]`` tags (``[Seed:
    123]``), addresses (``0x7f..``) and numbers of 5 digits or more."""
    text = re.sub(r"^(?:\[[^\]]*\]\s*)+", "", message.strip())
    text = re.sub(r"0x[0-9a-fA-F]+", "0x...", text)
    return re.sub(r"\d{5,}", "N", text)


def exception_lines(lines: list[str], final: bool = False) -> tuple[list[str], int]:
    """The exceptions and error lines (:func:`error_line`) that complete ``lines`` show, and how many leading lines
    are done with: a traceback still being written, or whose chain may go on, is left for the next call unless
    ``final`` (the log stopped growing)."""
    found: list[str] = []
    done, i, n = 0, 0, len(lines)
    while i < n:
        line = lines[i]
        swallowed = _SWALLOWED.search(line)
        if swallowed:
            found.append(swallowed.group(1).strip())
            i += 1
            done = i
            continue
        if not line.startswith("Traceback (most recent call last)"):
            message = None if line.startswith(_CHAINED) else error_line(line)
            if message:
                found.append(message)
            i += 1
            done = i
            continue
        j = i + 1
        while j < n and (lines[j].startswith((" ", "\t")) or not lines[j].strip()):
            j += 1  # the frames
        if j >= n:
            break  # the traceback is still being written
        k = j + 1  # the exception's line is lines[j]; a chain goes on after a blank line
        while k < n and not lines[k].strip():
            k += 1
        if k >= n and not final:
            break  # wait: a chained exception may follow
        if k >= n or not lines[k].startswith(_CHAINED):
            found.append(lines[j].strip())
        i = k
        done = i
    return found, done


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


class EnvLogWatch:
    """New errors in each environment's log (``logs`` maps the env name to its log file), named once and counted;
    ``served`` gives the completions the endpoint served an env (None: unknown), asked when its groups score alike."""

    def __init__(self, logs: dict[str, Path], served: Callable[[str], int | None] | None = None) -> None:
        self.logs = dict(logs)
        self.served = served
        self.offsets = {name: _size(path) for name, path in logs.items()}  # an earlier run's lines are not news
        self.seen: dict[str, set[str]] = {name: set() for name in logs}
        self.unread: dict[str, int] = {name: -1 for name in logs}  # bytes left unparsed at the last scan
        self.counts: dict[str, Counter[str]] = {name: Counter() for name in logs}  # error kind -> occurrences
        self.drops: dict[str, Counter[str]] = {name: Counter() for name in logs}  # DROPS key -> groups dropped

    def scan(self) -> list[str]:
        out = []
        for name, path in self.logs.items():
            try:
                with open(path, "rb") as fh:
                    fh.seek(self.offsets[name])
                    data = fh.read()
            except FileNotFoundError:
                continue
            raw_lines = data.split(b"\n")[:-1]  # complete lines only
            final = len(data) == self.unread[name]  # nothing new since the last scan: a pending traceback is whole
            lines = [line.decode(errors="replace") for line in raw_lines]
            errors, done = exception_lines(lines, final)
            kinds = [error_kind(error) for error in errors]
            self.counts[name].update(kinds)
            self.drops[name].update(key for line in lines[:done] for key in DROPS if key in line)
            known = self.served is None or _drop_text(EQUAL_SCORES) in self.seen[name]  # nothing more to learn
            found = kinds + drop_lines(lines[:done], None if known else partial(self.served, name))
            self.offsets[name] += sum(len(line) + 1 for line in raw_lines[:done])
            self.unread[name] = len(data) - sum(len(line) + 1 for line in raw_lines[:done])
            for exc in found:
                if exc in self.seen[name] or len(self.seen[name]) > MAX_PER_ENV:
                    continue
                self.seen[name].add(exc)
                if len(self.seen[name]) > MAX_PER_ENV:
                    out.append(f"env {name}: more exceptions than {MAX_PER_ENV}; see {path}")
                    continue
                out.append(f"env {name}: {exc[:400]} (log: {path})")
        return out

    def notes(self, top: int = 2) -> dict[str, str]:
        """By env name, the groups it dropped itself and its most frequent errors so far: ``dropped itself: 37 groups
        (scores all equal), errors in its log: 41 x "LLM API error: ..."``."""
        out = {}
        for name in self.logs:
            parts = []
            drops = self.drops[name]
            if drops:
                text = ", ".join(
                    f"{n} group{'' if n == 1 else 's'} ({DROP_COUNTS[key]})" for key, n in drops.most_common()
                )
                parts.append(f"dropped itself: {text}")
            counts = self.counts[name]
            if counts:
                common = counts.most_common(top)
                text = ", ".join(f'{n} x "{kind[:160]}"' for kind, n in common)
                more = f", {len(counts) - len(common)} more kinds" if len(counts) > len(common) else ""
                parts.append(f"errors in its log: {text}{more}")
            if parts:
                out[name] = ", ".join(parts)
        return out

    def summary(self, top: int = 3) -> list[str]:
        """One line per env with errors: ``env blackjack: 41 x "LLM API error: ..." (log: ...)``."""
        out = []
        for name, counts in self.counts.items():
            if counts:
                text = ", ".join(f'{n} x "{kind[:300]}"' for kind, n in counts.most_common(top))
                more = f", {len(counts) - top} more kinds" if len(counts) > top else ""
                out.append(f"env {name}: {text}{more} (log: {self.logs[name]})")
        return out


class WaitWatch:
    """One waiting line every ``interval_s`` while the trainer's ``wait_file`` names a step."""

    def __init__(
        self,
        wait_file: Path,
        *,
        api_url: str,
        inference_url: str,
        env_ids_file: Path,
        interval_s: float,
        clock: Callable[[], float] = time.time,
        notes: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self.wait_file = wait_file
        self.notes = notes  # by env name, what else the line says of it (the errors counted in its log)
        self.api_url = api_url
        self.inference_url = inference_url
        self.env_ids_file = env_ids_file
        self.interval_s = float(interval_s)
        self.clock = clock
        self.started = clock()  # a wait that began earlier is an earlier run's (its trainer died waiting)
        self.reported: tuple[int, float] | None = None  # (step, wait start) of the last line, and when it was printed
        self.last_print = 0.0

    def line(self) -> str | None:
        """The waiting line when one is due, else None."""
        wait = read_wait(self.wait_file)
        if wait is None or float(wait["since"]) < self.started:
            return None
        now = self.clock()
        key = (int(wait["step"]), float(wait["since"]))
        waited = now - key[1]
        if waited < self.interval_s:
            return None
        if self.reported == key and now - self.last_print < self.interval_s:
            return None
        self.reported, self.last_print = key, now
        return describe_wait(
            key[0],
            waited,
            api_url=self.api_url,
            inference_url=self.inference_url,
            env_ids_file=self.env_ids_file,
            env_notes=self.notes() if self.notes else None,
        )


class ConsoleWatch:
    """Both watches of one run; :meth:`lines` is what to print now (what an earlier run left is not reported)."""

    def __init__(
        self, run_dir: RunDir, env_logs: dict[str, Path], *, api_url: str, inference_url: str, interval_s: float
    ) -> None:
        self.inference_url = inference_url
        self._health: tuple[float, dict | None] = (float("-inf"), None)  # (when asked, /health's last answer)
        self.trainer_log = run_dir.trainer_log
        self.trainer_log_start = _size(self.trainer_log)  # what an earlier run wrote there is not this run's reason
        self.envs = EnvLogWatch(env_logs, served=self.served)
        self.waits = WaitWatch(
            run_dir.wait_file,
            api_url=api_url,
            inference_url=inference_url,
            env_ids_file=run_dir.env_ids,
            interval_s=interval_s,
            notes=self.envs.notes,
        )

    def served(self, env: str) -> int | None:
        """The completions the endpoint has served env ``env`` now (None: unknown; :func:`served_to`); an endpoint that
        did not answer is asked again after 5 s, not at every scan."""
        if self._health[1] is not None or time.monotonic() - self._health[0] >= 5.0:
            self._health = (time.monotonic(), get_json(f"{self.inference_url}/health"))
        return served_to(self._health[1], env)

    def trainer_stopped(self, log_path: Path) -> str | None:
        """The paragraph the trainer stopped with (:func:`recipe.atropos.waiting.find_stop`: the poll timeout's with
        its waiting line and what to check), and the errors counted in the envs' logs; None when its log has none
        (then it crashed: its traceback is the reason)."""
        start = self.trainer_log_start if Path(log_path) == self.trainer_log else 0
        try:
            with open(log_path, "rb") as fh:
                fh.seek(max(start, _size(Path(log_path)) - 256 * 1024))
                reason = find_stop(fh.read().decode(errors="replace"))
        except FileNotFoundError:
            return None
        if reason is None:
            return None
        errors = "".join(f"\n{line}" for line in self.envs.summary())
        return reason + (f"\nErrors counted in the envs' logs:{errors}" if errors else "")

    def lines(self) -> list[str]:
        out = self.envs.scan()
        waiting = self.waits.line()
        return [*out, waiting] if waiting else out
