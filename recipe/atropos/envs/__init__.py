"""Environments bundled with the recipe, each run by the launcher as its own process in the environments' interpreter
(``.venv-envs``): ``one_word_env`` (the demo), ``distill`` (a mixin that asks a teacher for log-probs) and
``one_word_distill_env``. They import atroposlib and, of the recipe, only ``records`` and ``polling``."""
