"""The trainer's checkpoints: everything needed to resume a run exactly.

A training checkpoint is a model checkpoint (see `checkpointing`: items 'model', 'ema', 'config',
which evaluate / predict load) plus the items only training needs: 'opt_state', 'data_iter' (the
Grain iterator's position) and 'meta' (step). Kept: the latest `keep` and the best by eval NME,
together (`AnyPreservationPolicy`), because `max_to_keep` with `best_fn` can delete the newest.
"""

from __future__ import annotations

import pathlib

import grain
import jax
import ml_collections
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as cm

from star_jax import checkpointing
from star_jax.train_steps import TrainState


def training_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=keep),
      # Lower NME is better: sort descending so the last (kept) one is the smallest.
      cm.BestN(get_metric_fn=lambda m: m['nme'], reverse=True, n=1, keep_checkpoints_without_metrics=False),
  ])
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=False,
                                         create=True)
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def _model_tree(params, batch_stats):
  return nnx.to_pure_dict(nnx.merge_state(params, batch_stats))


def save_training(manager: ocp.CheckpointManager, step: int, state: TrainState, data_iter,
                  config: ml_collections.ConfigDict, metrics: dict | None = None):
  """Saves `state` and the data iterator at `step` (metrics: the eval results, for best-N)."""
  ema = None
  if state.ema_params is not None:
    ema = _model_tree(state.ema_params, state.ema_batch_stats)
  items = checkpointing.model_save_args(model=_model_tree(state.params, state.batch_stats), config=config, ema=ema)
  items.update({
      'opt_state': ocp.args.StandardSave(state.opt_state),
      'meta': ocp.args.JsonSave({'step': int(step)}),
      'data_iter': grain.checkpoint.CheckpointSave(data_iter),
  })
  metrics = {k: float(v) for k, v in metrics.items()} if metrics else None
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore_training(manager: ocp.CheckpointManager, template: TrainState, data_iter, sharding,
                     step: int | None = None):
  """Restores the latest (or `step`) checkpoint into the structure of `template`.

  Returns (state, data_iter) with the iterator moved to where the checkpoint left it.
  """
  step = manager.latest_step() if step is None else step

  def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

  items = {
      'model': ocp.args.StandardRestore(abstract(_model_tree(template.params, template.batch_stats))),
      'opt_state': ocp.args.StandardRestore(abstract(template.opt_state)),
      'meta': ocp.args.JsonRestore(),
      'data_iter': grain.checkpoint.CheckpointRestore(data_iter),
  }
  if template.ema_params is not None:
    items['ema'] = ocp.args.StandardRestore(
        abstract(_model_tree(template.ema_params, template.ema_batch_stats)))
  restored = manager.restore(step, args=ocp.args.Composite(**items))

  def split(tree, params, batch_stats):
    full = nnx.merge_state(params, batch_stats)
    nnx.replace_by_pure_dict(full, tree)
    return full.filter(nnx.Param), full.filter(nnx.BatchStat)

  params, batch_stats = split(restored['model'], template.params, template.batch_stats)
  state = template.replace(step=jax.device_put(jax.numpy.asarray(restored['meta']['step'], jax.numpy.int32),
                                               sharding),
                           params=params, batch_stats=batch_stats, opt_state=restored['opt_state'])
  if template.ema_params is not None:
    ema_params, ema_batch_stats = split(restored['ema'], template.ema_params,
                                        template.ema_batch_stats)
    state = state.replace(ema_params=ema_params, ema_batch_stats=ema_batch_stats)
  return state, data_iter
