"""The files of a run: the launcher's run directory and the trainer's spool directory, by name, in one place.

A run directory (``atropos.launcher.run_dir``, :class:`RunDir`) is laid out by the launcher, which passes each
service its paths: the guarded API gets its rejected-groups file, counters and journal on its command line, the
trainer its metrics file, wait file, env-id file, rejected-groups file and checkpoint directory as overrides, and the
environments the metrics file (``ATROPOS_VERL_METRICS_FILE``) and, for a multi-server env, a ``--config`` file::

    logs/<service>.log             every process's output (trainer.log, run-api.log, <env>.log, watchdog.log)
    metrics.jsonl                  the trainer's step rows and the environments' evaluation rows
    env_ids.json                   env id -> env name, as each env registered (the trainer reads it for mixtures)
    trainer_wait.json              the step the trainer waits for data for, while it waits
    rejected_groups.jsonl          groups the guarded API refused (422), with the reason
    rejected_groups_trainer.jsonl  groups the trainer's client refused
    api_guard_stats.json           the guarded API's counters; api_final_stats.json: the same as the run ended
    api_journal/                   groups the guarded API accepted, until the trainer acknowledged them
    checkpoints/                   trainer.default_local_dir; checkpoints/spool/ (:class:`SpoolDir`) by default
    env_configs/<env>.yaml         the --config of an env that declares two or more servers
    hydra/                         Hydra's output directory of the trainer
    launcher_state.json, summary.txt, metrics.png   what the launcher writes as the run ends

A spool directory (``atropos.spool.dir``, else ``<trainer.default_local_dir>/spool``; :class:`SpoolDir`) holds the
trainer's fetched groups until a checkpoint has them (:mod:`recipe.atropos.spool`) and the endpoint's completion
ledger. Standard library only: every process may import this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPOOL = "spool"  # the spool's folder under trainer.default_local_dir


def spool_dir(checkpoints: str | Path, configured: str | Path | None = None) -> Path:
    """``configured`` (``atropos.spool.dir``) when set, else ``<checkpoints>/spool`` (``checkpoints``:
    ``trainer.default_local_dir``)."""
    return Path(configured) if configured else Path(checkpoints) / SPOOL


class _Entry:
    """A file or folder right under a folder's root: on an instance, ``folder.<attribute>`` is ``root / name``."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.__doc__ = f"``<root>/{name}``"

    def __get__(self, folder: _Folder | None, owner: type | None = None) -> Path:
        if folder is None:  # on the class: the entry itself (its name), for introspection and docs
            return self  # type: ignore[return-value]
        return folder.root / self.name


def _entries(*names: str) -> tuple[_Entry, ...]:
    return tuple(_Entry(name) for name in names)


@dataclass(frozen=True)
class _Folder:
    """A folder of known files, given as a path or a string."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


@dataclass(frozen=True)
class SpoolDir(_Folder):
    """The trainer's spool (see :mod:`recipe.atropos.spool` for what each file holds)."""

    # pending/: one file per fetched group not yet in a checkpoint (pending_file); ledger: the endpoint's completion
    # ledger (recipe.atropos.endpoint.ledger.CompletionLedger)
    pending, stale, trained, counters, ledger = _entries(
        "pending", "stale.jsonl", "trained.jsonl", "counters.json", "ledger.jsonl"
    )

    def pending_file(self, seq: int) -> Path:
        return self.pending / f"{seq:010d}.json"


@dataclass(frozen=True)
class RunDir(_Folder):
    """A run directory (see the module docstring)."""

    # by the process that writes them (the module docstring says what each holds)
    logs, env_configs, hydra = _entries("logs", "env_configs", "hydra")  # the launcher, as it starts services
    launcher_state, summary, metrics_plot = _entries("launcher_state.json", "summary.txt", "metrics.png")  # as it ends
    # the guarded API: refused groups (422), counters (live, and as the run ended), accepted groups until acknowledged
    rejected_groups, guard_stats, api_final_stats, api_journal = _entries(
        "rejected_groups.jsonl", "api_guard_stats.json", "api_final_stats.json", "api_journal"
    )
    # the trainer: step rows (and the envs' evaluation rows), the step it waits for, env ids, groups its client refused
    # (atropos.rejected_groups_file unless set), trainer.default_local_dir
    metrics_file, wait_file, env_ids = _entries("metrics.jsonl", "trainer_wait.json", "env_ids.json")
    trainer_rejected, checkpoints = _entries("rejected_groups_trainer.jsonl", "checkpoints")

    def log(self, name: str) -> Path:
        """The log file of service ``name`` (``trainer``, ``run-api``, an env's name, ``watchdog``)."""
        return self.logs / f"{name}.log"

    @property
    def trainer_log(self) -> Path:
        return self.log("trainer")

    def spool(self, configured: str | Path | None = None) -> SpoolDir:
        """The trainer's spool: ``configured`` (``atropos.spool.dir``) when set, else under :attr:`checkpoints`."""
        return SpoolDir(spool_dir(self.checkpoints, configured))
