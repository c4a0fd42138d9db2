"""Converts an official STAR PyTorch checkpoint into a star_jax model checkpoint, without PyTorch.

  python -m star_jax.convert_pytorch --checkpoint WFLW.pkl --config configs/wflw.py --output DIR \
      [--weights net|net_ema|both] [--config.model.channels=32 ...]

The official checkpoints are `torch.save` zip archives (data.pkl plus one raw file per storage) of
{'net': state_dict, 'net_ema': state_dict, 'epoch': int, ...}. `read_torch_checkpoint` reads them
with a restricted unpickler that admits only the classes a checkpoint of tensors needs and rebuilds
tensors with numpy; a pickle that names anything else is refused before anything runs. Older
(non-zip) formats are read through `torch.load(weights_only=True)` when PyTorch happens to be
installed.

Which weights: the official tester and demo evaluate `net`, and the official trainer writes the
better of its two networks on validation into `net` of best_model.pkl, so `--weights net` (the
default) stores `net` as the checkpoint's 'model' item and reproduces the official evaluation;
`--weights net_ema` stores `net_ema` as 'model'; `--weights both` stores `net` as 'model' and
`net_ema` as 'ema' (what our trainer writes; `load_model` then prefers the EMA weights).

Mapping (see `torch_key_map`): every parameter and BatchNorm statistic of the model must be found,
with the right shape, and every entry of the state dict must be used, except `num_batches_tracked`
and the skip projections the official ResBlock creates but never uses (input channels == output
channels); the fixed edge-to-point transform is checked against the layout; tensors with NaN or
infinite values are refused, named (a model with them predicts NaN). Convolution weights go
from OIHW to HWIO, and the stem's three colour input channels are reversed (BGR -> RGB).
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import checkpoints
from star_jax import cli
from star_jax import layouts
from star_jax.models import create_model
from star_jax.models.layers import ResBlock
from star_jax.models.network import StackedHGNet

# ---------------------------------------------------------------------------------------------
# Reading torch.save zip archives with numpy.

_STORAGE_DTYPES = {
    'DoubleStorage': np.float64, 'FloatStorage': np.float32, 'HalfStorage': np.float16,
    'BFloat16Storage': jnp.bfloat16, 'LongStorage': np.int64, 'IntStorage': np.int32,
    'ShortStorage': np.int16, 'CharStorage': np.int8, 'ByteStorage': np.uint8, 'BoolStorage': np.bool_,
}


class CheckpointFormatError(pickle.UnpicklingError, ValueError):
  """A file that is not a readable torch.save checkpoint (truncated, damaged, another format)."""


class UnsafeCheckpointError(CheckpointFormatError):
  """A checkpoint's pickle names a class or function outside the allow-list."""


class _StorageType:
  """Stand-in for a torch storage class (torch.FloatStorage, ...): only knows its numpy dtype."""

  def __init__(self, name: str):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                    metadata=None):
  """numpy version of torch._utils._rebuild_tensor_v2: a (copied) strided view into a storage."""
  del requires_grad, backward_hooks, metadata
  size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
  if not isinstance(storage, np.ndarray) or len(size) != len(stride) or storage_offset < 0:
    raise pickle.UnpicklingError(f'malformed tensor record: size {size}, stride {stride}, '
                                 f'offset {storage_offset}')
  if any(n == 0 for n in size):
    return np.zeros(size, storage.dtype)
  # Bounds check before as_strided, which would otherwise read outside the storage.
  last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
  if min(stride, default=0) < 0 or last >= storage.size:
    raise pickle.UnpicklingError(f'tensor record (size {size}, stride {stride}, offset '
                                 f'{storage_offset}) runs past its storage of {storage.size} elements')
  flat = storage[storage_offset:]
  view = np.lib.stride_tricks.as_strided(flat, size, tuple(s * storage.itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
  """torch._utils._rebuild_parameter: a Parameter is just its data here."""
  del requires_grad, backward_hooks, args
  return data


# The only globals a checkpoint may name: containers and tensor rebuilding. Optimiser and scheduler
# states (which full official checkpoints also hold) need only plain containers, Counter and set.
_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('collections', 'Counter'): collections.Counter,
    ('builtins', 'set'): set,
    ('builtins', 'frozenset'): frozenset,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler for torch zip archives: allow-listed globals only; storages read from the archive."""

  def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, source: str):
    super().__init__(file)
    self._archive = archive
    self._prefix = prefix
    self._byteorder = byteorder
    self._source = source
    self._storages = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise UnsafeCheckpointError(
        f'{self._source}: the pickle asks for {module}.{name}, which a checkpoint of tensors does not '
        f'need; refusing to load it (nothing was executed). Allowed: '
        f'{sorted(".".join(k) for k in _ALLOWED)} and torch.*Storage.')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == 'storage'
            and isinstance(pid[1], _StorageType)):
      raise UnsafeCheckpointError(f'{self._source}: unexpected persistent id {pid!r}')
    _, storage_type, key, _, numel = pid
    key = str(key)
    if key not in self._storages:
      name = f'{self._prefix}data/{key}'
      try:
        raw = self._archive.read(name)
      except KeyError:
        raise pickle.UnpicklingError(f'{self._source}: storage {name} is missing from the archive') from None
      dtype = storage_type.dtype.newbyteorder('<' if self._byteorder == 'little' else '>')
      if len(raw) < int(numel) * dtype.itemsize:
        raise pickle.UnpicklingError(f'{self._source}: storage {name} has {len(raw)} bytes, expected '
                                     f'{int(numel)} x {dtype.itemsize}')
      array = np.frombuffer(raw, dtype, count=int(numel))
      self._storages[key] = array.astype(array.dtype.newbyteorder('='))
    return self._storages[key]


def _read_zip(path: str):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl = [n for n in names if n == 'data.pkl' or n.endswith('/data.pkl')]
    if len(pkl) != 1:
      raise ValueError(f'{path}: not a torch.save archive (expected one data.pkl, found {len(pkl)})')
    prefix = pkl[0][:-len('data.pkl')]
    byteorder = 'little'
    if f'{prefix}byteorder' in names:
      byteorder = archive.read(f'{prefix}byteorder').decode().strip()
    with archive.open(pkl[0]) as f:
      return _RestrictedUnpickler(f, archive, prefix, byteorder, path).load()


def _read_with_torch(path: str):
  try:
    import torch  # lazy: optional extra (PyTorch reads the formats before zip archives)
  except ImportError:
    raise ValueError(f'{path} is not a zip-format torch.save archive; reading older PyTorch formats '
                     'needs PyTorch installed (or re-save the file with a recent torch.save)') from None
  obj = torch.load(path, map_location='cpu', weights_only=True)
  return jax.tree.map(lambda t: t.numpy() if isinstance(t, torch.Tensor) else t, obj,
                      is_leaf=lambda t: isinstance(t, torch.Tensor))


_ZIP_MAGIC = b'PK\x03\x04'
_PICKLE_PROTOCOL_2_PLUS = b'\x80'


def _not_torch(path: str, head: bytes) -> str:
  """The error message of a file that is neither a zip archive nor a pickle of protocol 2 or later."""
  return (f'{path}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle; it starts with '
          f'{head!r})')


def read_torch_checkpoint(path: str):
  """Loads a torch.save file as nested Python containers with numpy arrays instead of tensors.

  Zip archives are read without PyTorch through a restricted unpickler (`UnsafeCheckpointError`
  for anything outside the allow-list); other formats need PyTorch (`torch.load(weights_only=True)`).
  Anything that does not read raises CheckpointFormatError (a ValueError and an UnpicklingError)
  naming the file and what it looks like; nothing from the file is executed on the way.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'checkpoint {path} does not exist')
  with open(path, 'rb') as f:
    head = f.read(4)
  try:
    if zipfile.is_zipfile(path):
      return _read_zip(path)
    if head.startswith(_ZIP_MAGIC):
      raise CheckpointFormatError(f'{path}: a damaged or truncated zip archive (the start of a torch.save '
                                  'file, but its end is missing); download or copy it again')
    if not head.startswith(_PICKLE_PROTOCOL_2_PLUS):
      # Decided here, not by torch.load: with PyTorch installed it would fail on such a file with an
      # obscure error (a KeyError of a byte value), without PyTorch we could not ask it.
      raise CheckpointFormatError(_not_torch(path, head))
    return _read_with_torch(path)
  except (CheckpointFormatError, FileNotFoundError):
    raise
  except ValueError as e:   # a zip archive that is no torch.save file; an old format without PyTorch
    raise CheckpointFormatError(str(e)) from None
  except Exception as e:  # pylint: disable=broad-except  (a damaged pickle can fail in any way)
    raise CheckpointFormatError(f'{path}: not a readable torch.save checkpoint ({type(e).__name__}: '
                                f'{str(e)[:300]})') from None


# ---------------------------------------------------------------------------------------------
# Mapping official state-dict keys onto the model.

def _conv(path, key):
  return [(path + ('kernel',), f'{key}.weight', 'conv'), (path + ('bias',), f'{key}.bias', 'copy')]


def _bn(path, key):
  return [(path + ('scale',), f'{key}.weight', 'copy'), (path + ('bias',), f'{key}.bias', 'copy'),
          (path + ('mean',), f'{key}.running_mean', 'copy'),
          (path + ('var',), f'{key}.running_var', 'copy')]


def _res(block: ResBlock, path, key, unused: list):
  out = []
  for i in (1, 2, 3):
    out += _bn(path + (f'bn{i}',), f'{key}.bn{i}') + _conv(path + (f'conv{i}',), f'{key}.conv{i}.conv')
  if block.skip is not None:
    out += _conv(path + ('skip',), f'{key}.skip_layer.conv')
  else:
    unused += [f'{key}.skip_layer.conv.weight', f'{key}.skip_layer.conv.bias']
  return out


def _hourglass(hg, path, key, unused):
  out = []
  if hg.coordconv is not None:
    out += _conv(path + ('coordconv', 'conv'), f'{key}.coordconv.conv')
  for name in ('up1', 'low1', 'low3'):
    out += _res(getattr(hg, name), path + (name,), f'{key}.{name}', unused)
  if isinstance(hg.low2, ResBlock):
    out += _res(hg.low2, path + ('low2',), f'{key}.low2', unused)
  else:
    out += _hourglass(hg.low2, path + ('low2',), f'{key}.low2', unused)
  return out


def torch_key_map(model: StackedHGNet):
  """The official name of every model variable.

  Returns (entries, unused): entries are (our state path, official state-dict key, kind) with kind
  'conv' (OIHW -> HWIO), 'stem' (the same, colour channels reversed) or 'copy'; unused lists the
  official keys that exist but are deliberately not loaded (never-used skip projections).
  """
  unused = []
  stem = _conv(('stem', 'conv'), 'pre.0.conv')
  entries = [(stem[0][0], stem[0][1], 'stem'), stem[1]] + _bn(('stem', 'bn'), 'pre.0.bn')
  for name, key in (('pre_res1', 'pre.1'), ('pre_res2', 'pre.3'), ('pre_res3', 'pre.4')):
    entries += _res(getattr(model, name), (name,), key, unused)
  for i, hg in enumerate(model.hourglasses):
    entries += _hourglass(hg, ('hourglasses', i), f'hgs.{i}', unused)
  for i, feat in enumerate(model.features):
    entries += _res(feat.res, ('features', i, 'res'), f'features.{i}.0', unused)
    entries += _conv(('features', i, 'conv'), f'features.{i}.1.conv')
    entries += _bn(('features', i, 'bn'), f'features.{i}.1.bn')
  heads = ['out_heatmaps', 'merge_features', 'merge_heatmaps']
  if model.use_aam:
    heads += ['out_pointmaps', 'out_edgemaps', 'merge_pointmaps', 'merge_edgemaps']
  for name in heads:
    for i in range(len(getattr(model, name))):
      entries += _conv((name, i), f'{name}.{i}.conv')
  return entries, unused


def _check_edge_transform(state_dict, model: StackedHGNet, used: set):
  """The official buffers e2h_transform.{weight,bias} must equal the layout's fixed transform."""
  if not model.use_aam:
    return
  m = np.asarray(model.edge_membership, np.float32)  # (N, E)
  expected = {'e2h_transform.weight': m[:, :, None, None],
              'e2h_transform.bias': (m.sum(1) < 0.5).astype(np.float32)}
  for key, want in expected.items():
    if key not in state_dict:
      continue  # a constant of the layout: a file without it loses nothing
    got = np.asarray(state_dict[key])
    if got.shape != want.shape or not np.array_equal(got, want):
      raise ValueError(f'{key}: the checkpoint\'s edge-to-point transform {got.shape} does not match '
                       f'the layout\'s point/edge membership {want.shape}; wrong --config layout?')
    used.add(key)


def convert_state_dict(state_dict, model: StackedHGNet) -> dict:
  """Official state dict (numpy, OIHW) -> the model's pure nnx state dict (nested, HWIO).

  Raises ValueError naming every missing and unexpected key, the tensors with NaN or infinite values,
  or the first key whose shape does not fit the model (with both shapes).
  """
  return _convert_entries(state_dict, model, strict=True)[0]


def convert_matching(state_dict, model: StackedHGNet) -> tuple[dict, list[str]]:
  """Like `convert_state_dict`, for fine-tuning on another layout: the entries whose shapes fit the
  model are converted; the model's variables without a fitting entry (e.g. the heads of a layout with
  another number of points) keep their current values. Returns (pure dict, the model variables kept,
  as 'a/b/c' paths)."""
  return _convert_entries(state_dict, model, strict=False)


def _convert_entries(state_dict, model: StackedHGNet, strict: bool) -> tuple[dict, list[str]]:
  keys = list(state_dict)
  if keys and all(k.startswith('module.') for k in keys):  # saved from a DataParallel wrapper
    state_dict = {k[len('module.'):]: v for k, v in state_dict.items()}
  entries, unused = torch_key_map(model)
  pure = nnx.to_pure_dict(nnx.state(model))
  used = set()
  kept = []
  missing = [key for _, key, _ in entries if key not in state_dict]
  if strict:
    _check_edge_transform(state_dict, model, used)
  else:
    used |= {k for k in state_dict if k.startswith('e2h_transform.')}  # a constant of the (other) layout
  ignored = {k for k in state_dict if k.endswith('num_batches_tracked')} | (set(unused) & set(state_dict))
  unexpected = sorted(set(state_dict) - {key for _, key, _ in entries} - ignored - used)
  if strict and (missing or unexpected):
    raise ValueError(f'state dict does not fit the model: missing {len(missing)} keys {missing}; '
                     f'unexpected {len(unexpected)} keys {unexpected}')
  non_finite = [key for _, key, _ in entries
                if key in state_dict and not np.all(np.isfinite(np.asarray(state_dict[key], np.float64)))]
  if non_finite:
    more = f' and {len(non_finite) - 10} more' if len(non_finite) > 10 else ''
    raise ValueError(f'{len(non_finite)} tensors hold NaN or infinite values: {", ".join(non_finite[:10])}{more}; '
                     'refusing to convert them (a model with them predicts NaN)')
  for path, key, kind in entries:
    node = pure
    for p in path[:-1]:
      node = node[p]
    want = tuple(node[path[-1]].shape)
    if key not in state_dict:
      kept.append('/'.join(map(str, path)))
      continue
    value = np.asarray(state_dict[key], np.float32)
    if kind in ('conv', 'stem'):
      if value.ndim != 4:
        raise ValueError(f'{key}: expected a 4-D OIHW convolution weight, got shape {value.shape}')
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
      if kind == 'stem':
        # Official inputs are BGR; ours are RGB: swap the weights of input channels 0 and 2.
        value = np.concatenate([value[:, :, 2::-1], value[:, :, 3:]], axis=2)
    if value.shape != want:
      if not strict:
        kept.append('/'.join(map(str, path)))
        continue
      raise ValueError(f'{key}: checkpoint shape {tuple(np.asarray(state_dict[key]).shape)} '
                       f'(converted {value.shape}) does not fit model variable {"/".join(map(str, path))} '
                       f'of shape {want}')
    node[path[-1]] = value
  return pure, kept


def load_into_model(state_dict, model: StackedHGNet) -> StackedHGNet:
  """Converts `state_dict` and writes it into `model` (in place); returns the model."""
  pure = convert_state_dict(state_dict, model)
  state = nnx.state(model)
  nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
  nnx.update(model, state)
  return model


def to_model(state_dict, config) -> StackedHGNet:
  """The network of `config` holding the converted `state_dict`, in eval mode."""
  model = load_into_model(state_dict, create_model(config, nnx.Rngs(0)))
  model.eval()
  return model


def state_dict_points(state_dict: dict) -> int:
  """The number of landmarks of an official state dict: the output channels of its first heatmap head."""
  for key, value in state_dict.items():
    if key.removeprefix('module.') == 'out_heatmaps.0.conv.weight':
      return int(np.shape(value)[0])
  raise ValueError('not a STAR state dict: it has no out_heatmaps.0.conv.weight')


def read_official(path: str) -> dict:
  """An official checkpoint as {'net': state dict, 'net_ema': state dict, 'epoch': ...}
  (`read_torch_checkpoint`; a bare state dict is taken as 'net'). ValueError for anything but a dict."""
  obj = read_torch_checkpoint(path)
  if isinstance(obj, dict) and 'net' not in obj and 'net_ema' not in obj and all(
      isinstance(v, np.ndarray) for v in obj.values()):
    obj = {'net': obj}  # a bare state dict
  if not isinstance(obj, dict):
    raise ValueError(f'{path}: expected a dict with "net" / "net_ema", got {type(obj).__name__}')
  return obj


def convert_checkpoint(checkpoint: str, config, output: str, weights: str = 'net') -> dict:
  """Reads an official checkpoint and writes a star_jax checkpoint to `output` (see module doc).

  Returns a small summary dict (which items were written, the official epoch).
  """
  if weights not in ('net', 'net_ema', 'both'):
    raise ValueError(f"--weights must be 'net', 'net_ema' or 'both', got {weights!r}")
  obj = read_official(checkpoint)
  wanted = ('net', 'net_ema') if weights == 'both' else (weights,)
  for name in wanted:
    if name not in obj:
      raise ValueError(f'{checkpoint}: has no {name!r} entry (it has {sorted(map(str, obj))}); choose --weights '
                       f'from those')
    if not isinstance(obj[name], dict) or not all(isinstance(v, np.ndarray) for v in obj[name].values()):
      raise ValueError(f'{checkpoint}: its {name!r} entry is not a state dict of tensors '
                       f'({type(obj[name]).__name__})')
  layouts.get_layout(config.layout)  # a clear error for a bad layout before building anything
  built = {}
  for name in wanted:
    try:
      built[name] = to_model(obj[name], config)
    except ValueError as e:
      raise ValueError(f'{checkpoint} [{name}]: {e}') from None
  ema = built['net_ema'] if weights == 'both' else None
  checkpoints.save_model_checkpoint(output, model=built[wanted[0]], config=config, ema=ema, step=0)
  return {'model': wanted[0], 'ema': 'net_ema' if weights == 'both' else None, 'epoch': obj.get('epoch')}


def _convert(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv, config='required')
  fv = command.fv
  flags.DEFINE_string('checkpoint', None, 'official STAR checkpoint (.pkl)', flag_values=fv)
  flags.DEFINE_string('output', None, 'star_jax checkpoint directory to write', flag_values=fv)
  flags.DEFINE_enum('weights', 'net', ['net', 'net_ema', 'both'], 'which weights to store', flag_values=fv)
  rest = command.parse()
  if rest:
    raise flags.Error(f'unexpected arguments: {" ".join(rest)}')
  command.require('checkpoint', 'output')
  if not os.path.isfile(fv.checkpoint):
    raise cli.UserError(f'checkpoint file {fv.checkpoint} does not exist')
  try:
    summary = convert_checkpoint(fv.checkpoint, command.config, fv.output, fv.weights)
  except (ValueError, OSError, KeyError) as e:
    raise cli.UserError(f'cannot convert {fv.checkpoint}: {e}') from None
  print(f'converted {fv.checkpoint} (official epoch {summary["epoch"]}): model <- {summary["model"]}'
        f'{", ema <- net_ema" if summary["ema"] else ""}; written to {fv.output}')
  return 0


def main(argv=None) -> int:
  return cli.guarded(_convert, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
