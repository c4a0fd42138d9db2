"""The trainer's checkpoints: saving, exact resume, and recovery from broken steps (the format itself,
and reading a checkpoint for inference, are star_jax/checkpoints).

The trainer's manager keeps the latest N steps and the best by eval NME together
(`AnyPreservationPolicy`: `max_to_keep` with `best_fn` can delete the newest); each evaluated step is
saved with its evaluation as Orbax metrics (`checkpoints.selection`). Besides the model items a
training step holds 'opt_state' (optax state), 'data_iter' (the Grain iterator's position) and
'meta' ({'step'}).

What can go wrong, and what happens (README, "What happens when things go wrong"): Orbax writes each
step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a killed save leaves only
that temporary folder, which the trainer deletes at start-up (`clean_stale_tmp`); a save that raises
is discarded (`discard_failed_save`). A step that does not restore (truncated files, an empty folder)
is skipped by `resume`, which takes the newest step that restores and moves the broken ones aside,
never deleting them.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging as std_logging
import os
import pathlib
import shutil
import threading
import time
from typing import Callable

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from star_jax.checkpoints import format as format_lib
from star_jax.checkpoints.format import CheckpointError, CheckpointMismatchError
from star_jax.training.state import TrainState

CORRUPT_DIR = 'checkpoints_corrupt'


class NoUsableCheckpointError(CheckpointError):
  """No step of a training workdir restores."""


class _NoMissingMetricsWarning(std_logging.Filter):
  """Drops Orbax's warning for a save without metrics: with `best_fn` set it warns at every checkpoint
  that is not an evaluation's, which is as intended here (such steps are kept only as the latest)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


_METRICS_FILTER = _NoMissingMetricsWarning()


def training_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """The trainer's manager: keeps the latest `keep` steps and the best one (the lowest eval 'nme':
  by the official rule the better of the weights and their EMA; see `checkpoints.selection`)."""
  # Lower NME is better; on a tie the earliest step, as `selection.best_of` and the official trainer
  # choose (sorts are stable, so the step must be in the key).
  rank = lambda m: (m['nme'], m.get('step', 0))  # noqa: E731
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=keep),
      # Sorted descending, the last (kept) one is the best.
      cm.BestN(get_metric_fn=rank, reverse=True, n=1, keep_checkpoints_without_metrics=False),
  ])
  # best_fn too: without it Orbax keeps the metrics in memory only and never writes them with the step,
  # so a resumed run, and `best_checkpoint`, could not rank the earlier steps.
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=rank, best_mode='min',
                                         enable_async_checkpointing=False, create=True)
  logging.get_absl_logger().addFilter(_METRICS_FILTER)   # the same object: added once however often called
  # Handlers named up front, so that a step's item metadata (shapes) can be read before restoring it
  # and a partial restore (the config alone) knows every item.
  handlers = {'model': ocp.StandardCheckpointHandler(), 'ema': ocp.StandardCheckpointHandler(),
              'opt_state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
              'meta': ocp.JsonCheckpointHandler(), 'data_iter': grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), item_handlers=handlers, options=options)


def save_training(manager: ocp.CheckpointManager, step: int, state: TrainState, data_iter,
                  config: ml_collections.ConfigDict, metrics: dict | None = None):
  """Saves `state` and the data iterator at `step`.

  metrics: the step's evaluation (evaluation.evaluator: 'nme', 'best_weights', per-weights scores), saved as
  the step's Orbax metrics for best-N and `best_checkpoint`; numbers are stored as floats, text as is.
  """
  ema = None
  if state.ema_params is not None:
    ema = format_lib.model_tree(state.ema_params, state.ema_batch_stats)
  model = format_lib.model_tree(state.params, state.batch_stats)
  items = format_lib.model_save_args(model=model, config=config, ema=ema)
  items.update({
      'opt_state': ocp.args.StandardSave(state.opt_state),
      'meta': ocp.args.JsonSave({'step': int(step)}),
      'data_iter': grain.checkpoint.CheckpointSave(data_iter),
  })
  if metrics:
    metrics = {k: v if isinstance(v, str) else float(v) for k, v in metrics.items()}
    metrics['step'] = int(step)
  else:
    metrics = None
  manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)


def restore_training(manager: ocp.CheckpointManager, template: TrainState, data_iter, sharding,
                     step: int | None = None):
  """Restores the latest (or `step`) checkpoint into the structure of `template`.

  Returns (state, data_iter) with the iterator moved to where the checkpoint left it. Raises whatever
  Orbax raises for a step that does not restore (see `resume` for the trainer's use).
  """
  step = manager.latest_step() if step is None else step

  def abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)

  items = {
      'model': ocp.args.StandardRestore(abstract(format_lib.model_tree(template.params, template.batch_stats))),
      'opt_state': ocp.args.StandardRestore(abstract(template.opt_state)),
      'meta': ocp.args.JsonRestore(),
      'data_iter': grain.checkpoint.CheckpointRestore(data_iter),
  }
  if template.ema_params is not None:
    items['ema'] = ocp.args.StandardRestore(
        abstract(format_lib.model_tree(template.ema_params, template.ema_batch_stats)))
  restored = format_lib.restore(manager, step, **items)

  params, batch_stats = format_lib.with_tree(template.params, template.batch_stats, restored['model'])
  state = template.replace(step=jax.device_put(jax.numpy.asarray(restored['meta']['step'], jax.numpy.int32),
                                               sharding),
                           params=params, batch_stats=batch_stats, opt_state=restored['opt_state'])
  if template.ema_params is not None:
    ema_params, ema_batch_stats = format_lib.with_tree(template.ema_params, template.ema_batch_stats,
                                                       restored['ema'])
    state = state.replace(ema_params=ema_params, ema_batch_stats=ema_batch_stats)
  return state, data_iter


# ---- Resuming a training workdir: stale temporary folders, broken steps --------------------------

def clean_stale_tmp(directory) -> list[str]:
  """Deletes the temporary folders of saves that never finished (`<step>.orbax-checkpoint-tmp...`) at
  the top of a checkpoint directory; returns their names. Only safe while no save runs: the trainer
  calls it at start-up, holding the workdir's lock."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    return []
  removed = []
  for path in sorted(directory.iterdir()):
    if format_lib.TMP_MARKER in path.name:
      if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
      else:
        path.unlink(missing_ok=True)
      removed.append(path.name)
  return removed


def discard_failed_save(directory, timeout_s: float = 120.0) -> list[str]:
  """After a save that raised: waits for the writer threads Orbax started for the other items (they
  keep writing after the first one fails), then removes the partial step (see clean_stale_tmp)."""
  deadline = time.monotonic() + timeout_s
  for thread in threading.enumerate():
    if thread is not threading.current_thread() and type(thread).__module__.startswith('orbax.'):
      thread.join(timeout=max(0.0, deadline - time.monotonic()))
  return clean_stale_tmp(directory)


def move_aside(directory, step: int, corrupt_dir) -> pathlib.Path:
  """Moves step `step` of `directory` to `<corrupt_dir>/<step>-<timestamp>` (kept for inspection,
  never deleted); returns the new path."""
  corrupt_dir = pathlib.Path(corrupt_dir)
  corrupt_dir.mkdir(parents=True, exist_ok=True)
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  target = corrupt_dir / f'{step}-{stamp}'
  n = 1
  while target.exists():
    n += 1
    target = corrupt_dir / f'{step}-{stamp}-{n}'
  os.replace(pathlib.Path(directory) / str(step), target)
  return target


def _all_agree(ok: bool) -> bool:
  """Whether `ok` holds in every process (one process's read failure makes all of them skip a step,
  so that they all restore the same one)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


def _attempt(fn):
  """(fn(), None), or (None, the exception) when it raised; agreed across processes."""
  try:
    value, error = fn(), None
  except Exception as e:  # pylint: disable=broad-except  (any failure to read is a broken step)
    value, error = None, e
  if not _all_agree(error is None) and error is None:
    error = RuntimeError('another process could not read it')
  return value, error


def newest_config(manager: ocp.CheckpointManager) -> tuple[int, dict] | None:
  """(step, stored config) of the newest step whose config reads, or None. For an early config check:
  steps whose config does not read are left for `resume` to report."""
  for step in sorted(manager.all_steps(), reverse=True):
    stored, error = _attempt(lambda s=step: format_lib.read_config(manager, s))
    if error is None:
      return step, stored
  return None


def _fits(manager, step: int, template: TrainState, stored_config: dict) -> list[str]:
  """What does not fit between the step's stored model (and EMA) arrays and the template's:
  ['item key: stored (..), needed (..)', ...]; [] when everything fits. Raises (a broken step) when an
  item that the step's own config says it holds is missing."""
  metadata = manager.item_metadata(step)
  wanted = {'model': format_lib.model_tree(template.params, template.batch_stats)}
  if template.ema_params is not None:
    wanted['ema'] = format_lib.model_tree(template.ema_params, template.ema_batch_stats)
  problems = []
  for item, tree in wanted.items():
    stored = metadata.get(item) if metadata is not None else None
    if stored is None:
      if item == 'model' or stored_config.get('ema', True):
        raise FileNotFoundError(f'its {item!r} item is missing')
      problems.append(f'{item}: not stored (trained without an EMA)')
      continue
    have, want = dict(format_lib.flatten(format_lib.metadata_tree(stored))), dict(format_lib.flatten(tree))
    for key in sorted(set(have) | set(want)):
      a = tuple(getattr(have[key], 'shape', ())) if key in have else None
      b = tuple(want[key].shape) if key in want else None
      if a != b:
        problems.append(f'{item} {key}: stored {a if a is not None else "nothing"}, the config\'s model '
                        f'needs {b if b is not None else "nothing"}')
  return problems


@dataclasses.dataclass
class Resumed:
  """Where `resume` left off: the step, its state and iterator, its stored config (a dict)."""
  step: int
  state: TrainState
  data_iter: object
  stored_config: dict


def resume(manager: ocp.CheckpointManager, template: TrainState, data_iter, sharding, *,
           accept: Callable[[int, dict], dict], corrupt_dir, is_main: bool) -> Resumed | None:
  """Restores the newest step of a training workdir that restores; None when there is no step.

  Steps are tried newest first. A step whose files do not read (truncated, empty, partial) is skipped;
  once an older one restores, the skipped ones are moved to `corrupt_dir` (by process 0) with a
  warning naming each. When none restores, NoUsableCheckpointError names every step and why, and
  nothing is moved.

  accept(step, stored_config) is called before a step's arrays are read: it raises to refuse the
  step's config (ConfigChangedError) and returns the accepted changes ({} when none). A step whose
  stored arrays do not fit the template raises CheckpointMismatchError naming them and the changed
  config fields; with accepted changes, a step that fails to restore for another reason raises it too
  (the change, not the files, may be at fault), rather than being taken for a broken step.
  """
  directory = pathlib.Path(manager.directory)
  failures = []  # (step, why)
  for step in sorted(manager.all_steps(), reverse=True):
    stored, error = _attempt(lambda s=step: format_lib.read_config(manager, s))
    if error is not None:
      failures.append((step, f'config: {format_lib.short_error(error)}'))
      continue
    changes = accept(step, stored)
    restored, error = _attempt(lambda s=step: restore_training(manager, template, data_iter, sharding, s))
    if error is not None:
      # Why? Arrays that do not fit the model are the config's doing (Orbax refuses other shapes rather
      # than pad or cut them); only then is the step's metadata read (seconds), not on every resume.
      problems, meta_error = _attempt(lambda s=step: _fits(manager, s, template, stored))
      if meta_error is None and problems:
        raise CheckpointMismatchError(_mismatch_message(directory, step, problems, changes))
      if meta_error is None and changes:
        raise CheckpointMismatchError(
            f'{directory} step {step} does not restore under the changed config ({format_lib.short_error(error)}); '
            f'changed: {_format(changes)}')
      failures.append((step, format_lib.short_error(error)))
      continue
    _move_failures(manager, failures, corrupt_dir, is_main, resumed=step)
    state, data_iter = restored
    return Resumed(step=step, state=state, data_iter=data_iter, stored_config=stored)
  if failures:
    raise NoUsableCheckpointError(
        f'no checkpoint in {directory} restores; nothing was moved or deleted:\n'
        + '\n'.join(f'  step {s}: {why}' for s, why in failures)
        + f'\nMove the broken steps out of {directory} to start again from the newest good one, or '
        'use a new --workdir.')
  return None


def _format(changes: dict) -> str:
  return '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changes.items())


def _mismatch_message(directory, step: int, problems: list[str], changes: dict) -> str:
  shown = '; '.join(problems[:5]) + (f' and {len(problems) - 5} more' if len(problems) > 5 else '')
  if changes:
    why = f'the config fields that differ from the checkpoint\'s: {_format(changes)}'
  else:
    why = 'the config is the checkpoint\'s: the model code must have changed since it was written'
  return (f'{directory} step {step} holds a different model than this config builds ({shown}); {why}. '
          'Resume with the checkpoint\'s config, or start a new --workdir.')


def _move_failures(manager, failures, corrupt_dir, is_main: bool, resumed: int) -> None:
  """Moves the steps that failed to restore aside (process 0), then every process re-reads the steps."""
  if not failures:
    return
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('star_jax: before moving broken checkpoints aside')
  if is_main:
    for step, why in failures:
      target = move_aside(manager.directory, step, corrupt_dir)
      logging.warning('checkpoint step %d in %s does not restore (%s): moved aside to %s; resuming from '
                      'step %d', step, manager.directory, why, target, resumed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('star_jax: broken checkpoints moved aside')
  manager.reload()
