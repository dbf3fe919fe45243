"""The supervisor of a run (the launcher process, ``python -m recipe.atropos.launch_atropos_verl_services``):
``config`` (composition, verl-free), ``preflight`` (checks before any service starts), ``env_entries`` (the
environments' entries, command lines and registration), ``env_python`` (the environments' interpreter,
``.venv-envs``: build it, pick it per env), ``env_probe`` (run in an env's interpreter: what its ``config_init``
declares), ``processes`` (child process trees), ``roles`` (what one launcher runs), ``watch`` (the console's waiting
line and env errors), ``report`` (console lines and the closing summary), ``accounting`` (where every group went)
and ``supervisor`` (:class:`~recipe.atropos.launcher.supervisor.Launcher`, ``main``). The run directory's files are
named by :mod:`recipe.atropos.rundir`."""
