"""Small Atropos environments of our own for tests of real env layouts (tests/integration/test_env_interpreter.py)
and end-to-end runs: real atroposlib ``BaseEnv`` subclasses that generate through their policy server and score
trivially (1.0 for a one-word reply), so a tiny model can train on them.

- ``two_servers_env.py``: ``config_init`` declares two servers, a policy (index 0) and a judge (index 1): the launcher
  passes such an env ``--config`` with an ``openai:`` list instead of ``--openai.*`` flags;
- ``pkg_env/``: an env inside a package (``env.py`` imports ``.helpers`` relatively), run as ``module: pkg_env.env``
  with ``pythonpath: [tests/envs]``.

Not a test module (no ``test_*.py`` here); run in the environments' interpreter (``.venv-envs``).
"""
