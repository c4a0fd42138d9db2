"""Checkpoints: the one on-disk format written by the trainer and the converter, read by evaluation
and inference; and the trainer's save / resume.

Format: a checkpoint directory is an Orbax `CheckpointManager` root with one subdirectory per step
(a training workdir keeps it in `<workdir>/checkpoints`). Each step holds named items:
  'model'      the model's nnx state (parameters and BatchNorm statistics) as a pure nested dict of
               arrays (`nnx.to_pure_dict`), saved with `ocp.args.StandardSave`;
  'ema'        optional, the same structure for the exponential moving average of the weights;
  'config'     the ml_collections config as JSON (`ocp.args.JsonSave(config.to_dict())`);
and, in the trainer's checkpoints only, 'opt_state' (optax state), 'data_iter' (the Grain
iterator's position) and 'meta' ({'step'}). Readers restore with `ocp.args.Composite` naming only the
items they need, so they ignore the rest. The trainer keeps the latest N steps and the best by eval
NME, together (`AnyPreservationPolicy`: `max_to_keep` with `best_fn` can delete the newest).

Model selection (the official protocol): each evaluation scores both the weights and their EMA and
saves, with the step's Orbax metrics, 'nme' = the lower of the two, 'best_weights' = which of the two
it was ('model' or 'ema') and 'step'. The best checkpoint is the step with the lowest 'nme' (the
earliest on a tie, as the official trainer's strict `<`), read with its 'best_weights': the official
trainer keeps that network as `best_model.pkl`, whose `net` its tester evaluates (`best_checkpoint`,
`load_model(step='best')`). Workdirs trained before this rule have no metrics saved with their steps
(Orbax writes them only when `best_fn` is set): nothing ranks them, and 'best' falls back to the latest
step with its EMA weights, what the readers loaded before. A step whose metrics lack 'best_weights'
(its 'nme' was the EMA's) is ranked by that 'nme' and read as its EMA weights.

What can go wrong, and what happens (README, "What happens when things go wrong"): Orbax writes each
step into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a killed save leaves only
that temporary folder, which the trainer deletes at start-up (`clean_stale_tmp`). A step that does
not restore (truncated files, an empty folder) is skipped by `resume`, which takes the newest step
that restores and moves the broken ones aside, never deleting them. Readers (`load_model`) raise
`CheckpointError`s that name the directory, the step and the item, and refuse non-finite weights.
"""

from __future__ import annotations

import asyncio
import contextlib
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
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as cm

from star_jax import layouts
from star_jax.layouts import get_layout
from star_jax.models import create_model
from star_jax.training.state import TrainState

WEIGHTS = ('ema', 'model')
# config.model_selection: 'official' scores an evaluation by the better of the weights and their EMA
# (the official trainer); 'ema' by the EMA alone (star_jax before it followed the official protocol).
MODEL_SELECTIONS = ('official', 'ema')
# Orbax writes a step into '<step>.orbax-checkpoint-tmp' (items into '<item>.orbax-checkpoint-tmp')
# and renames it when complete.
TMP_MARKER = '.orbax-checkpoint-tmp'
CORRUPT_DIR = 'checkpoints_corrupt'


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked; the message names the directory, step and item."""


class CorruptCheckpointError(CheckpointError):
  """A step whose files cannot be read: truncated, incomplete, or not a star_jax checkpoint."""


class CheckpointMismatchError(CheckpointError):
  """Stored arrays that do not fit the model of the config (a different layout or model size)."""


class NonFiniteWeightsError(CheckpointError):
  """Weights with NaN or infinite values."""


class NoUsableCheckpointError(CheckpointError):
  """No step of a training workdir restores."""


# ---- Reading without leftovers ---------------------------------------------------------------------

def _run_sync_and_settle(coro):
  """Orbax's `asyncio_utils._run_sync_via_new_loop`, except that when the coroutine fails the loop
  first waits for the tasks it leaves running, then closes.

  Why: Orbax (0.12.8) reads a checkpoint's arrays under one `asyncio.gather`; when one read fails
  (a truncated file) the gather raises at once and Orbax closes its loop while the other reads are
  in flight. TensorStore then hands their results to the closed loop from its own threads, printing
  up to thousands of 'RuntimeError: Event loop is closed' tracebacks and 'Exception ignored in:
  <coroutine _read_array_index_and_device_put>' to stderr after our one-line error (issue 14).
  Waiting for those reads (local files: milliseconds) and collecting their exceptions leaves nothing
  behind. The result, and the exception raised, are Orbax's.
  """
  loop = asyncio.new_event_loop()
  try:
    asyncio.set_event_loop(loop)
    try:
      return loop.run_until_complete(coro)
    except BaseException:
      pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
      if pending:
        loop.run_until_complete(asyncio.wait(pending, timeout=120))
      for task in asyncio.all_tasks(loop):
        if task.done() and not task.cancelled():
          task.exception()          # retrieved: no 'exception was never retrieved' at collection
      raise
  finally:
    asyncio.set_event_loop(None)
    loop.close()


@contextlib.contextmanager
def _settled_reads():
  """Within: Orbax's synchronous runs (its restores) settle their tasks when they fail (above).

  Orbax's private helper is replaced only while a restore runs, and only when it exists under the
  expected name (other Orbax versions read as before, with whatever they print)."""
  try:
    from orbax.checkpoint._src import asyncio_utils  # pylint: disable=import-outside-toplevel
  except ImportError:
    asyncio_utils = None
  original = getattr(asyncio_utils, '_run_sync_via_new_loop', None)
  if original is None:
    yield
    return
  asyncio_utils._run_sync_via_new_loop = _run_sync_and_settle  # pylint: disable=protected-access
  try:
    yield
  finally:
    asyncio_utils._run_sync_via_new_loop = original  # pylint: disable=protected-access


def _restore(manager: ocp.CheckpointManager, step: int, **items):
  """manager.restore(step, Composite(**items)) with failed reads settled (`_run_sync_and_settle`)."""
  with _settled_reads():
    return manager.restore(step, args=ocp.args.Composite(**items))


def short_error(error: BaseException, limit: int = 300) -> str:
  """The first line of an error's root cause, shortened: TensorStore wraps the cause ('OUT_OF_RANGE:
  Error reading ... in OCDBT database') in a message of pages of JSON."""
  while error.__cause__ is not None:
    error = error.__cause__
  text = str(error).strip().splitlines()[0] if str(error).strip() else ''
  text = f'{type(error).__name__}: {text}' if text else type(error).__name__
  return text if len(text) <= limit else text[:limit] + '...'


def non_finite_arrays(tree) -> list[str]:
  """The '/'-joined paths of the float arrays of a pure nested dict that hold NaN or inf."""
  bad = []
  for name, value in _flatten(tree):
    array = np.asarray(value)
    if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
      bad.append(name)
  return bad


def check_finite(tree, where: str) -> None:
  """Raises NonFiniteWeightsError naming the arrays of `tree` with NaN or infinite values."""
  bad = non_finite_arrays(tree)
  if bad:
    more = f' and {len(bad) - 10} more' if len(bad) > 10 else ''
    raise NonFiniteWeightsError(f'{where}: {len(bad)} weight arrays hold NaN or infinite values: '
                                f'{", ".join(bad[:10])}{more}; refusing to use them')


# ================================================================================================
# Model checkpoints (trainer, converter, evaluation, inference)
# ================================================================================================

def _pure(model_or_state) -> dict:
  """nnx Module or State (or an already pure dict) -> pure nested dict of arrays."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state)
  if isinstance(model_or_state, nnx.State):
    return nnx.to_pure_dict(model_or_state)
  return model_or_state


def stored_config(config: ml_collections.ConfigDict) -> dict:
  """The config as a checkpoint stores it: a plain dict, with a layout file's layout written out as
  its JSON text (layouts.portable), so that the checkpoint loads without the file."""
  out = config.to_dict()
  out['layout'] = layouts.portable(config.layout)
  return out


def model_save_args(*, model, config, ema=None) -> dict:
  """The Composite items of a model checkpoint: {'model', 'config'[, 'ema']} -> ocp.args."""
  items = {'model': ocp.args.StandardSave(_pure(model)),
           'config': ocp.args.JsonSave(stored_config(config))}
  if ema is not None:
    items['ema'] = ocp.args.StandardSave(_pure(ema))
  return items


def _reader(directory, **options) -> ocp.CheckpointManager:
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
  with _reader(directory, create=True) as manager:
    manager.save(step, args=ocp.args.Composite(**model_save_args(model=model, config=config, ema=ema)))
    manager.wait_until_finished()
  return os.fspath(directory)


def resolve_checkpoint_dir(path) -> pathlib.Path:
  """A checkpoint directory, also when given a training workdir (checkpoints in `<workdir>/checkpoints`)."""
  p = pathlib.Path(path)
  has_steps = p.is_dir() and any(q.is_dir() and q.name.isdigit() for q in p.iterdir())
  if not has_steps and (p / 'checkpoints').is_dir():
    return p / 'checkpoints'
  return p


def _flatten(tree, prefix=''):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _flatten(v, f'{prefix}/{k}' if prefix else str(k))
  else:
    yield prefix, tree


def _check_shapes(stored, abstract, name: str, directory):
  """Compares the stored item's array metadata with the model built from the config."""
  flat_stored = dict(_flatten(stored))
  flat_abstract = dict(_flatten(abstract))
  missing = sorted(set(flat_abstract) - set(flat_stored))
  unexpected = sorted(set(flat_stored) - set(flat_abstract))
  if missing or unexpected:
    raise CheckpointMismatchError(f'{directory}: item {name!r} does not fit the model built from its config: '
                                  f'missing {missing[:10]}; unexpected {unexpected[:10]}')
  for key, meta in flat_stored.items():
    want = tuple(flat_abstract[key].shape)
    got = tuple(getattr(meta, 'shape', ()))
    if got != want:
      raise CheckpointMismatchError(f'{directory}: item {name!r} key {key}: stored shape {got} does not fit '
                                    f'the model built from the stored config, which needs {want}')


def _metadata_tree(meta):
  """Orbax item metadata (a tree-metadata wrapper or a plain tree) -> nested dict of ArrayMetadata."""
  return getattr(meta, 'tree', meta)


def select_weights(scores: dict, selection: str = 'official') -> tuple[float, str]:
  """(score, weights) of one evaluation: `scores` holds 'model/nme' and, with an EMA, 'ema/nme'.

  selection 'official': the lower of the two NMEs and whose it is; the weights win a tie, as in the
  official trainer, which scores `net` before `net_ema` and replaces its best only on a strictly lower
  NME. 'ema': the EMA's NME (the weights' without an EMA).
  """
  if selection not in MODEL_SELECTIONS:
    raise ValueError(f'model_selection must be one of {MODEL_SELECTIONS}, got {selection!r}')
  if 'ema/nme' not in scores:
    return float(scores['model/nme']), 'model'
  if selection == 'ema' or float(scores['ema/nme']) < float(scores['model/nme']):
    return float(scores['ema/nme']), 'ema'
  return float(scores['model/nme']), 'model'


@dataclasses.dataclass(frozen=True)
class Best:
  """The best checkpoint of a training run by the model selection rule.

  step: its step. weights: 'model' or 'ema', the weights that scored `nme` there. nme: the score.
  rule: 'official' (the better of weights and EMA at each evaluation), 'ema' (config.model_selection
  'ema': the EMA alone), or 'ema (written before the official rule)' for steps whose metrics have no
  'best_weights' (workdirs trained before star_jax followed the official protocol).
  """
  step: int
  weights: str
  nme: float
  rule: str


LEGACY_RULE = 'ema (written before the official rule)'


def _step_score(metrics, has_ema: bool) -> tuple[float, str, str] | None:
  """(nme, weights, rule) that a step's saved metrics record; None without an evaluation."""
  if not isinstance(metrics, dict) or not isinstance(metrics.get('nme'), (int, float)):
    return None
  weights = metrics.get('best_weights')
  if weights in WEIGHTS:
    return float(metrics['nme']), weights, str(metrics.get('selection', 'official'))
  # Saved before the official rule: 'nme' was the EMA's when the run had one, and the EMA was ranked.
  return float(metrics['nme']), 'ema' if has_ema else 'model', LEGACY_RULE


def _best(manager: ocp.CheckpointManager) -> Best | None:
  best = None
  for step in sorted(manager.all_steps()):
    try:
      metrics = manager.metrics(step)
    except Exception:  # pylint: disable=broad-except  (unreadable metrics: the step is not ranked)
      continue
    score = _step_score(metrics, _has_item(manager.directory, step, 'ema'))
    # Strictly lower: the earliest step wins a tie, as the official trainer's `best_metric > cur_metric`.
    if score is not None and np.isfinite(score[0]) and (best is None or score[0] < best.nme):
      best = Best(step=int(step), weights=score[1], nme=score[0], rule=score[2])
  return best


def best_checkpoint(path) -> Best | None:
  """The best step of a checkpoint directory or training workdir and its winning weights (see the
  module docstring); None when no kept step holds an evaluation (a converted checkpoint, a run that
  never evaluated)."""
  directory = resolve_checkpoint_dir(path).absolute()
  if not directory.is_dir():
    return None
  with _reader(directory, create=False) as manager:
    return _best(manager)


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
  best: Best | None = None
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


def parse_step(value) -> int | str | None:
  """A --step value: None, 'best', 'latest' or a step number (int or digits); ValueError otherwise."""
  if value is None or isinstance(value, int):
    return value
  text = str(value).strip().lower()
  if text in ('best', 'latest'):
    return text
  if text.isdigit():
    return int(text)
  raise ValueError(f"step must be 'best', 'latest' or a step number, got {value!r}")


def load_model(path, *, step: int | str | None = None, weights: str | None = None) -> LoadedModel:
  """Builds the model from a checkpoint's config and restores its weights.

  path: a checkpoint directory or a training workdir.
  step: a step number; 'latest' or None for the latest step; 'best' for the best checkpoint by the
    model selection rule (`best_checkpoint`: the official protocol), or the latest step when no step
    holds an evaluation.
  weights: 'ema' or 'model'. None: for step 'best' or a step number, the weights that won that
    step's evaluation (its recorded 'best_weights'; for 'best' the best checkpoint's winning weights);
    for the latest step (step None or 'latest', unchanged from before the official protocol), and for
    a step without an evaluation, the EMA weights when the step has them, else 'model'.
  Raises FileNotFoundError for a missing directory, step or item; CorruptCheckpointError for a step
  that cannot be read (truncated, incomplete, not a star_jax checkpoint); CheckpointMismatchError when
  stored arrays do not fit the config's model (naming the key and both shapes); NonFiniteWeightsError
  for NaN or infinite weights (naming the arrays). All three are ValueErrors.
  """
  if weights is not None and weights not in WEIGHTS:
    raise ValueError(f'weights must be one of {WEIGHTS} or None, got {weights!r}')
  step = parse_step(step)
  if not pathlib.Path(path).exists():
    raise FileNotFoundError(f'checkpoint directory {pathlib.Path(path).absolute()} does not exist')
  if not pathlib.Path(path).is_dir():
    raise CorruptCheckpointError(
        f'{pathlib.Path(path).absolute()} is a file, not a star_jax checkpoint directory (an official '
        'PyTorch .pkl is converted with `python -m star_jax.convert_pytorch`, or evaluated with --pytorch)')
  directory = resolve_checkpoint_dir(path).absolute()
  with _reader(directory, create=False) as manager:
    steps = manager.all_steps()
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {directory} (no step subdirectories)')
    best = _best(manager)
    chosen = []
    by_evaluation = step not in (None, 'latest')
    if step == 'best' and best is not None:
      step = best.step
      chosen.append(f'the best checkpoint by the {best.rule} model selection (NME {best.nme:.6g})')
      by_evaluation = 'best'
    elif step in (None, 'latest', 'best'):
      chosen.append('the latest step' + (' (no step holds an evaluation to rank by)' if step == 'best' else ''))
      step = manager.latest_step()
    elif step not in steps:
      raise FileNotFoundError(f'{directory} has no step {step}; it has {sorted(steps)}')
    else:
      chosen.append(f'step {step} as asked')

    def unreadable(item: str, error: BaseException) -> CorruptCheckpointError:
      others = sorted(s for s in steps if s != step)
      hint = f'; the other steps here are {others}' if others else ''
      return CorruptCheckpointError(
          f'{directory} step {step}: cannot read its {item!r} item ({short_error(error)}); the step is '
          f'incomplete or corrupt, or not a star_jax checkpoint{hint}')

    try:
      config = _restore(manager, step, config=ocp.args.JsonRestore()).config
      config = ml_collections.ConfigDict(_tuples(config))
    except Exception as e:  # pylint: disable=broad-except  (any failure to read is a broken step)
      raise unreadable('config', e) from None
    try:
      metadata = manager.item_metadata(step)
      present = {k for k in WEIGHTS if metadata is not None and metadata.get(k) is not None}
    except Exception as e:  # pylint: disable=broad-except
      raise unreadable('metadata', e) from None
    if 'model' not in present:
      raise FileNotFoundError(f'{directory} step {step} has no "model" item (it has '
                              f'{sorted(k for k, v in (metadata or {}).items() if v is not None)})')
    if weights is None:
      score = None
      if by_evaluation:
        try:
          score = _step_score(manager.metrics(step), 'ema' in present)
        except Exception:  # pylint: disable=broad-except  (unreadable metrics: as a step without any)
          pass
      if score is not None and score[1] in present:
        weights = score[1]
        chosen.append('with the weights that won there' if by_evaluation == 'best' else
                      f'the weights that won its evaluation ({score[2]} rule)')
      else:
        weights = 'ema' if 'ema' in present else 'model'
        chosen.append('its EMA weights' if weights == 'ema' else 'its only weights')
    elif weights not in present:
      raise FileNotFoundError(f'{directory} step {step} has no {weights!r} weights (it has {sorted(present)})')
    else:
      chosen.append(f'the {weights!r} weights as asked')

    # The model is built concretely and its random initial values are overwritten: numpy
    # initialisation takes about a second for the full model, whereas nnx.eval_shape spends ~5-8 s
    # in jax's tracer bookkeeping for its ~850 variables. The restore target itself is abstract.
    try:
      model = create_model(config, nnx.Rngs(0))
    except Exception as e:  # pylint: disable=broad-except  (a config from elsewhere)
      raise CorruptCheckpointError(f'{directory} step {step}: its stored config does not build a model '
                                   f'({short_error(e)}); not a star_jax checkpoint?') from None
    graphdef, state = nnx.split(model)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                          nnx.to_pure_dict(state))
    _check_shapes(_metadata_tree(metadata[weights]), target, weights, directory)
    try:
      restored = _restore(manager, step, **{weights: ocp.args.StandardRestore(target)})
    except Exception as e:  # pylint: disable=broad-except
      raise unreadable(weights, e) from None
  check_finite(restored[weights], f'{directory} step {step} ({weights!r} item)')
  nnx.replace_by_pure_dict(state, restored[weights])
  model = nnx.merge(graphdef, state)
  model.eval()
  return LoadedModel(model=model, config=config, step=int(step), weights=weights, directory=directory, best=best,
                     chosen_by=', '.join(chosen))


def check_compatible(stored: ml_collections.ConfigDict, config: ml_collections.ConfigDict) -> None:
  """Raises ValueError unless a checkpoint with config `stored` can be run under `config`: layouts of
  the same points and edges (300W and 300VW share theirs; a layout file may copy a built-in one), at
  the same input size."""
  want, have = get_layout(config.layout), get_layout(stored.layout)
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


# ================================================================================================
# Training checkpoints (save and exact resume)
# ================================================================================================

class _NoMissingMetricsWarning(std_logging.Filter):
  """Drops Orbax's warning for a save without metrics: with `best_fn` set it warns at every checkpoint
  that is not an evaluation's, which is as intended here (such steps are kept only as the latest)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return 'did not provide metrics' not in record.getMessage()


_METRICS_FILTER = _NoMissingMetricsWarning()


def training_manager(directory: pathlib.Path, keep: int) -> ocp.CheckpointManager:
  """The trainer's manager: keeps the latest `keep` steps and the best one (the lowest eval 'nme':
  by the official rule the better of the weights and their EMA; see `select_weights`)."""
  # Lower NME is better; on a tie the earliest step, as `_best` and the official trainer choose (sorts
  # are stable, so the step must be in the key).
  rank = lambda m: (m['nme'], m.get('step', 0))  # noqa: E731
  policy = cm.AnyPreservationPolicy([
      cm.LatestN(n=keep),
      # Sorted descending, the last (kept) one is the best.
      cm.BestN(get_metric_fn=rank, reverse=True, n=1, keep_checkpoints_without_metrics=False),
  ])
  # best_fn too: without it Orbax keeps the metrics in memory only and never writes them with the step
  # (workdirs written before this have none), so a resumed run, and `best_checkpoint`, could not rank
  # the earlier steps.
  options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=rank, best_mode='min',
                                         enable_async_checkpointing=False, create=True)
  logging.get_absl_logger().addFilter(_METRICS_FILTER)   # the same object: added once however often called
  # Handlers named up front, so that a step's item metadata (shapes) can be read before restoring it
  # and a partial restore (the config alone) knows every item.
  handlers = {'model': ocp.StandardCheckpointHandler(), 'ema': ocp.StandardCheckpointHandler(),
              'opt_state': ocp.StandardCheckpointHandler(), 'config': ocp.JsonCheckpointHandler(),
              'meta': ocp.JsonCheckpointHandler(), 'data_iter': grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), item_handlers=handlers, options=options)


def _model_tree(params, batch_stats):
  return nnx.to_pure_dict(nnx.merge_state(params, batch_stats))


def _with_tree(params, batch_stats, tree):
  """(params, batch_stats) of the same structure with the values of the pure dict `tree`."""
  full = nnx.merge_state(params, batch_stats)
  nnx.replace_by_pure_dict(full, tree)
  return full.filter(nnx.Param), full.filter(nnx.BatchStat)


class InitFromError(ValueError):
  """config.init_from names weights that cannot start this run (missing, foreign, or not fitting)."""


def _fit(source: dict, target: dict, strict: bool, where: str) -> tuple[dict, list[str]]:
  """`target` (a pure dict) with the arrays of `source` whose path and shape fit; the paths kept from
  `target`. With `strict`, any difference is a ValueError naming the paths and both shapes."""
  flat_source, flat_target = dict(_flatten(source)), dict(_flatten(target))
  misfits = [f'{k}: {tuple(flat_source[k].shape)} vs {tuple(v.shape)}' for k, v in flat_target.items()
             if k in flat_source and tuple(flat_source[k].shape) != tuple(v.shape)]
  missing = sorted(set(flat_target) - set(flat_source))
  if strict and (misfits or missing):
    raise InitFromError(f'{where} does not fit the model of this config (checkpoint vs config shapes): '
                     f'{misfits[:8]}{" ..." if len(misfits) > 8 else ""}; missing {missing[:8]}. Use the '
                     'config the weights were trained with (layout, model.*, data.image_size), or set '
                     'config.init_from_strict=False to load only what fits')
  kept = sorted(set(missing) | {m.split(':')[0] for m in misfits})

  def merge(src, tgt, prefix=''):
    if isinstance(tgt, dict):
      return {k: merge(src.get(k, {}) if isinstance(src, dict) else {}, v, f'{prefix}/{k}' if prefix else str(k))
              for k, v in tgt.items()}
    return tgt if prefix in kept else src
  return merge(source, target), kept


def initialize_from(path: str, config: ml_collections.ConfigDict, state: TrainState) -> tuple[TrainState, dict]:
  """The start of a fine-tuning run: `state` (freshly initialised, step 0) with the model (and EMA)
  weights of `path`, an official `.pkl` (its 'net', and 'net_ema' when present) or a star_jax
  checkpoint directory / training workdir (its latest step's 'model' and 'ema'). The optimizer state
  stays fresh. With config.init_from_strict (the default) every weight must fit the model of
  `config`, else a ValueError names the misfits; without, the misfits (e.g. the heads of a layout with
  another number of points) keep their fresh values.

  Returns (state, summary): summary names the source, its step or epoch, and the variables kept fresh.
  """
  from star_jax import convert_pytorch  # pylint: disable=import-outside-toplevel
  strict = bool(config.get('init_from_strict', True))
  template = _model_tree(state.params, state.batch_stats)
  where = f'init_from {path}'
  if os.path.isfile(path):
    try:
      obj = convert_pytorch.read_torch_checkpoint(path)
    except Exception as e:  # pylint: disable=broad-except  (a foreign or damaged file: say which)
      raise InitFromError(f'{where}: cannot read it as an official PyTorch checkpoint ({type(e).__name__}: {e})') from None
    if not isinstance(obj, dict) or 'net' not in obj:
      raise InitFromError(f'{where}: not an official STAR checkpoint (no "net" entry)')
    model = create_model(config, nnx.Rngs(int(config.seed)))
    nnx.replace_by_pure_dict(nnx.state(model), template)

    def convert(state_dict):
      try:
        if strict:
          return convert_pytorch.convert_state_dict(state_dict, model), []
        return convert_pytorch.convert_matching(state_dict, model)
      except ValueError as e:
        raise InitFromError(f'{where}: {e}; set config.init_from_strict=False to load only what fits') from None

    weights, kept = convert(obj['net'])
    ema = convert(obj['net_ema'])[0] if obj.get('net_ema') is not None else weights
    summary = {'source': path, 'format': 'official', 'epoch': obj.get('epoch')}
  else:
    try:
      loaded = load_model(path, weights='model')
    except (FileNotFoundError, ValueError) as e:
      raise InitFromError(f'{where}: {e}') from None
    have, want = get_layout(loaded.config.layout), get_layout(config.layout)
    # The same points on the same edges fit, whatever the names (300W into 300VW, or into your own
    # data in a layout file based on 300W).
    if strict and not layouts.same_geometry(have, want):
      raise InitFromError(f'{where} was trained in the {have.name} layout, this config is {want.name} '
                          f'({have.num_points} vs {want.num_points} points, or other edges): set '
                          'config.init_from_strict=False to load all but the heads')
    weights, kept = _fit(nnx.to_pure_dict(nnx.state(loaded.model)), template, strict, where)
    ema = weights
    if loaded.weights == 'model' and _has_item(loaded.directory, loaded.step, 'ema'):
      ema = _fit(nnx.to_pure_dict(nnx.state(load_model(path, step=loaded.step, weights='ema').model)), template,
                 strict, where)[0]
    summary = {'source': str(loaded.directory), 'format': 'star_jax', 'step': loaded.step}
  params, batch_stats = _with_tree(state.params, state.batch_stats, weights)
  state = state.replace(params=params, batch_stats=batch_stats)
  if state.ema_params is not None:
    # The EMA gets arrays of its own: it shares leaves with the weights when the source has no EMA,
    # or when leaves are kept fresh (both from one template), and the train step donates the state,
    # where one buffer cannot be donated twice.
    ema = jax.tree.map(np.array, ema)
    ema_params, ema_batch_stats = _with_tree(state.ema_params, state.ema_batch_stats, ema)
    state = state.replace(ema_params=ema_params, ema_batch_stats=ema_batch_stats)
  summary['kept_fresh'] = kept
  return state, summary


def _has_item(directory: pathlib.Path, step: int, item: str) -> bool:
  return (pathlib.Path(directory) / str(step) / item).is_dir()


def save_training(manager: ocp.CheckpointManager, step: int, state: TrainState, data_iter,
                  config: ml_collections.ConfigDict, metrics: dict | None = None):
  """Saves `state` and the data iterator at `step`.

  metrics: the step's evaluation (loop.run_eval: 'nme', 'best_weights', per-weights scores), saved as
  the step's Orbax metrics for best-N and `best_checkpoint`; numbers are stored as floats, text as is.
  """
  ema = None
  if state.ema_params is not None:
    ema = _model_tree(state.ema_params, state.ema_batch_stats)
  items = model_save_args(model=_model_tree(state.params, state.batch_stats), config=config, ema=ema)
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
      'model': ocp.args.StandardRestore(abstract(_model_tree(template.params, template.batch_stats))),
      'opt_state': ocp.args.StandardRestore(abstract(template.opt_state)),
      'meta': ocp.args.JsonRestore(),
      'data_iter': grain.checkpoint.CheckpointRestore(data_iter),
  }
  if template.ema_params is not None:
    items['ema'] = ocp.args.StandardRestore(
        abstract(_model_tree(template.ema_params, template.ema_batch_stats)))
  restored = _restore(manager, step, **items)

  params, batch_stats = _with_tree(template.params, template.batch_stats, restored['model'])
  state = template.replace(step=jax.device_put(jax.numpy.asarray(restored['meta']['step'], jax.numpy.int32),
                                               sharding),
                           params=params, batch_stats=batch_stats, opt_state=restored['opt_state'])
  if template.ema_params is not None:
    ema_params, ema_batch_stats = _with_tree(template.ema_params, template.ema_batch_stats, restored['ema'])
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
    if TMP_MARKER in path.name:
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


def read_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The config stored with `step`, as a plain dict (tuples as lists). Raises what Orbax raises."""
  return _restore(manager, step, config=ocp.args.JsonRestore()).config


def _all_agree(ok: bool) -> bool:
  """Whether `ok` holds in every process (one process's read failure makes all of them skip a step,
  so that they all restore the same one)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
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
    stored, error = _attempt(lambda s=step: read_config(manager, s))
    if error is None:
      return step, stored
  return None


def _fits(manager, step: int, template: TrainState, stored_config: dict) -> list[str]:
  """What does not fit between the step's stored model (and EMA) arrays and the template's:
  ['item key: stored (..), needed (..)', ...]; [] when everything fits. Raises (a broken step) when an
  item that the step's own config says it holds is missing."""
  metadata = manager.item_metadata(step)
  wanted = {'model': _model_tree(template.params, template.batch_stats)}
  if template.ema_params is not None:
    wanted['ema'] = _model_tree(template.ema_params, template.ema_batch_stats)
  problems = []
  for item, tree in wanted.items():
    stored = metadata.get(item) if metadata is not None else None
    if stored is None:
      if item == 'model' or stored_config.get('ema', True):
        raise FileNotFoundError(f'its {item!r} item is missing')
      problems.append(f'{item}: not stored (trained without an EMA)')
      continue
    have, want = dict(_flatten(_metadata_tree(stored))), dict(_flatten(tree))
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
    stored, error = _attempt(lambda s=step: read_config(manager, s))
    if error is not None:
      failures.append((step, f'config: {short_error(error)}'))
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
            f'{directory} step {step} does not restore under the changed config ({short_error(error)}); '
            f'changed: {_format(changes)}')
      failures.append((step, short_error(error)))
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
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    multihost_utils.sync_global_devices('star_jax: before moving broken checkpoints aside')
  if is_main:
    for step, why in failures:
      target = move_aside(manager.directory, step, corrupt_dir)
      logging.warning('checkpoint step %d in %s does not restore (%s): moved aside to %s; resuming from '
                      'step %d', step, manager.directory, why, target, resumed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('star_jax: broken checkpoints moved aside')
  manager.reload()
