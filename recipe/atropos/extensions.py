"""Imported by every verl process (via VERL_USE_EXTERNAL_MODULES): registers the recipe's verl extensions.

- policy loss ``advantage_weighted_ce`` (``recipe.atropos.losses``)
- advantage estimator ``atropos`` (``recipe.atropos.advantages``)
"""

import recipe.atropos.advantages  # noqa: F401  (registers the "atropos" advantage estimator)
import recipe.atropos.losses  # noqa: F401  (registers the "advantage_weighted_ce" policy loss)

MODULE = __name__
