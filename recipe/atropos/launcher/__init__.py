"""The supervisor of a run (``python -m recipe.atropos.launch_atropos_verl_services``): ``config`` (composition,
verl-free), ``preflight`` (checks before any service starts), ``envs`` (the environments' entries, command lines and
registration), ``processes`` (child process trees), ``report`` (console lines and the closing summary) and
``supervisor`` (:class:`~recipe.atropos.launcher.supervisor.Launcher`, ``main``)."""
