"""The inference endpoint the environments call, served by the trainer driver (a thread of its Ray actor):
``server`` (``/generate``, ``/health``, pause/resume around weight updates), ``openai_routes`` (the OpenAI routes),
``traffic`` (per-route and per-env counters), ``backends`` (verl's rollout replicas by Ray handle, or vLLM over
HTTP), ``ledger`` (which policy version sampled each completion) and ``teacher`` (a frozen model served as a
distillation teacher, its own process: ``python -m recipe.atropos.endpoint.teacher``)."""
