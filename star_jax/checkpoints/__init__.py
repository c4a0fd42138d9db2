"""Checkpoints as files: the one on-disk format written by the trainer and the converter and read by
evaluation, inference and export; which step and weights a reader gets; fine-tuning initialisation.

  format.py     the items of a checkpoint, writing them, reading them without leftovers, the checks
  selection.py  the official model selection: which checkpoint and which weights, stated once
  loading.py    `load_model` (and `LoadedModel`, `check_compatible`)
  init_from.py  the first weights of a fine-tuning run (imports the PyTorch converter; not re-exported
                here, so that the converter can write checkpoints)

The trainer's saving, exact resume and recovery from broken steps are star_jax/training/checkpointing.py.

Format: a checkpoint directory is an Orbax `CheckpointManager` root with one subdirectory per step
(a training workdir keeps it in `<workdir>/checkpoints`). Each step holds named items:
  'model'      the model's nnx state (parameters and BatchNorm statistics) as a pure nested dict of
               arrays (`nnx.to_pure_dict`), saved with `ocp.args.StandardSave`;
  'ema'        optional, the same structure for the exponential moving average of the weights;
  'config'     the ml_collections config as JSON (`ocp.args.JsonSave`, layout files written out);
and, in the trainer's checkpoints only, 'opt_state' (optax state), 'data_iter' (the Grain
iterator's position) and 'meta' ({'step'}), and with each evaluated step its Orbax metrics (the
evaluation and its model selection, see `selection`). Readers restore with `ocp.args.Composite`
naming only the items they need, so they ignore the rest.

What can go wrong: readers (`load_model`) raise `CheckpointError`s (ValueErrors) that name the
directory, the step and the item, and refuse non-finite weights; a truncated file is reported once,
without the tracebacks Orbax's background reads would otherwise print.
"""

from star_jax.checkpoints.format import (CheckpointError, CheckpointMismatchError, CorruptCheckpointError,
                                         NonFiniteWeightsError, WEIGHTS, model_save_args, resolve_checkpoint_dir,
                                         save_model_checkpoint, short_error, stored_config)
from star_jax.checkpoints.loading import LoadedModel, check_compatible, load_model
from star_jax.checkpoints.selection import Best, NoEvaluationError, best_checkpoint, parse_step, select_weights

__all__ = [
    'Best', 'CheckpointError', 'CheckpointMismatchError', 'CorruptCheckpointError', 'LoadedModel',
    'NoEvaluationError', 'NonFiniteWeightsError', 'WEIGHTS', 'best_checkpoint', 'check_compatible', 'load_model',
    'model_save_args', 'parse_step', 'resolve_checkpoint_dir', 'save_model_checkpoint', 'select_weights',
    'short_error', 'stored_config',
]
