"""Fine-tuning initialisation (config.init_from): the first weights of a run from a star_jax checkpoint
or an official PyTorch `.pkl` (converted by `convert_pytorch`).

`initialize_from` works on the trainer's state (star_jax.training.state.TrainState) through its
fields alone: params, batch_stats, ema_params, ema_batch_stats and `replace`.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np
from flax import nnx

from star_jax import convert_pytorch
from star_jax import layouts
from star_jax import models
from star_jax.checkpoints import format as format_lib
from star_jax.checkpoints import loading


class InitFromError(ValueError):
  """config.init_from names weights that cannot start this run (missing, foreign, or not fitting)."""


def _merge(source, target, kept: list[str], prefix: str = ''):
  """`target` with the leaves of `source`, except those at the paths `kept`."""
  if isinstance(target, dict):
    return {k: _merge(source.get(k, {}) if isinstance(source, dict) else {}, v, kept,
                      f'{prefix}/{k}' if prefix else str(k))
            for k, v in target.items()}
  return target if prefix in kept else source


def _fit(source: dict, target: dict, strict: bool, where: str) -> tuple[dict, list[str]]:
  """`target` (a pure dict) with the arrays of `source` whose path and shape fit; the paths kept from
  `target`. With `strict`, any difference is a ValueError naming the paths and both shapes."""
  flat_source, flat_target = dict(format_lib.flatten(source)), dict(format_lib.flatten(target))
  misfits = [f'{k}: {tuple(flat_source[k].shape)} vs {tuple(v.shape)}' for k, v in flat_target.items()
             if k in flat_source and tuple(flat_source[k].shape) != tuple(v.shape)]
  missing = sorted(set(flat_target) - set(flat_source))
  if strict and (misfits or missing):
    raise InitFromError(f'{where} does not fit the model of this config (checkpoint vs config shapes): '
                        f'{misfits[:8]}{" ..." if len(misfits) > 8 else ""}; missing {missing[:8]}. Use the '
                        'config the weights were trained with (layout, model.*, data.image_size), or set '
                        'config.init_from_strict=False to load only what fits')
  kept = sorted(set(missing) | {m.split(':')[0] for m in misfits})
  return _merge(source, target, kept), kept


def _convert(state_dict, model, strict: bool, where: str) -> tuple[dict, list[str]]:
  """An official state dict as the pure dict of `model`, and the paths kept from `model`."""
  try:
    if strict:
      return convert_pytorch.convert_state_dict(state_dict, model), []
    return convert_pytorch.convert_matching(state_dict, model)
  except ValueError as e:
    raise InitFromError(f'{where}: {e}; set config.init_from_strict=False to load only what fits') from None


def _from_official(path: str, config, template: dict, strict: bool, where: str):
  """(weights, ema, kept, summary) of an official `.pkl`: its 'net', and 'net_ema' when present."""
  try:
    obj = convert_pytorch.read_torch_checkpoint(path)
  except Exception as e:  # pylint: disable=broad-except  (a foreign or damaged file: say which)
    raise InitFromError(f'{where}: cannot read it as an official PyTorch checkpoint '
                        f'({type(e).__name__}: {e})') from None
  if not isinstance(obj, dict) or 'net' not in obj:
    raise InitFromError(f'{where}: not an official STAR checkpoint (no "net" entry)')
  model = models.create_model(config, nnx.Rngs(int(config.seed)))
  nnx.replace_by_pure_dict(nnx.state(model), template)
  weights, kept = _convert(obj['net'], model, strict, where)
  ema = _convert(obj['net_ema'], model, strict, where)[0] if obj.get('net_ema') is not None else weights
  return weights, ema, kept, {'source': path, 'format': 'official', 'epoch': obj.get('epoch')}


def _from_star_jax(path: str, config, template: dict, strict: bool, where: str):
  """(weights, ema, kept, summary) of a star_jax checkpoint: its latest step's 'model' and 'ema'."""
  try:
    loaded = loading.load_model(path, weights='model')
  except (FileNotFoundError, ValueError) as e:
    raise InitFromError(f'{where}: {e}') from None
  have, want = layouts.get_layout(loaded.config.layout), layouts.get_layout(config.layout)
  # The same points on the same edges fit, whatever the names (300W into 300VW, or into your own
  # data in a layout file based on 300W).
  if strict and not layouts.same_geometry(have, want):
    raise InitFromError(f'{where} was trained in the {have.name} layout, this config is {want.name} '
                        f'({have.num_points} vs {want.num_points} points, or other edges): set '
                        'config.init_from_strict=False to load all but the heads')
  weights, kept = _fit(nnx.to_pure_dict(nnx.state(loaded.model)), template, strict, where)
  ema = weights
  if loaded.weights == 'model' and format_lib.has_item(loaded.directory, loaded.step, 'ema'):
    ema_model = loading.load_model(path, step=loaded.step, weights='ema').model
    ema = _fit(nnx.to_pure_dict(nnx.state(ema_model)), template, strict, where)[0]
  return weights, ema, kept, {'source': str(loaded.directory), 'format': 'star_jax', 'step': loaded.step}


def initialize_from(path: str, config: ml_collections.ConfigDict, state):
  """The start of a fine-tuning run: `state` (freshly initialised, step 0) with the model (and EMA)
  weights of `path`, an official `.pkl` (its 'net', and 'net_ema' when present) or a star_jax
  checkpoint directory / training workdir (its latest step's 'model' and 'ema'). The optimizer state
  stays fresh. With config.init_from_strict (the default) every weight must fit the model of
  `config`, else a ValueError names the misfits; without, the misfits (e.g. the heads of a layout with
  another number of points) keep their fresh values.

  Returns (state, summary): summary names the source, its step or epoch, and the variables kept fresh.
  """
  strict = bool(config.get('init_from_strict', True))
  template = format_lib.model_tree(state.params, state.batch_stats)
  where = f'init_from {path}'
  read = _from_official if os.path.isfile(path) else _from_star_jax
  weights, ema, kept, summary = read(path, config, template, strict, where)
  params, batch_stats = format_lib.with_tree(state.params, state.batch_stats, weights)
  state = state.replace(params=params, batch_stats=batch_stats)
  if state.ema_params is not None:
    # The EMA gets arrays of its own: it shares leaves with the weights when the source has no EMA,
    # or when leaves are kept fresh (both from one template), and the train step donates the state,
    # where one buffer cannot be donated twice.
    ema = jax.tree.map(np.array, ema)
    ema_params, ema_batch_stats = format_lib.with_tree(state.ema_params, state.ema_batch_stats, ema)
    state = state.replace(ema_params=ema_params, ema_batch_stats=ema_batch_stats)
  summary['kept_fresh'] = kept
  return state, summary
