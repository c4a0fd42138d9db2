"""Training: the state and optimizer (`state`), the step (`step`), the loop (`loop`), checkpoints
(`checkpoints`), the device mesh (`mesh`) and the metric writers (`writers`)."""
