"""The training loop, in readable stages: setup, data, model, checkpoints, train, evaluate.

One `jax.jit`-compiled step over a 1-D mesh ('data') spanning every device of every process: the
batch is sharded over the mesh, the state is replicated, gradients and BatchNorm statistics are
reduced over the global batch by XLA. Works the same on one CPU, several devices and several hosts.

The workdir is written by process 0 alone, holding its lock (`star_jax.files.Lock`) for the whole
run; its files are the `workdir.Workdir`'s, and a write that fails stops the run with a
`WriteFailedError` saying what was kept. A resumed run takes the newest checkpoint that restores
(`checkpointing.resume`) and refuses a config that changes results unless `allow_config_change`.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import signal
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from star_jax import cli
from star_jax import files
from star_jax import mesh as mesh_lib
from star_jax.checkpoints import format as format_lib
from star_jax.checkpoints import init_from
from star_jax.checkpoints import selection
from star_jax.data import build
from star_jax.data import pipeline
from star_jax.data.annotations import AnnotationError
from star_jax.evaluation import evaluator as evaluator_lib
from star_jax.layouts import get_layout
from star_jax.training import checkpointing
from star_jax.training import state as state_lib
from star_jax.training import step as step_lib
from star_jax.training import workdir as workdir_lib
from star_jax.training import writers


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


# What `train_and_evaluate` raises for problems the user can act on (the message says what to do): the
# train command prints them as one line, without a traceback.
USER_ERRORS = (workdir_lib.WorkdirError, files.BusyError, format_lib.CheckpointError, init_from.InitFromError,
               NonFiniteLossError, pipeline.BadRecordError, AnnotationError, FileNotFoundError)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       allow_config_change: bool = False) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint that restores. Returns the
  final metrics.

  allow_config_change: resume even when the config differs from the checkpoint's in fields that
  change results (workdir.FREE_KEYS lists those that do not); the change is logged and recorded in
  `<workdir>/config_changes.jsonl`. Without it such a resume raises ConfigChangedError.
  Raises files.BusyError when another run holds the workdir, workdir.WriteFailedError when a file
  cannot be written, checkpoints.CheckpointError when no checkpoint restores or one does not fit.
  """
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  # Only process 0 writes the workdir, so only it takes the lock; the other processes of a multi-host
  # run share the workdir with it.
  lock = files.Lock.acquire(workdir) if is_main else None
  try:
    return _train_and_evaluate(config, workdir_lib.Workdir(workdir, is_main=is_main), allow_config_change)
  finally:
    if lock is not None:
      lock.release()


def _train_and_evaluate(config: ml_collections.ConfigDict, run: workdir_lib.Workdir, allow_config_change: bool):
  # ================================================================================================
  # Setup
  # ================================================================================================
  run.clean_stale_checkpoints()
  manager = checkpointing.training_manager(run.checkpoint_dir, keep=config.keep_checkpoints)
  # The config check comes first, before any data is read or built: a refused resume stops at once.
  check_config = functools.partial(workdir_lib.check_config, config, allow_config_change)
  newest = checkpointing.newest_config(manager)
  if newest is not None:
    check_config(*newest)
  layout = get_layout(config.layout)
  mesh = _mesh(config)
  replicated = mesh_lib.replicated(mesh)

  # ================================================================================================
  # Data
  # ================================================================================================
  train_source, test_source = _sources(config)
  steps_per_epoch = state_lib.steps_per_epoch(config, len(train_source))
  total_steps = state_lib.total_steps(config, steps_per_epoch)
  train_iter = iter(pipeline.train_dataset(config, train_source, seed=config.seed))
  logging.info('train: %d examples, %d steps per epoch, %d steps', len(train_source), steps_per_epoch,
               total_steps)

  # ================================================================================================
  # Model, optimizer and evaluator
  # ================================================================================================
  tx = state_lib.make_optimizer(config, steps_per_epoch)
  graphs, state = state_lib.create_train_state(config, tx, config.seed)
  state = jax.device_put(state, replicated)
  train_step = jax.jit(step_lib.make_train_step(graphs, tx, config), donate_argnums=(0,))
  evaluator = evaluator_lib.Evaluator(config, test_source, layout, mesh, graphs.eval)

  # ================================================================================================
  # Checkpoints: resume where the last good one left off, or start from init_from
  # ================================================================================================
  resumed = checkpointing.resume(manager, state, train_iter, replicated, is_main=run.is_main,
                                 corrupt_dir=run.path / checkpointing.CORRUPT_DIR, accept=check_config)
  if resumed is not None:
    state, train_iter = resumed.state, resumed.data_iter
    run.resumed(resumed.step, workdir_lib.config_changes(resumed.stored_config, config.to_dict()))
  elif config.get('init_from'):
    # Fine-tuning: the run's first weights come from elsewhere (a resumed run has its own).
    state = jax.device_put(_initialize_from(config, state), replicated)
  start_step = int(state.step)
  run.write_config(config)
  run.open_metrics()

  # ================================================================================================
  # Train
  # ================================================================================================
  eval_every = max(int(config.eval_every_epochs * steps_per_epoch), 1)
  ckpt_every = max(int(config.checkpoint_every_epochs * steps_per_epoch), 1)
  progress = writers.Progress(total_steps, start_step, config.batch_size, enabled=run.is_main and config.progress)
  train_metrics = _TrainMetrics(run, progress)
  stop = _StopOnSigterm()
  evaluation: dict = {}   # the last evaluation of this invocation
  # Wall time of this invocation: the first step (with its compilation), the whole loop, evaluation.
  seconds = {'first_step': 0.0, 'loop': 0.0, 'eval': 0.0}
  t_loop = time.perf_counter()
  try:
    with jax.set_mesh(mesh):
      for step in range(start_step + 1, total_steps + 1):
        batch = mesh_lib.to_global(next(train_iter), mesh)
        t_step = time.perf_counter()
        first = step == start_step + 1
        if first:   # every process compiles the step before any runs it (a multi-process run)
          mesh_lib.compile_on_every_process(train_step, state, batch)
        state, step_metrics = train_step(state, batch)
        if first:   # the first step compiles: time it on its own
          jax.block_until_ready(step_metrics['loss'])
          seconds['first_step'] = time.perf_counter() - t_step
        train_metrics.add(step_metrics)
        progress.update(step)
        last = step == total_steps
        if step % config.log_every_steps == 0 or last:
          train_metrics.sync(step)
        evaluated = step % eval_every == 0 or last
        if evaluated:
          train_metrics.sync(step)
          evaluation = evaluator.run(step, state_lib.eval_weights(state))
          run.write_scalars(step, {f'eval/{k}': v for k, v in evaluation.items()})
        # Every evaluated step is saved too: the official trainer writes best_model.pkl at any
        # evaluation that improves on the best, so the best must not fall between checkpoints (the
        # preservation policy keeps only the latest few and the best).
        if step % ckpt_every == 0 or evaluated or stop.requested:
          train_metrics.sync(step)
          run.save_checkpoint(manager, step, state, train_iter, config, evaluation if evaluated else None)
        if stop.requested:
          logging.warning('SIGTERM: saved step %d in %s; exiting', step, run.path)
          break
  finally:
    manager.wait_until_finished()
    if hasattr(train_iter, 'close'):  # Grain worker processes (config.data.num_workers > 0)
      train_iter.close()
    progress.close()
    run.close()
    stop.restore()
  seconds['loop'] = time.perf_counter() - t_loop
  seconds['eval'] = evaluator.seconds
  return _final(run, evaluation, seconds)


def _mesh(config) -> jax.sharding.Mesh:
  """The mesh over every device (the global batch must split evenly over them)."""
  if config.batch_size % jax.device_count():
    raise ValueError(f'config.batch_size={config.batch_size} must be a multiple of the '
                     f'{jax.device_count()} devices')
  logging.info('devices: %d (%s) in %d processes', jax.device_count(), jax.devices()[0].device_kind,
               jax.process_count())
  return mesh_lib.make_mesh()


def _initialize_from(config, state):
  """The fresh `state` with the weights of config.init_from (fine-tuning)."""
  state, summary = init_from.initialize_from(config.init_from, config, state)
  logging.info('initialised from %s (%s); kept freshly initialised: %s', summary['source'], summary['format'],
               summary['kept_fresh'] or 'nothing')
  return state


def _final(run: workdir_lib.Workdir, evaluation: dict, seconds: dict) -> dict:
  """The run's result (final_metrics.json): the last evaluation of this invocation, its timings, and the
  best checkpoint so far (earlier invocations included: what evaluate and predict load by default);
  {} when this invocation did not evaluate."""
  if not evaluation:
    return {}
  final = dict(evaluation, **{f'seconds/{k}': v for k, v in seconds.items()})
  best = selection.best_checkpoint(run.checkpoint_dir)
  if best is not None:
    final['best'] = dataclasses.asdict(best)
  run.write_final(final)
  return final


def _sources(config):
  """The train and test splits' records; a dataset that is not built or cannot be (a missing file, a
  malformed annotation: the message names the file and line) is the user's to fix, printed without a
  traceback by the train command."""
  try:
    return (build.load_source(config.data, config.data.train_split, layout=config.layout),
            build.load_source(config.data, config.data.test_split, layout=config.layout))
  except (FileNotFoundError, ImportError, ValueError) as e:
    raise cli.UserError(str(e)) from None


class _TrainMetrics:
  """The train steps' metrics, kept on the devices until a host sync (which waits for them) brings
  them to metrics.jsonl as their mean."""

  def __init__(self, run: workdir_lib.Workdir, progress: writers.Progress):
    self.run = run
    self.progress = progress
    self.pending = []

  def add(self, step_metrics: dict) -> None:
    self.pending.append(step_metrics)

  def sync(self, step: int) -> None:
    """Writes the pending metrics; raises NonFiniteLossError on a non-finite loss (before anything
    of that step is saved)."""
    if not self.pending:
      return
    host = jax.device_get(self.pending)
    self.pending.clear()
    losses = np.array([m['loss'] for m in host])
    if not np.all(np.isfinite(losses)):
      bad = step - len(host) + int(np.argmin(np.isfinite(losses))) + 1
      raise NonFiniteLossError(
          f'the training loss became {losses[~np.isfinite(losses)][0]} at step {bad}; stopping. '
          f'The last good checkpoint (step {self.run.last_saved}) is kept in {self.run.checkpoint_dir}. '
          'Lower config.lr or set config.loss.eig_clamp > 0.')
    mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
    self.run.write_scalars(step, {f'train/{k}': v for k, v in mean.items()})
    self.progress.set_postfix(loss=mean['loss'])


class _StopOnSigterm:
  """While installed: SIGTERM (preemption, `kill`) sets `requested`, and the loop finishes its step,
  saves and exits cleanly. `restore()` puts the previous handler back."""

  def __init__(self):
    self.requested = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    self.requested = True

  def restore(self) -> None:
    signal.signal(signal.SIGTERM, self._previous)
