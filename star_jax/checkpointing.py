"""Model checkpoints: save a model (and its EMA) with its config; load a ready-to-run model back.

Format (a contract with the trainer, the evaluator and the converter): a checkpoint directory is an
Orbax `CheckpointManager` root with one subdirectory per step. Each step holds named items:
  'model'   the model's nnx state (parameters and BatchNorm statistics) as a pure nested dict of
            arrays (`nnx.to_pure_dict(nnx.state(model))`), saved with `ocp.args.StandardSave`;
  'ema'     optional, the same structure for the exponential moving average of the weights;
  'config'  the ml_collections config as JSON (`ocp.args.JsonSave(config.to_dict())`).
The trainer adds its own items ('opt_state', 'data_iter', 'meta') to the same steps (build the
model part of its save with `model_save_args`); readers restore with `ocp.args.Composite` naming
only the items they need, so they ignore the rest.
"""

from __future__ import annotations

import os
import pathlib

import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx

from star_jax.models import create_model


def _pure(model_or_state) -> dict:
  """nnx Module or State (or an already pure dict) -> pure nested dict of arrays."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state)
  if isinstance(model_or_state, nnx.State):
    return nnx.to_pure_dict(model_or_state)
  return model_or_state


def model_save_args(*, model, config, ema=None) -> dict:
  """The Composite items of a model checkpoint: {'model', 'config'[, 'ema']} -> ocp.args.

  For the trainer, which saves these together with its own items in one `manager.save`.
  """
  items = {'model': ocp.args.StandardSave(_pure(model)),
           'config': ocp.args.JsonSave(config.to_dict())}
  if ema is not None:
    items['ema'] = ocp.args.StandardSave(_pure(ema))
  return items


def _manager(directory, **options) -> ocp.CheckpointManager:
  # Handlers named up front, so that item metadata (shapes) can be read before restoring.
  handlers = {'model': ocp.StandardCheckpointHandler(), 'ema': ocp.StandardCheckpointHandler(),
              'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(**options))


def _tuples(tree):
  """JSON turns the config's tuples into lists; turn them back (configs here use tuples only)."""
  if isinstance(tree, dict):
    return {k: _tuples(v) for k, v in tree.items()}
  if isinstance(tree, list):
    return tuple(_tuples(v) for v in tree)
  return tree


def save_model_checkpoint(directory, *, model, config, ema=None, step: int = 0) -> str:
  """Writes step `step` of the checkpoint directory `directory` (created if needed).

  model / ema: nnx Modules or their States (ema optional). config: the ml_collections config the
  model was built from (load_model rebuilds the model from it). Blocks until written; returns the
  directory as an absolute path string.
  """
  directory = pathlib.Path(directory).absolute()
  with _manager(directory, create=True) as manager:
    manager.save(step, args=ocp.args.Composite(**model_save_args(model=model, config=config, ema=ema)))
    manager.wait_until_finished()
  return os.fspath(directory)


def _check_shapes(stored, abstract, name: str, directory):
  """Compares the stored item's array metadata with the model built from the config."""
  flat_stored = dict(_flatten(stored))
  flat_abstract = dict(_flatten(abstract))
  missing = sorted(set(flat_abstract) - set(flat_stored))
  unexpected = sorted(set(flat_stored) - set(flat_abstract))
  if missing or unexpected:
    raise ValueError(f'{directory}: item {name!r} does not fit the model built from its config: '
                     f'missing {missing}; unexpected {unexpected}')
  for key, meta in flat_stored.items():
    want = tuple(flat_abstract[key].shape)
    got = tuple(getattr(meta, 'shape', ()))
    if got != want:
      raise ValueError(f'{directory}: item {name!r} key {key}: stored shape {got} does not fit the '
                       f'model built from the stored config, which needs {want}')


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f'{prefix}/{k}' if prefix else str(k))
  else:
    yield prefix, tree


def load_model(directory, *, step: int | None = None, use_ema: bool = True):
  """Builds the model from a checkpoint's config and restores its weights; returns (model, config).

  step: None for the latest. use_ema: the 'ema' weights when the step has them, else 'model'.
  The model is in eval mode. Raises FileNotFoundError for a missing directory or step and
  ValueError when stored arrays do not fit the config's model (naming the key and both shapes).
  """
  directory = pathlib.Path(directory).absolute()
  if not directory.exists():
    raise FileNotFoundError(f'checkpoint directory {directory} does not exist')
  with _manager(directory, create=False) as manager:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {directory} (no step subdirectories)')
    if step is None:
      step = manager.latest_step()
    elif step not in steps:
      raise FileNotFoundError(f'{directory} has no step {step}; it has {sorted(steps)}')
    config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config
    config = ml_collections.ConfigDict(_tuples(config))
    metadata = manager.item_metadata(step)
    present = {k for k in ('model', 'ema') if metadata is not None and metadata.get(k) is not None}
    if 'model' not in present:
      raise FileNotFoundError(f'{directory} step {step} has no "model" item (it has '
                              f'{sorted(k for k, v in (metadata or {}).items() if v is not None)})')
    name = 'ema' if use_ema and 'ema' in present else 'model'

    # The model is built concretely and its random initial values are overwritten: numpy
    # initialisation takes about a second for the full model, whereas nnx.eval_shape spends ~5-8 s
    # in jax's tracer bookkeeping for its ~850 variables. The restore target itself is abstract.
    model = create_model(config, nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          nnx.to_pure_dict(state))
    _check_shapes(_metadata_tree(metadata[name]), target, name, directory)
    restored = manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(target)}))
  nnx.replace_by_pure_dict(state, restored[name])
  model = nnx.merge(graphdef, state)
  model.eval()
  return model, config


def _metadata_tree(meta):
  """Orbax item metadata (a tree-metadata wrapper or a plain tree) -> nested dict of ArrayMetadata."""
  return getattr(meta, 'tree', meta)
