"""Where the trainer's wandb run goes: its mode and its folder, and the console line that says so.

``atropos.wandb_mode`` (offline, online or disabled; offline by default) sets ``WANDB_MODE`` for the trainer unless the
environment sets ``WANDB_MODE`` already: the user's variable wins. wandb writes each run to ``<WANDB_DIR>/wandb/``
(``offline-run-<date>-<id>`` offline, ``run-<date>-<id>`` online: the local copy); the launcher sets ``WANDB_DIR`` to
the run directory unless the user set it, and ``main_atropos`` alone uses its working directory. Only the standard
library: the launcher imports this.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

WANDB_MODES = ("offline", "online", "disabled")  # atropos.wandb_mode
MODE_ENV = "WANDB_MODE"
DIR_ENV = "WANDB_DIR"


def wandb_mode(configured: str, environ: Mapping[str, str] | None = None) -> tuple[str, str]:
    """``(mode, where it comes from)``: ``$WANDB_MODE`` when set (``"WANDB_MODE"``), else ``configured``
    (``"atropos.wandb_mode"``)."""
    environ = os.environ if environ is None else environ
    if environ.get(MODE_ENV):
        return environ[MODE_ENV], MODE_ENV
    return configured, "atropos.wandb_mode"


def wandb_base(default: str | Path, environ: Mapping[str, str] | None = None) -> Path:
    """The folder wandb makes its ``wandb/`` folder in: ``$WANDB_DIR`` when set, else ``default``, absolute."""
    environ = os.environ if environ is None else environ
    return Path(environ.get(DIR_ENV) or default).expanduser().resolve()


def latest_wandb_run(base: Path) -> Path | None:
    """The newest run folder wandb wrote under ``<base>/wandb`` (``offline-run-*`` or ``run-*``), None if none."""
    runs = [p for p in (Path(base) / "wandb").glob("*run-*") if p.is_dir() and not p.is_symlink()]
    return max(runs, key=lambda p: p.name.split("run-", 1)[1], default=None)  # run-YYYYMMDD_HHMMSS-<id>


def wandb_line(
    loggers: Sequence[str], mode: str, source: str, base: Path, project: str, name: str, latest: bool = True
) -> str | None:
    """The console line on the trainer's wandb run (None when ``trainer.logger`` has no wandb):

    ``wandb: offline (atropos.wandb_mode), runs in /run/wandb; upload with `wandb sync /run/wandb/offline-run-*```
    ``wandb: online (WANDB_MODE), project atropos_verl, run grpo; local copy in /run/wandb``
    ``wandb: disabled (atropos.wandb_mode): nothing is logged to wandb``

    With ``latest`` (as a run ends), the offline line names the newest run folder (:func:`latest_wandb_run`) instead of
    the ``*`` pattern; without (as a run starts: each launch of a resumed run makes a new wandb run), the pattern."""
    if "wandb" not in loggers:
        return None
    folder = Path(base) / "wandb"
    if mode == "disabled":
        return f"wandb: disabled ({source}): nothing is logged to wandb"
    if mode == "online":
        return f"wandb: online ({source}), project {project}, run {name}; local copy in {folder}"
    run = latest_wandb_run(base) if latest else None
    target = run if run is not None and run.name.startswith("offline-run-") else folder / "offline-run-*"
    return f"wandb: {mode} ({source}), runs in {folder}; upload with `wandb sync {target}`"
