"""The Atropos API process behind validation (``python -m recipe.atropos.guard.app``): ``app`` (its command line),
``routes`` (the FastAPI routes in front of atroposlib's app), ``wire`` (how a body is read and a group checked),
``journal`` (accepted groups on disk until acknowledged) and ``state`` (counters, rejected groups, the journal)."""
