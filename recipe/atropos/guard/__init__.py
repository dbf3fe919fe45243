"""The Atropos API process behind validation (``python -m recipe.atropos.guard.app``): ``app`` (the ASGI wrapper and
its command line) and ``state`` (counters, rejected groups, the queue kept across a clean stop)."""
