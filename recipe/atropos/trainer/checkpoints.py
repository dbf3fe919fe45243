"""Which step a run resumes at, read the way verl's ``RayPPOTrainer._load_checkpoint`` reads it, without loading."""

from __future__ import annotations

import os

from omegaconf import DictConfig


def resume_step(trainer_cfg: DictConfig) -> int:
    """The step verl's ``_load_checkpoint`` will resume at (0 = from scratch).

    Same rules: ``resume_mode`` disable → 0; auto → the tracker file in ``default_local_dir`` (relative to the working
    directory), none → 0; resume_path → the ``global_step_N`` of ``resume_from_path``.
    """
    from verl.utils.checkpoint.checkpoint_manager import find_latest_ckpt_path

    mode = trainer_cfg.get("resume_mode", "auto")
    if mode == "disable":
        return 0
    if mode == "resume_path" and isinstance(trainer_cfg.get("resume_from_path"), str):
        folder = str(trainer_cfg.resume_from_path)
    else:
        folder = find_latest_ckpt_path(os.path.abspath(str(trainer_cfg.default_local_dir)))
    if folder is None or "global_step_" not in folder:
        return 0  # verl trains from scratch (auto) or fails with its own message
    return int(folder.split("global_step_")[-1].rstrip("/"))
