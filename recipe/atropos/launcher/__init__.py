"""The supervisor of a run (``python -m recipe.atropos.launch_atropos_verl_services``): ``config`` (composition,
verl-free), ``preflight`` (checks before any service starts), ``envs`` (the environments' entries, command lines and
registration), ``env_python`` (the environments' interpreter, ``.venv-envs``: build it, pick it per env),
``env_probe`` (run in an env's interpreter: what its ``config_init`` declares), ``processes`` (child process trees),
``report`` (console lines and the closing summary) and ``supervisor``
(:class:`~recipe.atropos.launcher.supervisor.Launcher`, ``main``)."""
