"""The training loop, in readable stages: setup, data, model, checkpoints, train, evaluate.

One `jax.jit`-compiled step over a 1-D mesh ('data') spanning every device of every process: the
batch is sharded over the mesh, the state is replicated, gradients and BatchNorm statistics are
reduced over the global batch by XLA. Works the same on one CPU, several devices and several hosts.
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
from star_jax.training import writers


class NonFiniteLossError(RuntimeError):
  """The training loss became NaN or infinite."""


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint. Returns the final metrics."""
  # ================================================================================================
  # Setup
  # ================================================================================================
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  if is_main:
    (workdir / 'config.json').write_text(config.to_json_best_effort(indent=2))
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
  # Checkpoints: resume where the last one left off
  # ================================================================================================
  manager = checkpoints.training_manager(workdir / 'checkpoints', keep=config.keep_checkpoints)
  if manager.latest_step() is not None:
    state, train_iter = checkpoints.restore_training(manager, state, train_iter, replicated)
    logging.info('resumed from step %d', int(state.step))
  elif config.get('init_from'):
    # Fine-tuning: the run's first weights come from elsewhere (a resumed run has its own).
    state, summary = checkpoints.initialize_from(config.init_from, config, state)
    state = jax.device_put(state, replicated)
    logging.info('initialised from %s (%s); kept freshly initialised: %s', summary['source'], summary['format'],
                 summary['kept_fresh'] or 'nothing')
  start_step = int(state.step)

  def save(step: int, eval_metrics: dict | None):
    checkpoints.save_training(manager, step, state, train_iter, config, metrics=eval_metrics)

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
    writer.write_scalars(step, {f'eval/{k}': v for k, v in out.items()})
    logging.info('step %d eval: %s', step, {k: round(v, 5) for k, v in out.items() if 'nme' in k})
    seconds['eval'] += time.perf_counter() - t0
    return out

  # ================================================================================================
  # Train
  # ================================================================================================
  writer = writers.MetricWriter(workdir, enabled=is_main)
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
          f'The last good checkpoint (step {manager.latest_step()}) is kept in {workdir / "checkpoints"}. '
          'Lower config.lr or set config.loss.eig_clamp > 0.')
    mean = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
    writer.write_scalars(step, {f'train/{k}': v for k, v in mean.items()})
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
    (workdir / 'final_metrics.json').write_text(json.dumps(final, indent=2))
  return final
