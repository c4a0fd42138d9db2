"""Loading a checkpoint for evaluation, inference and export: `load_model` rebuilds the network from
the checkpoint's own config and restores the chosen weights (which: `selection`)."""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from star_jax import layouts
from star_jax import models
from star_jax.checkpoints import format as format_lib
from star_jax.checkpoints import selection
from star_jax.checkpoints.format import CorruptCheckpointError


@dataclasses.dataclass
class LoadedModel:
  """A model read back from a checkpoint, and what exactly was read.

  model: the network in eval mode. config: the config stored with it (the model was rebuilt from
  it). step: the checkpoint step. weights: 'ema' or 'model', the item the weights came from.
  directory: the checkpoint directory (absolute). best: the directory's best checkpoint by the model
  selection rule (None when no step holds an evaluation). chosen_by: how (step, weights) were chosen,
  in words, for reports.
  """
  model: nnx.Module
  config: ml_collections.ConfigDict
  step: int
  weights: str
  directory: pathlib.Path
  best: selection.Best | None = None
  chosen_by: str = ''

  @property
  def is_best(self) -> bool | None:
    """Whether the step and weights read are the best by the model selection rule (None: the
    directory records no evaluation to rank by)."""
    if self.best is None:
      return None
    return (self.step, self.weights) == (self.best.step, self.best.weights)

  def describe(self) -> dict:
    """What was read, for JSON reports: step, weights, best_by_protocol, chosen_by, best."""
    return {'step': self.step, 'weights': self.weights, 'best_by_protocol': self.is_best,
            'chosen_by': self.chosen_by, 'best': dataclasses.asdict(self.best) if self.best else None}


def load_model(path, *, step: int | str | None = None, weights: str | None = None) -> LoadedModel:
  """Builds the model from a checkpoint's config and restores its weights.

  path: a checkpoint directory or a training workdir.
  step: a step number; 'latest' or None for the latest step; 'best' for the best checkpoint by the
    model selection rule (`selection.best_checkpoint`: the official protocol); a checkpoint without a
    training history (converted) is read as its latest step.
  weights: 'ema' or 'model'. None: for step 'best' or a step number, the weights that won that
    step's evaluation; for the latest step, and for a step without an evaluation, the EMA weights when
    the step has them, else 'model' (`selection.choose_weights`).
  Raises FileNotFoundError for a missing directory, step or item; CorruptCheckpointError for a step
  that cannot be read (truncated, incomplete, not a star_jax checkpoint); CheckpointMismatchError when
  stored arrays do not fit the config's model (naming the key and both shapes); NonFiniteWeightsError
  for NaN or infinite weights (naming the arrays); selection.NoEvaluationError for 'best' in a training
  workdir that records no evaluation. All four are ValueErrors.
  """
  if weights is not None and weights not in format_lib.WEIGHTS:
    raise ValueError(f'weights must be one of {format_lib.WEIGHTS} or None, got {weights!r}')
  step = selection.parse_step(step)
  if not pathlib.Path(path).exists():
    raise FileNotFoundError(f'checkpoint directory {pathlib.Path(path).absolute()} does not exist')
  if not pathlib.Path(path).is_dir():
    raise CorruptCheckpointError(
        f'{pathlib.Path(path).absolute()} is a file, not a star_jax checkpoint directory (an official '
        'PyTorch .pkl is converted with `python -m star_jax.convert_pytorch`, or evaluated with --pytorch)')
  directory = format_lib.resolve_checkpoint_dir(path).absolute()
  with format_lib.reader(directory, create=False) as manager:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {directory} (no step subdirectories)')
    best = selection.best_of(manager)
    choice = selection.choose_step(manager, step, best)
    step = choice.step

    def unreadable(item: str, error: BaseException) -> CorruptCheckpointError:
      others = sorted(s for s in steps if s != step)
      hint = f'; the other steps here are {others}' if others else ''
      return CorruptCheckpointError(
          f'{directory} step {step}: cannot read its {item!r} item ({format_lib.short_error(error)}); the step is '
          f'incomplete or corrupt, or not a star_jax checkpoint{hint}')

    try:
      config = format_lib.config_from_json(format_lib.read_config(manager, step))
    except Exception as e:  # pylint: disable=broad-except  (any failure to read is a broken step)
      raise unreadable('config', e) from None
    try:
      metadata = manager.item_metadata(step)
      present = {k for k in format_lib.WEIGHTS if metadata is not None and metadata.get(k) is not None}
    except Exception as e:  # pylint: disable=broad-except
      raise unreadable('metadata', e) from None
    if 'model' not in present:
      raise FileNotFoundError(f'{directory} step {step} has no "model" item (it has '
                              f'{sorted(k for k, v in (metadata or {}).items() if v is not None)})')
    weights = selection.choose_weights(manager, choice, present, weights)

    # The model is built concretely and its random initial values are overwritten: numpy
    # initialisation takes about a second for the full model, whereas nnx.eval_shape spends ~5-8 s
    # in jax's tracer bookkeeping for its ~850 variables. The restore target itself is abstract.
    try:
      model = models.create_model(config, nnx.Rngs(0))
    except Exception as e:  # pylint: disable=broad-except  (a config from elsewhere)
      raise CorruptCheckpointError(f'{directory} step {step}: its stored config does not build a model '
                                   f'({format_lib.short_error(e)}); not a star_jax checkpoint?') from None
    graphdef, state = nnx.split(model)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          nnx.to_pure_dict(state))
    format_lib.check_shapes(format_lib.metadata_tree(metadata[weights]), target, weights, directory)
    try:
      restored = format_lib.restore(manager, step, **{weights: ocp.args.StandardRestore(target)})
    except Exception as e:  # pylint: disable=broad-except
      raise unreadable(weights, e) from None
  format_lib.check_finite(restored[weights], f'{directory} step {step} ({weights!r} item)')
  nnx.replace_by_pure_dict(state, restored[weights])
  model = nnx.merge(graphdef, state)
  model.eval()
  return LoadedModel(model=model, config=config, step=int(step), weights=weights, directory=directory, best=best,
                     chosen_by=', '.join(choice.chosen_by))


def check_compatible(stored: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError unless a checkpoint with config `stored` can be run under `config`: layouts of
  the same points and edges (300W and 300VW share theirs; a layout file may copy a built-in one), at
  the same input size."""
  want, have = layouts.get_layout(config.layout), layouts.get_layout(stored.layout)
  if not layouts.same_geometry(want, have):
    edges = ' with other edges' if want.num_points == have.num_points else ''
    raise ValueError(
        f'it predicts the {have.name} layout ({have.num_points} points), but the config evaluates '
        f'{config.data.name!r} in the {want.name} layout ({want.num_points} points{edges}): pass the config '
        f'of the dataset the checkpoint was trained on')
  if int(stored.data.image_size) != int(config.data.image_size):
    raise ValueError(
        f'it was trained on {stored.data.image_size}x{stored.data.image_size} crops, but the config '
        f'crops {config.data.image_size}x{config.data.image_size}: add '
        f'--config.data.image_size={stored.data.image_size}')
