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


@dataclass(frozen=True)
class _Folder:
    """A folder of known files, given as a path or a string."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))


@dataclass(frozen=True)
class SpoolDir(_Folder):
    """The trainer's spool (see :mod:`recipe.atropos.spool` for what each file holds)."""

    @property
    def pending(self) -> Path:
        return self.root / "pending"

    def pending_file(self, seq: int) -> Path:
        return self.pending / f"{seq:010d}.json"

    @property
    def stale(self) -> Path:
        return self.root / "stale.jsonl"

    @property
    def trained(self) -> Path:
        return self.root / "trained.jsonl"

    @property
    def counters(self) -> Path:
        return self.root / "counters.json"

    @property
    def ledger(self) -> Path:
        """The endpoint's completion ledger (:class:`recipe.atropos.endpoint.ledger.CompletionLedger`)."""
        return self.root / "ledger.jsonl"


@dataclass(frozen=True)
class RunDir(_Folder):
    """A run directory (see the module docstring)."""

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    def log(self, name: str) -> Path:
        """The log file of service ``name`` (``trainer``, ``run-api``, an env's name, ``watchdog``)."""
        return self.logs / f"{name}.log"

    @property
    def trainer_log(self) -> Path:
        return self.log("trainer")

    @property
    def metrics_file(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def metrics_plot(self) -> Path:
        return self.root / "metrics.png"

    @property
    def summary(self) -> Path:
        return self.root / "summary.txt"

    @property
    def env_ids(self) -> Path:
        return self.root / "env_ids.json"

    @property
    def wait_file(self) -> Path:
        return self.root / "trainer_wait.json"

    @property
    def rejected_groups(self) -> Path:
        """Groups the guarded API refused."""
        return self.root / "rejected_groups.jsonl"

    @property
    def trainer_rejected(self) -> Path:
        """Groups the trainer's client refused (``atropos.rejected_groups_file`` unless set)."""
        return self.root / "rejected_groups_trainer.jsonl"

    @property
    def guard_stats(self) -> Path:
        return self.root / "api_guard_stats.json"

    @property
    def api_final_stats(self) -> Path:
        return self.root / "api_final_stats.json"

    @property
    def api_journal(self) -> Path:
        return self.root / "api_journal"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    def spool(self, configured: str | Path | None = None) -> SpoolDir:
        """The trainer's spool: ``configured`` (``atropos.spool.dir``) when set, else under :attr:`checkpoints`."""
        return SpoolDir(spool_dir(self.checkpoints, configured))

    @property
    def env_configs(self) -> Path:
        return self.root / "env_configs"

    @property
    def hydra(self) -> Path:
        return self.root / "hydra"

    @property
    def launcher_state(self) -> Path:
        return self.root / "launcher_state.json"
