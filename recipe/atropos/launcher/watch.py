"""What the launcher's console says between two steps: why a step waits, and which environment raised what.

- :class:`WaitWatch`: while the trainer's wait file (:mod:`recipe.atropos.waiting`) names a step, one line every
  ``atropos.launcher.wait_report_s`` s: ``waiting 60 s for step 3 | API queue 0 groups | env math: 0 groups received
  (0 rejected), last post never | endpoint: 272 completions served``.
- :class:`EnvLogWatch`: reads each environment's log as it grows; every Python exception it shows (the last line of a
  traceback, the last of a chain only) and every exception atroposlib's ``BaseEnv`` logs without a traceback (it
  swallows those of ``collect_trajectories``, scoring and sending, then carries on) becomes one console line
  ``env <name>: <exception>`` — once per distinct text and env, at most :data:`MAX_PER_ENV` per env; so is each
  kind of group BaseEnv drops itself (:data:`DROPS`: equal scores, wrong size, too long) or the API refused.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

from recipe.atropos.waiting import describe_wait, read_wait

__all__ = ["ConsoleWatch", "EnvLogWatch", "WaitWatch", "exception_lines"]

WAIT_FILE = "trainer_wait.json"  # under the run directory; the launcher passes it as atropos.wait_file
MAX_PER_ENV = 5
_CHAINED = ("During handling of the above exception", "The above exception was the direct cause")
# atroposlib.envs.base.BaseEnv logs these exceptions with their message only, and goes on with the next item.
_SWALLOWED = re.compile(
    r"(Error in collect_trajectories: .*|Scoring exception: .*|Error in handle_send_to_api: .*"
    r"|Failed to send .* after retries: .*|Error registering env: .*)$"
)

# atroposlib.envs.base.BaseEnv drops a group itself, before the API sees it, with one of these warnings (or the API
# refused it): what each means, printed once per env with the first such line.
DROPS = {
    "Scores are the same in a group, skipping": "the env drops every group whose scores are all equal "
    "(env.ensure_scores_are_not_same, atroposlib's default true)",
    "Group structure invalid, or token count mismatch": "the env drops groups whose size is not its env.group_size",
    "Token length is too long in a group, skipping": "the env drops groups with a sequence of max_token_length tokens "
    "or more (data.max_prompt_length + data.max_response_length)",
    "Client error: 422": "the API refused the env's groups (422): the reasons are in <run_dir>/rejected_groups.jsonl",
}


def drop_lines(lines: list[str]) -> list[str]:
    """What the env dropped itself (or had refused), one text per :data:`DROPS` kind seen in ``lines``."""
    return [f'{hint}: "{key}..."' for key, hint in DROPS.items() if any(key in line for line in lines)]


def exception_lines(lines: list[str], final: bool = False) -> tuple[list[str], int]:
    """The exceptions that complete ``lines`` show, and how many leading lines are done with: a traceback still being
    written, or whose chain may go on, is left for the next call unless ``final`` (the log stopped growing)."""
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
    """New exceptions in each environment's log (``logs`` maps the env name to its log file)."""

    def __init__(self, logs: dict[str, Path]) -> None:
        self.logs = dict(logs)
        self.offsets = {name: _size(path) for name, path in logs.items()}  # an earlier run's lines are not news
        self.seen: dict[str, set[str]] = {name: set() for name in logs}
        self.unread: dict[str, int] = {name: -1 for name in logs}  # bytes left unparsed at the last scan

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
            found, done = exception_lines(lines, final)
            found += drop_lines(lines[:done])
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
    ) -> None:
        self.wait_file = wait_file
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
            key[0], waited, api_url=self.api_url, inference_url=self.inference_url, env_ids_file=self.env_ids_file
        )


class ConsoleWatch:
    """Both watches of one run; :meth:`lines` is what to print now (what an earlier run left is not reported)."""

    def __init__(
        self, run_dir: Path, env_logs: dict[str, Path], *, api_url: str, inference_url: str, interval_s: float
    ) -> None:
        self.waits = WaitWatch(
            run_dir / WAIT_FILE,
            api_url=api_url,
            inference_url=inference_url,
            env_ids_file=run_dir / "env_ids.json",
            interval_s=interval_s,
        )
        self.envs = EnvLogWatch(env_logs)

    def lines(self) -> list[str]:
        out = self.envs.scan()
        waiting = self.waits.line()
        return [*out, waiting] if waiting else out
