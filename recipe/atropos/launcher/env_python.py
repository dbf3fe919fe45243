"""The environments' interpreter: a venv of their own (``.venv-envs``) with atroposlib's era of transformers.

Environments are separate processes that talk HTTP to the API and the trainer's endpoint, so they need not share the
trainer's Python. The trainer's venv has transformers 5 (verl 0.9.1 needs it), where ``apply_chat_template(chat)``
returns a ``BatchEncoding``; atroposlib 0.4.0's ``tokenize_for_trainer`` (used by most stock environments) was written
for transformers 4, where it returns a list of ids. ``.venv-envs`` holds ``atroposlib==0.4.0`` with transformers
:data:`TRANSFORMERS_PIN` (no torch), and this project without its dependencies (``pip install --no-deps -e``: the
bundled environments and the tests' environments import only atroposlib's own dependencies from it).

CLI (stdlib only: it runs with any Python 3.11, before any venv exists)::

    python -m recipe.atropos.launcher.env_python                              # create or complete .venv-envs
    python -m recipe.atropos.launcher.env_python --requirements env/requirements.txt   # add an env's requirements

``--requirements`` installs into the same venv under the pins (a requirement that needs transformers 5 or another
atroposlib fails to resolve, naming the conflict). ``make install`` runs the first form.

Which interpreter runs an env (:func:`resolve_env_python`): the env entry's ``python``; else
``atropos.launcher.env_python``; else ``$ATROPOS_ENV_PYTHON``; else ``<project root>/.venv-envs/bin/python`` when it
exists; else the launcher's own Python, with a warning naming the command above.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("atropos_launcher")

PROJECT_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_VENV = PROJECT_ROOT / ".venv-envs"
ENV_PYTHON_VAR = "ATROPOS_ENV_PYTHON"
ATROPOSLIB_PIN = "0.4.0"
# The newest transformers 4.x (4.57.6, January 2026): apply_chat_template returns ids, and it reads the tokenizers this
# project saves with transformers 5 (tests/integration/test_env_interpreter.py checks both).
TRANSFORMERS_PIN = "4.57.6"
PINS = (f"atroposlib=={ATROPOSLIB_PIN}", f"transformers=={TRANSFORMERS_PIN}")
INSTALL_HINT = "run `make install` (or `python -m recipe.atropos.launcher.env_python`)"
FALLBACK = "the launcher's Python"  # where the interpreter came from when nothing named one and .venv-envs is absent


def venv_python(venv: Path) -> Path:
    return Path(venv) / "bin" / "python"


def default_env_python() -> tuple[str, str]:
    """The interpreter for envs whose entry and ``atropos.launcher.env_python`` name none, and where it came from:
    ``$ATROPOS_ENV_PYTHON``, else ``.venv-envs`` when it exists, else this Python (logged as a warning)."""
    from_var = os.environ.get(ENV_PYTHON_VAR)
    if from_var:
        return str(Path(from_var).expanduser()), f"${ENV_PYTHON_VAR}"
    venv = venv_python(DEFAULT_VENV)
    if venv.exists():
        return str(venv), str(DEFAULT_VENV)
    logger.warning(
        "%s does not exist: environments run in the launcher's Python (%s, transformers 5: atroposlib's "
        "tokenize_for_trainer returns broken tokens there); %s",
        DEFAULT_VENV,
        sys.executable,
        INSTALL_HINT,
    )
    return sys.executable, FALLBACK


def resolve_env_python(entry_python: str | None, launcher_python: str | None) -> tuple[str, str]:
    """``(interpreter, where it was named)`` for one env: its entry's ``python``, ``atropos.launcher.env_python``,
    then :func:`default_env_python`. A relative path is taken from the working directory; ``~`` is expanded."""
    if entry_python:
        return _absolute(entry_python), "the entry's `python`"
    if launcher_python:
        return _absolute(launcher_python), "atropos.launcher.env_python"
    return default_env_python()


def _absolute(path: str) -> str:
    """``~`` expanded and made absolute, but not resolved: a venv's ``bin/python`` is a symlink to its base."""
    return os.path.abspath(os.path.expanduser(path))


def env_python_problem(python: str, timeout_s: float = 120.0) -> str | None:
    """None when ``python`` exists and imports atroposlib; else why not (one line, without the fix)."""
    if not Path(python).is_file() or not os.access(python, os.X_OK):
        return f"{python} does not exist or is not executable"
    try:
        done = subprocess.run(
            [python, "-c", "import atroposlib"], capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{python} could not be run ({exc})"
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["exit code " + str(done.returncode)])[-1]
        return f"{python} cannot import atroposlib ({last})"
    return None


def _pip(python: Path, *args: str) -> None:
    subprocess.run([str(python), "-m", "pip", "install", "-q", *args], check=True)


@contextlib.contextmanager
def _project_lock() -> Iterator[None]:
    """Hold an exclusive lock on the project folder: an editable install writes ``atropos_verl.egg-info`` into it, and
    ``make install`` builds the trainer's venv beside this one (its editable install runs under ``flock .``, the same
    lock)."""
    fd = os.open(PROJECT_ROOT, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def build(venv: Path = DEFAULT_VENV, requirements: list[Path] | None = None, base_python: str | None = None) -> Path:
    """Create ``venv`` (if needed) with the pins and this project (``--no-deps -e``), then each requirements file
    under the pins. Idempotent; returns the venv's interpreter."""
    venv = Path(venv).absolute()
    python = venv_python(venv)
    if not python.exists():
        subprocess.run([base_python or sys.executable, "-m", "venv", str(venv)], check=True)
        _pip(python, "--upgrade", "pip")
    constraints = venv / "constraints.txt"  # the pins hold for every later --requirements
    constraints.write_text("".join(f"{pin}\n" for pin in PINS))
    _pip(python, *PINS)
    with _project_lock():
        _pip(python, "--no-deps", "-e", str(PROJECT_ROOT))
    for path in requirements or []:
        _pip(python, "-c", str(constraints), "-r", str(Path(path).absolute()))
    return python


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"the venv (default {DEFAULT_VENV})")
    parser.add_argument(
        "--requirements",
        "-r",
        type=Path,
        action="append",
        default=[],
        help="an environment's requirements.txt, installed under the pins (repeatable)",
    )
    parser.add_argument("--python", default=None, help="the Python 3.11 to create the venv with (default: this one)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in args.requirements if not p.is_file()]
    if missing:
        parser.error(f"no such requirements file: {', '.join(missing)}")
    start = time.monotonic()
    try:
        python = build(args.venv, args.requirements, args.python)
    except subprocess.CalledProcessError as exc:
        print(f"env_python: `{' '.join(map(str, exc.cmd))}` failed (exit {exc.returncode})", file=sys.stderr)
        return 1
    took = time.monotonic() - start
    print(f"{python} ready (atroposlib {ATROPOSLIB_PIN}, transformers {TRANSFORMERS_PIN}; {took:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
