"""HTTP between the trainer driver and the Atropos API: ``client`` (``AtroposClient``: register, poll whole batches,
acknowledge, drain; every group validated on arrival). Runs in the trainer driver (its Ray actor); what the client
fetches is kept on disk by :mod:`recipe.atropos.spool`."""
