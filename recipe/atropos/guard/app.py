"""The Atropos trajectory API behind validation: atroposlib's own ``run-api`` app, imported unchanged, behind the
guard's routes.

    python -m recipe.atropos.guard.app --host 127.0.0.1 --port 8000 --vocab-size 49152 --batch-size 64 \
        --rejected-file RUN/rejected_groups.jsonl --stats-file RUN/api_guard_stats.json

atroposlib's API queues any ScoredData whose types parse: a NaN score makes ``GET /batch`` answer 500 after popping
the batch, a token id past the vocabulary crashes the trainer's embedding, a group whose size does not divide the
batch size stalls batch formation forever, an empty group sits in the queue. The guard's FastAPI routes
(:mod:`recipe.atropos.guard.routes`, atroposlib's app mounted under them for every other path) check every
``POST /scored_data`` and ``/scored_data_list`` before atroposlib sees it (:func:`recipe.atropos.schema.validate_group`
with the vocabulary size and the batch size, then atroposlib's own ``ScoredData`` model); a bad group gets **422**
with the field and the reason, is counted, is appended to the rejected-groups file, and never enters the queue. Valid
groups of a list are still queued. Each body is parsed once, and the parsed group is what atroposlib queues.

Delivery (``--journal-dir``, :mod:`recipe.atropos.guard.journal`): every valid group is appended to the journal and
fsynced before the API answers 200, with an id carried in its ``group_overrides``
(:data:`recipe.atropos.schema.GROUP_ID_KEY`). It leaves the journal only when the trainer acknowledges it
(``POST /ack {"ids": [...]}`` → ``{"acked", "unknown"}``) after writing it to its own spool. A restarted API (after a
SIGKILL too) serves every unacknowledged group again; groups answered in a ``GET /batch`` and never acknowledged go
back to the queue when a trainer registers. So a group is delivered at least once; the trainer de-duplicates by id.

Bounded memory (``--max-queued-sequences``): atroposlib's in-memory queue holds at most that many sequences; further
groups stay on disk (the journal's backlog) and move into the queue as ``GET /batch`` drains it. A valid group is never
refused for capacity: ``GET /status-env`` reports the backlog in ``queue_size`` / ``self_queue_size`` too, so the
environments' own throttle (``max_batches_offpolicy``) holds them back.

It also warns when an environment registers a group size that cannot pack into the batch, and serves
``GET /guard/stats``: accepted/rejected counts (persisted in the stats file, so they survive an API restart) and the
group sizes waiting in the queue with whether a batch can form from them (the trainer's poll uses this to say why no
batch comes).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from dataclasses import asdict, fields

from recipe.atropos.access import Refusals, check_exposure, parse_networks
from recipe.atropos.guard.state import GuardSettings, GuardState


def guard_argv(port: int, settings: GuardSettings, *, host: str = "127.0.0.1", allow: Sequence[str] = ()) -> list[str]:
    """The command line that serves the guarded API (same interpreter): each of ``settings`` that is set becomes
    its option (``max_queued_sequences`` -> ``--max-queued-sequences``); unset (None, 0, "") leaves the guard's
    default."""
    import sys

    argv = [sys.executable, "-m", "recipe.atropos.guard.app", "--host", host, "--port", str(port)]
    options = {f"--{name.replace('_', '-')}": value for name, value in asdict(settings).items()}
    for flag, value in {**options, "--allow": ",".join(allow)}.items():
        if value:
            argv += [flag, str(value)]
    return argv


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    for f in fields(GuardSettings):
        parser.add_argument(f"--{f.name.replace('_', '-')}", default=None, **f.metadata)
    parser.add_argument("--allow", default="", help="client networks let in besides loopback (CIDRs, comma-separated)")
    args = parser.parse_args(argv)
    allow = [c for c in args.allow.split(",") if c.strip()]
    try:
        check_exposure(args.host, guarded=bool(allow), what="the Atropos API", key="atropos.launcher.api_allow")
        networks = parse_networks(allow) if allow else None
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import uvicorn

    from recipe.atropos.guard.routes import build_app

    state = GuardState(GuardSettings(**{f.name: getattr(args, f.name) for f in fields(GuardSettings)}))
    refusals = Refusals("the Atropos API", "set atropos.launcher.api_allow", state.count_refused)
    app = build_app(state, networks, refusals)
    # proxy_headers off: the allow-list judges the socket's peer, never a
    # client-supplied X-Forwarded-For.
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", proxy_headers=False)


if __name__ == "__main__":
    main()
