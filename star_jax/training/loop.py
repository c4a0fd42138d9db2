"""The training loop, in readable stages: setup, data, model, checkpoints, train, evaluate.

One `jax.jit`-compiled step over a 1-D mesh ('data') spanning every device of every process: the
batch is sharded over the mesh, the state is replicated, gradients and BatchNorm statistics are
reduced over the global batch by XLA. Works the same on one CPU, several devices and several hosts.

The workdir is written by process 0 alone, holding its lock (`training/workdir.py`) for the whole run;
every file is written whole (rename or one-write appends), and a write that fails stops the run with
a `WriteFailedError` saying what was kept. A resumed run takes the newest checkpoint that restores
(`checkpoints.resume`) and refuses a config that changes results unless `allow_config_change`.
"""

from __future__ import annotations

import json
import pathlib
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from star_jax import cli
from star_jax import models
from star_jax.data import build
from star_jax.data import pipeline
from star_jax.evaluation import scoring
from star_jax.layouts import get_layout
from star_jax.training import checkpoints
from star_jax.training import mesh as mesh_lib
from star_jax.training import state as state_lib
from star_jax.training import step as step_lib
from star_jax.training import workdir as workdir_lib
from star_jax.training import writers


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint that restores. Returns the
  final metrics.

  allow_config_change: resume even when the config differs from the checkpoint's in fields that
  change results (workdir.FREE_KEYS lists those that do not); the change is logged and recorded in
  `<workdir>/config_changes.jsonl`. Without it such a resume raises ConfigChangedError.
  Raises workdir.WorkdirBusyError when another run holds the workdir, workdir.WriteFailedError when a
  file cannot be written, checkpoints.CheckpointError when no checkpoint restores or one does not fit.
  """
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  # Only process 0 writes the workdir, so only it takes the lock; the other processes of a multi-host
  # run share the workdir with it.
  lock = workdir_lib.Lock.acquire(workdir) if is_main else None
  try:
    return _train_and_evaluate(config, workdir, is_main, allow_config_change)
  finally:
    if lock is not None:
      lock.release()


def _check_config(config, stored: dict, step: int, allow: bool) -> dict:
  """The result-changing differences of `config` from the `stored` one of checkpoint `step`; raises
  ConfigChangedError for any unless `allow`."""
  changes = workdir_lib.config_changes(stored, config.to_dict())
  if changes and not allow:
    raise workdir_lib.ConfigChangedError(
        f'the config differs from the one checkpoint step {step} was trained with, in fields that change '
        f'results: {workdir_lib.format_changes(changes)}. Resume with the same config, pass '
        '--allow_config_change to continue under the new one (recorded in config_changes.jsonl), or use '
        f'a new --workdir. (Free to change: {", ".join(workdir_lib.FREE_KEYS)}.)')
  return changes


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: pathlib.Path, is_main: bool,
                        allow_config_change: bool) -> dict:
  # ================================================================================================
  # Setup
  # ================================================================================================
  checkpoint_dir = workdir / 'checkpoints'
  if is_main:
    for name in checkpoints.clean_stale_tmp(checkpoint_dir):
      logging.warning('removed %s/%s, left by a checkpoint save that never finished', checkpoint_dir, name)
  manager = checkpoints.training_manager(checkpoint_dir, keep=config.keep_checkpoints)
  # The config check comes first, before any data is read or built: a refused resume stops at once.
  newest = checkpoints.newest_config(manager)
  if newest is not None:
    _check_config(config, newest[1], newest[0], allow_config_change)
  layout = get_layout(config.layout)
  mesh = mesh_lib.make_mesh()
  replicated = mesh_lib.replicated(mesh)
  if config.batch_size % jax.device_count():
    raise ValueError(f'config.batch_size={config.batch_size} must be a multiple of the '
                     f'{jax.device_count()} devices')
  logging.info('devices: %d (%s) in %d processes', jax.device_count(), jax.devices()[0].device_kind,
               jax.process_count())

  # ================================================================================================
  # Data
  # ================================================================================================
  try:
    train_source = build.load_source(config.data, config.data.train_split, layout=config.layout)
    test_source = build.load_source(config.data, config.data.test_split, layout=config.layout)
  except (FileNotFoundError, ImportError, ValueError) as e:
    # A dataset that is not built or cannot be (a missing file, a malformed annotation: the message
    # names the file and line): the user's to fix, printed without a traceback by the train command.
    raise cli.UserError(str(e)) from None
  steps_per_epoch = state_lib.steps_per_epoch(config, len(train_source))
  total_steps = state_lib.total_steps(config, steps_per_epoch)
  train_iter = iter(pipeline.train_dataset(config, train_source, seed=config.seed))
  logging.info('train: %d examples, %d steps per epoch, %d steps', len(train_source), steps_per_epoch,
               total_steps)

  # ================================================================================================
  # Model and optimizer
  # ================================================================================================
  tx = state_lib.make_optimizer(config, steps_per_epoch)
  graphs, state = state_lib.create_train_state(config, tx, config.seed)
  state = jax.device_put(state, replicated)
  train_step = jax.jit(step_lib.make_train_step(graphs, tx, config), donate_argnums=(0,))
  predict = jax.jit(models.make_predict_fn(graphs.eval, decode=config.model.get('decode', 'landmarks')))

  # ================================================================================================
  # Checkpoints: resume where the last good one left off
  # ================================================================================================
  resumed = checkpoints.resume(
      manager, state, train_iter, replicated, is_main=is_main, corrupt_dir=workdir / checkpoints.CORRUPT_DIR,
      accept=lambda step, stored: _check_config(config, stored, step, allow_config_change))
  if resumed is not None:
    state, train_iter = resumed.state, resumed.data_iter
    logging.info('resumed from step %d', resumed.step)
    changes = workdir_lib.config_changes(resumed.stored_config, config.to_dict())
    if changes and is_main:
      logging.warning('resuming step %d under a changed config (--allow_config_change): %s', resumed.step,
                      workdir_lib.format_changes(changes))
      _write(lambda: workdir_lib.record_config_change(workdir, step=resumed.step, changes=changes),
             workdir / workdir_lib.CONFIG_CHANGES_FILE, resumed.step, None, checkpoint_dir)
  elif config.get('init_from'):
    # Fine-tuning: the run's first weights come from elsewhere (a resumed run has its own).
    state, summary = checkpoints.initialize_from(config.init_from, config, state)
    state = jax.device_put(state, replicated)
    logging.info('initialised from %s (%s); kept freshly initialised: %s', summary['source'], summary['format'],
                 summary['kept_fresh'] or 'nothing')
  start_step = int(state.step)
  last_saved = resumed.step if resumed is not None else None
  if is_main:
    _write(lambda: workdir_lib.atomic_write_text(workdir / 'config.json', config.to_json_best_effort(indent=2)),
           workdir / 'config.json', last_saved, None, checkpoint_dir)

  def save(step: int, eval_metrics: dict | None):
    nonlocal last_saved
    try:
      checkpoints.save_training(manager, step, state, train_iter, config, metrics=eval_metrics)
    except Exception as e:  # pylint: disable=broad-except  (Orbax and TensorStore raise many kinds)
      if is_main:
        checkpoints.discard_failed_save(checkpoint_dir)  # the partial step: nothing half written is left
      raise workdir_lib.WriteFailedError(
          f'cannot save checkpoint step {step} in {checkpoint_dir} ({checkpoints.short_error(e)}); the partial '
          f'step was removed. {_kept(last_saved, writer.last_step, checkpoint_dir)}') from e
    last_saved = step

  # Training metrics: one JSON line (and one TensorBoard record) per write, by process 0.
  writer = _write(lambda: writers.MetricWriter(workdir, enabled=is_main), workdir / 'metrics.jsonl', last_saved,
                  None, checkpoint_dir)

  def write_scalars(step: int, scalars: dict):
    _write(lambda: writer.write_scalars(step, scalars), workdir / 'metrics.jsonl', last_saved, writer.last_step,
           checkpoint_dir, stopped_at=step)

  # SIGTERM (preemption, `kill`): finish the current step, save, exit cleanly.
  stop = {'requested': False}
  previous_handler = signal.signal(signal.SIGTERM, lambda *_: stop.update(requested=True))

  def run_eval(step: int) -> dict:
    t0 = time.perf_counter()
    out = {}
    variants = {'model': (state.params, state.batch_stats)}
    if config.ema:
      variants['ema'] = (state.ema_params, state.ema_batch_stats)
    for name, (params, batch_stats) in variants.items():
      batches = pipeline.eval_batches(config, test_source)
      results = scoring.predict_split(lambda im: predict(params, batch_stats, im), batches, mesh,
                                      config.data.image_size)
      summary = scoring.score(results, layout)
      out.update({f'{name}/{k}': v for k, v in summary.items() if isinstance(v, (int, float))})
    out['nme'] = out['ema/nme'] if config.ema else out['model/nme']
    write_scalars(step, {f'eval/{k}': v for k, v in out.items()})
    logging.info('step %d eval: %s', step, {k: round(v, 5) for k, v in out.items() if 'nme' in k})
    seconds['eval'] += time.perf_counter() - t0
    return out

  # ================================================================================================
  # Train
  # ================================================================================================
  progress = writers.Progress(total_steps, start_step, config.batch_size, enabled=is_main and config.progress)
  pending = []  # device-side metrics since the last host sync
  last_eval: dict = {}
  eval_every = max(int(config.eval_every_epochs * steps_per_epoch), 1)
  ckpt_every = max(int(config.checkpoint_every_epochs * steps_per_epoch), 1)
  # Wall time of this invocation: the first step (with its compilation), the whole loop, evaluation.
  seconds = {'first_step': 0.0, 'loop': 0.0, 'eval': 0.0}

  def sync_metrics(step: int):
    """Brings pending metrics to the host; raises on a non-finite loss (before anything is saved)."""
    if not pending:
      return
    host = jax.device_get(pending)
    pending.clear()
    losses = np.array([m['loss'] for m in host])
    if not np.all(np.isfinite(losses)):
      bad = step - len(host) + int(np.argmin(np.isfinite(losses))) + 1
      raise NonFiniteLossError(
          f'the training loss became {losses[~np.isfinite(losses)][0]} at step {bad}; stopping. '
          f'The last good checkpoint (step {last_saved}) is kept in {checkpoint_dir}. '
          'Lower config.lr or set config.loss.eig_clamp > 0.')
    mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
    write_scalars(step, {f'train/{k}': v for k, v in mean.items()})
    progress.set_postfix(loss=mean['loss'])

  t_loop = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      for step in range(start_step + 1, total_steps + 1):
        batch = mesh_lib.to_global(next(train_iter), mesh)
        t_step = time.perf_counter()
        state, step_metrics = train_step(state, batch)
        if step == start_step + 1:  # the first step compiles: time it on its own
          jax.block_until_ready(step_metrics['loss'])
          seconds['first_step'] = time.perf_counter() - t_step
        pending.append(step_metrics)
        progress.update(step)
        last = step == total_steps
        if step % config.log_every_steps == 0 or last:
          sync_metrics(step)
        if step % eval_every == 0 or last:
          sync_metrics(step)
          last_eval = run_eval(step)
        if step % ckpt_every == 0 or last or stop['requested']:
          sync_metrics(step)
          save(step, last_eval if step % eval_every == 0 or last else None)
        if stop['requested']:
          logging.warning('SIGTERM: saved step %d in %s; exiting', step, workdir)
          break
  finally:
    manager.wait_until_finished()
    if hasattr(train_iter, 'close'):  # Grain worker processes (config.data.num_workers > 0)
      train_iter.close()
    progress.close()
    writer.close()
    signal.signal(signal.SIGTERM, previous_handler)
  seconds['loop'] = time.perf_counter() - t_loop
  if not last_eval:
    return {}
  final = dict(last_eval, **{f'seconds/{k}': v for k, v in seconds.items()})
  if is_main:
    _write(lambda: workdir_lib.atomic_write_text(workdir / 'final_metrics.json', json.dumps(final, indent=2)),
           workdir / 'final_metrics.json', last_saved, writer.last_step, checkpoint_dir)
  return final


def _kept(checkpoint_step: int | None, metrics_step: int | None, checkpoint_dir: pathlib.Path) -> str:
  """What a stopped run leaves behind, for its error message."""
  ckpt = (f'Kept: checkpoint step {checkpoint_step} in {checkpoint_dir} (a new run resumes from it)'
          if checkpoint_step is not None else f'No checkpoint was written yet in {checkpoint_dir}')
  metrics = (f'; metrics.jsonl holds whole lines up to step {metrics_step}' if metrics_step is not None else '')
  return ckpt + metrics + '.'


def _write(fn, path: pathlib.Path, checkpoint_step, metrics_step, checkpoint_dir, stopped_at=None):
  """fn(), turning a failed write (OSError: disk full, ...) into WriteFailedError saying what was kept."""
  try:
    return fn()
  except OSError as e:
    where = f' at step {stopped_at}' if stopped_at is not None else ''
    raise workdir_lib.WriteFailedError(
        f'cannot write {e.filename or path} ({e.strerror or e}); the run stopped{where}. '
        f'{_kept(checkpoint_step, metrics_step, checkpoint_dir)}') from e
