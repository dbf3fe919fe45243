"""Setting a run up, before Ray starts (the trainer driver; the launcher's pre-flight for model assets).

``cpu_runtime``: the CPU runtime's settings and environment (which of :mod:`recipe.atropos.cpu` verl imports);
``placement``: colocated or split rollout, the split settings on CPU; ``weight_sync``: what a weight push carries
(full weights or a LoRA adapter) and the CPU checkpoint engine's name; ``cluster``: attaching to an existing Ray
cluster; ``gpu``: start-up checks of the GPU path; ``assets``: model files (the embedded demo model, the tiny test
model, a model directory's vocabulary size); ``tracking``: the wandb mode and folder (``atropos.wandb_mode``).
Nothing here imports torch or verl at module level, nor anything of the recipe but :mod:`recipe.atropos.setup`
itself.
"""
