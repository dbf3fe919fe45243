"""The trainer driver process: :class:`RayAtroposTrainer` (verl's ``RayPPOTrainer`` on Atropos groups) and its
stages."""

from recipe.atropos.trainer.ray_trainer import RayAtroposTrainer

__all__ = ["RayAtroposTrainer"]
