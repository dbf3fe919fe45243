"""Imported by every verl process (via VERL_USE_EXTERNAL_MODULES): registers the recipe's verl extensions.

- policy loss ``advantage_weighted_ce`` (``recipe.atropos.algos.losses``)
- advantage estimator ``atropos`` (``recipe.atropos.algos.advantages``)
"""

import recipe.atropos.algos.advantages  # noqa: F401  (registers the "atropos" advantage estimator)
import recipe.atropos.algos.losses  # noqa: F401  (registers the "advantage_weighted_ce" policy loss)

MODULE = __name__
