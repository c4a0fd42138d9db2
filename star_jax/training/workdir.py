"""The training workdir: its files (`Workdir`) and configs that do not change under a run's feet.

- `Workdir` owns what a run writes besides its checkpoints' contents: config.json, metrics.jsonl and
  the TensorBoard events (`writers.MetricWriter`), final_metrics.json, config_changes.jsonl, and the
  checkpoints/ folder's saves (`checkpointing`). Every file is written whole (`star_jax.files`), and a
  write that fails stops the run with a `WriteFailedError` saying what was kept.
- `config_changes`: the differences between two configs that change results. `FREE_KEYS` lists the
  fields that may change between a run and its resumption without changing what is trained.

The workdir's lock (one writer at a time) is `star_jax.files.Lock`, taken by `loop.train_and_evaluate`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import pathlib
import socket
from typing import Any

from absl import logging

from star_jax import files
from star_jax.checkpoints import format as format_lib
from star_jax.training import checkpointing
from star_jax.training import writers

CONFIG_CHANGES_FILE = 'config_changes.jsonl'

# Config fields that do not change what a run trains or how it is scored, so they may differ between a
# run and its resumption: the bookkeeping (how often to log, evaluate, save; how many checkpoints to
# keep; where the run stops), where the data is read from and how fast, and build options that only
# matter when a dataset is (re)built. Everything else (optimiser, schedule, batch size, model, loss,
# augmentation, dataset, seed, the evaluation subset) is a change of results.
FREE_KEYS = (
    'progress', 'log_every_steps', 'eval_every_epochs', 'checkpoint_every_epochs', 'keep_checkpoints',
    'total_steps', 'num_epochs', 'eval_batch_size',
    'data.data_dir', 'data.manual_dir', 'data.num_workers', 'data.prefetch', 'data.num_threads',
    'data.skip_bad_examples',
)

# Config fields added after workdirs were already being written, with the value that behaves as runs
# made before them did. A checkpoint's stored config that lacks one of these is not a change when the
# new config holds that value (so such workdirs still resume); any other value is.
ADDED_FIELDS = {
    'init_from': '', 'init_from_strict': True,
    'data.relabel_model': 'independent', 'data.annotators': 5, 'data.annotator_bias': 0.75,
    'loss.star_isotropic': 'pin',
}


class WorkdirError(Exception):
  """A problem with the workdir that stops a run; the message says what to do."""


class ConfigChangedError(WorkdirError):
  """The config differs from the one the checkpoint was trained with, in fields that change results."""


class WriteFailedError(WorkdirError):
  """A file of the run could not be written (disk full, ...); the message says what was kept."""


# ================================================================================================
# The files of a run
# ================================================================================================

class Workdir:
  """The files a training run writes in its workdir, and what a stopped run leaves behind.

  Process 0 writes (`is_main`); the other processes of a multi-host run share the workdir and write
  nothing. `last_saved` is the newest checkpoint step written or resumed (None before one), and every
  failed write raises WriteFailedError with `kept()`: that checkpoint, and how far metrics.jsonl got.
  """

  def __init__(self, path: pathlib.Path, *, is_main: bool):
    self.path = pathlib.Path(path)
    self.is_main = is_main
    self.checkpoint_dir = self.path / 'checkpoints'
    self.last_saved: int | None = None
    self.metrics: writers.MetricWriter | None = None

  def kept(self) -> str:
    """What a stopped run leaves behind, for its error message."""
    ckpt = (f'Kept: checkpoint step {self.last_saved} in {self.checkpoint_dir} (a new run resumes from it)'
            if self.last_saved is not None else f'No checkpoint was written yet in {self.checkpoint_dir}')
    metrics_step = self.metrics.last_step if self.metrics is not None else None
    metrics = (f'; metrics.jsonl holds whole lines up to step {metrics_step}' if metrics_step is not None else '')
    return ckpt + metrics + '.'

  @contextlib.contextmanager
  def _writing(self, path: pathlib.Path, stopped_at: int | None = None):
    """Within: a failed write (OSError: disk full, ...) becomes WriteFailedError saying what was kept."""
    try:
      yield
    except OSError as e:
      where = f' at step {stopped_at}' if stopped_at is not None else ''
      raise WriteFailedError(f'cannot write {e.filename or path} ({e.strerror or e}); the run stopped{where}. '
                             f'{self.kept()}') from e

  def clean_stale_checkpoints(self) -> None:
    """Deletes what checkpoint saves that never finished left behind (process 0, holding the lock)."""
    if not self.is_main:
      return
    for name in checkpointing.clean_stale_tmp(self.checkpoint_dir):
      logging.warning('removed %s/%s, left by a checkpoint save that never finished', self.checkpoint_dir, name)

  def resumed(self, step: int, changes: dict[str, tuple]) -> None:
    """Notes the resumed checkpoint; a resume under a changed config (allowed) is logged and recorded."""
    self.last_saved = step
    logging.info('resumed from step %d', step)
    if changes and self.is_main:
      logging.warning('resuming step %d under a changed config (--allow_config_change): %s', step,
                      format_changes(changes))
      with self._writing(self.path / CONFIG_CHANGES_FILE):
        record_config_change(self.path, step=step, changes=changes)

  def write_config(self, config) -> None:
    """config.json: the run's config as it is now."""
    if self.is_main:
      with self._writing(self.path / 'config.json'):
        files.atomic_write_text(self.path / 'config.json', config.to_json_best_effort(indent=2))

  def open_metrics(self) -> None:
    """Opens metrics.jsonl and the TensorBoard events for appending (every process; only 0 writes)."""
    with self._writing(self.path / 'metrics.jsonl'):
      self.metrics = writers.MetricWriter(self.path, enabled=self.is_main)

  def write_scalars(self, step: int, scalars: dict) -> None:
    """One line of metrics.jsonl (and one TensorBoard record)."""
    with self._writing(self.path / 'metrics.jsonl', stopped_at=step):
      self.metrics.write_scalars(step, scalars)

  def save_checkpoint(self, manager, step: int, state, data_iter, config, evaluation: dict | None) -> None:
    """Saves step `step` (with its evaluation, if any); a failed save is removed and stops the run."""
    try:
      checkpointing.save_training(manager, step, state, data_iter, config, metrics=evaluation)
    except Exception as e:  # pylint: disable=broad-except  (Orbax and TensorStore raise many kinds)
      if self.is_main:
        checkpointing.discard_failed_save(self.checkpoint_dir)  # the partial step: nothing half written is left
      raise WriteFailedError(
          f'cannot save checkpoint step {step} in {self.checkpoint_dir} ({format_lib.short_error(e)}); the partial '
          f'step was removed. {self.kept()}') from e
    self.last_saved = step

  def write_final(self, final: dict) -> None:
    """final_metrics.json: the last evaluation, the timings and the best checkpoint."""
    if self.is_main:
      with self._writing(self.path / 'final_metrics.json'):
        files.atomic_write_text(self.path / 'final_metrics.json', json.dumps(final, indent=2))

  def close(self) -> None:
    if self.metrics is not None:
      self.metrics.close()


# ================================================================================================
# Config changes
# ================================================================================================

_ABSENT = '<absent>'


def flatten(tree: dict, prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists become tuples (JSON turns the config's tuples into lists)."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = tuple(value) if isinstance(value, list) else value
  return out


def config_changes(old: dict, new: dict, *, free: tuple[str, ...] = FREE_KEYS) -> dict[str, tuple]:
  """{dotted key: (old value, new value)} for every field outside `free` that differs, including
  fields present in only one of the two (the other side is '<absent>'), except a field of
  `ADDED_FIELDS` absent from `old` and at its neutral value in `new`."""
  a, b = flatten(old), flatten(new)
  changes = {}
  for key in sorted(set(a) | set(b)):
    if key in free:
      continue
    va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
    if va is _ABSENT and key in ADDED_FIELDS and vb == ADDED_FIELDS[key]:
      continue
    if va != vb:
      changes[key] = (va, vb)
  return changes


def format_changes(changes: dict[str, tuple]) -> str:
  """'lr: 0.001 -> 0.01; batch_size: 4 -> 8'."""
  return '; '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in changes.items())


def check_config(config, allow: bool, step: int, stored: dict) -> dict:
  """The result-changing differences of `config` from the `stored` one of checkpoint `step`; raises
  ConfigChangedError for any unless `allow`. (The argument order fits `checkpointing.resume`'s
  `accept(step, stored)` once `config` and `allow` are bound.)"""
  changes = config_changes(stored, config.to_dict())
  if changes and not allow:
    raise ConfigChangedError(
        f'the config differs from the one checkpoint step {step} was trained with, in fields that change '
        f'results: {format_changes(changes)}. Resume with the same config, pass '
        '--allow_config_change to continue under the new one (recorded in config_changes.jsonl), or use '
        f'a new --workdir. (Free to change: {", ".join(FREE_KEYS)}.)')
  return changes


def record_config_change(directory, *, step: int, changes: dict[str, tuple]) -> None:
  """Appends what changed, when and by whom to `<directory>/config_changes.jsonl`."""
  files.append_json_line(pathlib.Path(directory) / CONFIG_CHANGES_FILE, {
      'time': datetime.datetime.now().isoformat(timespec='seconds'), 'resumed_from_step': int(step),
      'host': socket.gethostname(), 'pid': os.getpid(),
      'changes': {k: {'old': _jsonable(a), 'new': _jsonable(b)} for k, (a, b) in changes.items()}})


def _jsonable(value):
  return list(value) if isinstance(value, tuple) else value
