"""Imported by every verl process (via VERL_USE_EXTERNAL_MODULES): registers the recipe's verl extensions.

- policy loss ``advantage_weighted_ce`` (:mod:`recipe.atropos.algos.losses`).

The recipe registers no advantage estimator: ``RayAtroposTrainer`` combines advantages itself
(:func:`recipe.atropos.algos.advantages.combine_advantages`), because verl's ``compute_advantage`` hands an estimator
neither the environments' token-level advantages nor the ``set_advantage_to_zero`` overrides.
"""

import recipe.atropos.algos.losses  # noqa: F401  (registers the "advantage_weighted_ce" policy loss)

MODULE = __name__
