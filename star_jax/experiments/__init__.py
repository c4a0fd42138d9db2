"""Experiments built on the trainer: `ambiguity` (does STAR reduce the harm of ambiguous labels?)."""
