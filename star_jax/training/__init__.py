"""Training: the state and optimizer (`state`), the step (`step`), the loop (`loop`), checkpoints
(`checkpoints`), the device mesh (`mesh`), the metric writers (`writers`) and the workdir's safety
rules: its lock, whole-file writes, config changes (`workdir`)."""
