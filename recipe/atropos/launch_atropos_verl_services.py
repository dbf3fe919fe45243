"""Entry point of the supervised run: ``python -m recipe.atropos.launch_atropos_verl_services --config YAML
[hydra overrides]`` starts the Atropos API, the trainer (which serves the inference endpoint) and the environments,
and supervises them (:mod:`recipe.atropos.launcher.supervisor`)."""

import sys

from recipe.atropos.launcher.supervisor import main

if __name__ == "__main__":
    sys.exit(main())
