"""The on-disk format of a star_jax checkpoint, written by the trainer and the converter, read by
evaluation, inference and export (the package docstring describes it).

Here: the items a checkpoint holds and how they are written (`model_save_args`,
`save_model_checkpoint`), how they are read without leftovers (`reader`, `restore`), and the checks
every reader makes (`check_shapes`, `check_finite`), with the errors they raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from star_jax import layouts

try:   # Orbax's private helper that runs a restore in a new event loop (see `_settled_reads`)
  from orbax.checkpoint._src import asyncio_utils as _orbax_asyncio
except ImportError:
  _orbax_asyncio = None

WEIGHTS = ('ema', 'model')
# Orbax writes a step into '<step>.orbax-checkpoint-tmp' (items into '<item>.orbax-checkpoint-tmp')
# and renames it when complete.
TMP_MARKER = '.orbax-checkpoint-tmp'


class CheckpointError(ValueError):
  """A checkpoint that cannot be used as asked; the message names the directory, step and item."""


class CorruptCheckpointError(CheckpointError):
  """A step whose files cannot be read: truncated, incomplete, or not a star_jax checkpoint."""


class CheckpointMismatchError(CheckpointError):
  """Stored arrays that do not fit the model of the config (a different layout or model size)."""


class NonFiniteWeightsError(CheckpointError):
  """Weights with NaN or infinite values."""


# ---- Reading without leftovers ---------------------------------------------------------------------

def _run_sync_and_settle(coro):
  """Orbax's `asyncio_utils._run_sync_via_new_loop`, except that when the coroutine fails the loop
  first waits for the tasks it leaves running, then closes.

  Why: Orbax (0.12.8) reads a checkpoint's arrays under one `asyncio.gather`; when one read fails
  (a truncated file) the gather raises at once and Orbax closes its loop while the other reads are
  in flight. TensorStore then hands their results to the closed loop from its own threads, printing
  up to thousands of 'RuntimeError: Event loop is closed' tracebacks and 'Exception ignored in:
  <coroutine _read_array_index_and_device_put>' to stderr after our one-line error. Waiting for those
  reads (local files: milliseconds) and collecting their exceptions leaves nothing behind. The
  result, and the exception raised, are Orbax's.
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
  original = getattr(_orbax_asyncio, '_run_sync_via_new_loop', None)
  if original is None:
    yield
    return
  _orbax_asyncio._run_sync_via_new_loop = _run_sync_and_settle  # pylint: disable=protected-access
  try:
    yield
  finally:
    _orbax_asyncio._run_sync_via_new_loop = original  # pylint: disable=protected-access


def restore(manager: ocp.CheckpointManager, step: int, **items):
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


# ---- Trees of arrays ---------------------------------------------------------------------------------

def flatten(tree, prefix=''):
  """Yields ('a/b/c', leaf) for every leaf of a nested dict."""
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from flatten(v, f'{prefix}/{k}' if prefix else str(k))
  else:
    yield prefix, tree


def pure(model_or_state) -> dict:
  """nnx Module or State (or an already pure dict) -> pure nested dict of arrays."""
  if isinstance(model_or_state, nnx.Module):
    model_or_state = nnx.state(model_or_state)
  if isinstance(model_or_state, nnx.State):
    return nnx.to_pure_dict(model_or_state)
  return model_or_state


def model_tree(params, batch_stats) -> dict:
  """The pure dict of a model item from the split state (nnx.Param, nnx.BatchStat) of the model."""
  return nnx.to_pure_dict(nnx.merge_state(params, batch_stats))


def with_tree(params, batch_stats, tree):
  """(params, batch_stats) of the same structure with the values of the pure dict `tree`."""
  full = nnx.merge_state(params, batch_stats)
  nnx.replace_by_pure_dict(full, tree)
  return full.filter(nnx.Param), full.filter(nnx.BatchStat)


def non_finite_arrays(tree) -> list[str]:
  """The '/'-joined paths of the float arrays of a pure nested dict that hold NaN or inf."""
  bad = []
  for name, value in flatten(tree):
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


def metadata_tree(meta):
  """Orbax item metadata (a tree-metadata wrapper or a plain tree) -> nested dict of ArrayMetadata."""
  return getattr(meta, 'tree', meta)


def check_shapes(stored, abstract, name: str, directory) -> None:
  """Compares the stored item's array metadata with the model built from the config."""
  flat_stored = dict(flatten(stored))
  flat_abstract = dict(flatten(abstract))
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


# ---- Writing and opening ---------------------------------------------------------------------------

def stored_config(config: ml_collections.ConfigDict) -> dict:
  """The config as a checkpoint stores it: a plain dict, with a layout file's layout written out as
  its JSON text (layouts.portable), so that the checkpoint loads without the file."""
  out = config.to_dict()
  out['layout'] = layouts.portable(config.layout)
  return out


def config_from_json(tree) -> ml_collections.ConfigDict:
  """A stored config (JSON: the config's tuples came back as lists) as a ConfigDict with its tuples."""
  def tuples(node):
    if isinstance(node, dict):
      return {k: tuples(v) for k, v in node.items()}
    if isinstance(node, list):
      return tuple(tuples(v) for v in node)
    return node
  return ml_collections.ConfigDict(tuples(tree))


def model_save_args(*, model, config, ema=None) -> dict:
  """The Composite items of a model checkpoint: {'model', 'config'[, 'ema']} -> ocp.args."""
  items = {'model': ocp.args.StandardSave(pure(model)),
           'config': ocp.args.JsonSave(stored_config(config))}
  if ema is not None:
    items['ema'] = ocp.args.StandardSave(pure(ema))
  return items


def reader(directory, **options) -> ocp.CheckpointManager:
  """A CheckpointManager over `directory` for the model items (options: CheckpointManagerOptions)."""
  # Handlers named up front, so that item metadata (shapes) can be read before restoring.
  handlers = {'model': ocp.StandardCheckpointHandler(), 'ema': ocp.StandardCheckpointHandler(),
              'config': ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(pathlib.Path(directory).absolute(), item_handlers=handlers,
                               options=ocp.CheckpointManagerOptions(**options))


def save_model_checkpoint(directory, *, model, config, ema=None, step: int = 0) -> str:
  """Writes step `step` of the checkpoint directory `directory` (created if needed).

  model / ema: nnx Modules or their States (ema optional). config: the ml_collections config the
  model was built from (load_model rebuilds the model from it). Blocks until written; returns the
  directory as an absolute path string.
  """
  directory = pathlib.Path(directory).absolute()
  with reader(directory, create=True) as manager:
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


def has_item(directory, step: int, item: str) -> bool:
  """Whether step `step` of the checkpoint directory holds `item` (a finished item is a folder)."""
  return (pathlib.Path(directory) / str(step) / item).is_dir()


def read_config(manager: ocp.CheckpointManager, step: int) -> dict:
  """The config stored with `step`, as a plain dict (tuples as lists). Raises what Orbax raises."""
  return restore(manager, step, config=ocp.args.JsonRestore()).config
