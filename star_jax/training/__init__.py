"""Training: the state and optimizer (`state`), the step (`step`), the loop (`loop`), the trainer's
checkpoint saving, exact resume and recovery (`checkpointing`), the workdir's files and config-change
rules (`workdir`), and the metric writers (`writers`). Checkpoints as files (the format, loading,
model selection) are star_jax.checkpoints; the lock and whole-file writes star_jax.files; the mesh
star_jax.mesh."""
