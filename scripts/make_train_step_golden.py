"""Makes tests/data/train_step_golden.npz, the compact golden data of tests/test_train_step_parity.py.

  python scripts/make_train_step_golden.py --reference PATH/train_step.npz \
      --output tests/data/train_step_golden.npz [--radius_from OLD_GOLDEN.npz]

Input: the float64 reference of three official training steps (train_step.npz, described in the
reference README). Output: what the test needs from it, about a quarter of the size. `decode` turns
the output back into the reference's keys and meaning (float64 arrays), and passes a reference file
through unchanged, so the test reads either. Stored (`PACKS`, `STEP_ENTRIES`):
  * the inputs and the initial weights as float32: they are float32 values in the reference
    (checked: the script refuses to round anything);
  * the losses as float64; the step-1 gradients as 32-bit fixed point per tensor;
  * the step-3 weights and BatchNorm statistics of the net and of the EMA as fixed-point
    *differences from the initial values* (16 bits for weights, which move by about lr per step,
    32 bits for the statistics), Adam's moments as 16-bit fixed point.
  Fixed point: q = round(v / s * (2^(B-1) - 1)) with s = max |v| of the tensor, so the error is at
  most s / (2^B - 2) everywhere in the tensor, which suits the test's per-tensor measure (max abs
  difference / max abs value). The error storage causes is measured here per group and stored under
  `storage_relerr/<group>`; the test requires it to be at most a tenth of the group's tolerance.
  The tensors of a group are packed into one flat array per storage dtype plus a JSON index
  (thousands of separate .npy entries would cost more in headers than the data);
  * `coordconv/radius_<n>`: the official CoordConv radius channel for n x n maps, as the reference
    run computed it (see below);
  * `sha256`: a digest of everything else (`content_digest`), checked by the test.

The radius channel: the official AddCoordsTh computes sqrt(x^2 + y^2) in float32 with torch.sqrt,
which on CPUs goes through MKL's vectorised sqrt (VML, high-accuracy mode). That is not correctly
rounded: at 64 x 64, 614 of the 4096 values (after the division by the maximum) differ by 1-2 ulps
from the ones numpy's and XLA's correctly rounded sqrt give, 32 of 256 at 16 x 16. The reference run
used those values, and the float64 network amplifies that input difference to ~1e-6 in the losses,
so a 1e-8 comparison needs them. They are computed here
with PyTorch (the same float32 operations as the official code), which must therefore be installed,
on a CPU whose MKL rounds as the reference machine's did (an AMD EPYC / AVX2 machine did); the test
shows it (step-1 losses within 1e-12 with the right values, ~1e-6 off with wrong ones).
`--radius_from` instead copies them from an earlier output of this script (no PyTorch needed).
"""

from __future__ import annotations

import hashlib
import json
import pathlib

from absl import flags
import numpy as np

from star_jax import cli

FORMAT = 'star_jax train_step golden v1'
RADIUS_SIZES = (64, 16)   # input side (stem CoordConv) and map side (hourglass CoordConvs)
STEPS = (1, 2, 3)

# Per-step entries of the reference (step<k>/<name>) and how they are stored.
STEP_ENTRIES = {'image_rgb_uint8': 'as_is', 'landmarks': 'exact32', 'pointmaps': 'exact32',
                'edgemaps': 'exact32', 'losses': 'float64', 'total_loss': 'float64'}
# Groups of state-dict tensors (reference key prefix) and their encoding: 'exact32' float32,
# refused unless lossless; 'fixedB' B-bit fixed point; 'delta' fixed point of the difference from
# the init/ tensor of the same state-dict key, 16 bits for weights and 32 for BatchNorm statistics.
# Integer tensors (num_batches_tracked) are stored as they are.
PACKS = (('init/', 'exact32'), ('step1/grad/', 'fixed32'), ('step3/net/', 'delta'),
         ('step3/net_ema/', 'delta'), ('step3/adam_mu/', 'fixed16'), ('step3/adam_nu/', 'fixed16'))


def content_digest(arrays: dict) -> str:
  """sha256 over every array but 'sha256' itself: key, dtype, shape and bytes, in key order."""
  h = hashlib.sha256()
  for key in sorted(arrays):
    if key == 'sha256':
      continue
    a = np.ascontiguousarray(arrays[key])
    h.update(f'{key}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def official_radius_with_torch(n: int) -> np.ndarray:
  """The official CoordConv radius channel for n x n maps: float32 (n, n), computed with torch.

  The same float32 operations as the official AddCoordsTh: coordinates i / (n - 1) * 2 - 1 (exact
  in any implementation), then torch.pow, +, torch.sqrt (MKL VML on a CPU) and the division by
  torch.max.
  """
  import torch  # pylint: disable=import-outside-toplevel
  line = np.arange(n, dtype=np.float32) / np.float32(n - 1) * np.float32(2) - np.float32(1)
  rows = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(line[:, None], (n, n))))
  cols = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(line[None, :], (n, n))))
  radius = torch.sqrt(torch.pow(rows, 2) + torch.pow(cols, 2))
  return (radius / torch.max(radius)).numpy().astype(np.float32)


def _exact32(key: str, value: np.ndarray) -> np.ndarray:
  out = value.astype(np.float32)
  if not np.array_equal(out.astype(value.dtype), value):
    raise ValueError(f'{key}: not exactly representable in float32; this script would round it')
  return out


def _tensor_encoding(encoding: str, key: str, value: np.ndarray) -> str:
  if value.dtype.kind != 'f':
    return 'as_is'
  if encoding == 'delta':
    return 'delta32' if 'running_' in key else 'delta16'
  return encoding


def _fixed(v: np.ndarray, bits: int) -> tuple[np.ndarray, float]:
  scale = float(np.abs(v).max()) if v.size else 0.0
  top = 2 ** (bits - 1) - 1
  q = np.round(v / scale * top) if scale > 0 else np.zeros(v.shape)
  return q.astype(np.int32 if bits == 32 else np.int16), scale


def _pack(reference: dict, prefix: str, encoding: str) -> dict:
  """The tensors under `prefix` -> {'pack/<prefix>index': JSON, 'pack/<prefix><dtype>': flat data}."""
  index, chunks = [], {}
  for key in sorted(k for k in reference if k.startswith(prefix)):
    value = reference[key]
    how = _tensor_encoding(encoding, key, value)
    scale = 0.0
    if how == 'as_is':
      data = value
    elif how == 'exact32':
      data = _exact32(key, value)
    else:
      bits = int(how[5:])
      if how.startswith('delta'):
        value = value - reference['init/' + key[len(prefix):]]
      data, scale = _fixed(value, bits)
    parts = chunks.setdefault(data.dtype.str, [])
    offset = sum(p.size for p in parts)
    parts.append(data.ravel())
    index.append([key[len(prefix):], list(value.shape), how, data.dtype.str, offset, scale])
  out = {f'pack/{prefix}index': np.array(json.dumps(index))}
  for dtype, parts in chunks.items():
    out[f'pack/{prefix}{np.dtype(dtype).name}'] = np.concatenate(parts)
  return out


def _unpack(stored: dict, prefix: str, init: dict | None) -> dict:
  out = {}
  for name, shape, how, dtype, offset, scale in json.loads(str(stored[f'pack/{prefix}index'])):
    data = stored[f'pack/{prefix}{np.dtype(dtype).name}']
    value = data[offset:offset + int(np.prod(shape, dtype=np.int64))].reshape(shape)
    if how == 'exact32':
      value = value.astype(np.float64)
    elif how != 'as_is':
      value = value.astype(np.float64) * (scale / (2 ** (int(how[5:]) - 1) - 1))
      if how.startswith('delta'):
        value = value + init['init/' + name]
    out[prefix + name] = value
  return out


def _group(key: str) -> str:
  """The storage group of a reference key: 'init', 'step1/grad', 'step3/net/params',
  'step3/net_ema/stats', 'step3/adam_mu', ...; per-step inputs and losses are their own groups."""
  parts = key.split('/')
  if parts[0] == 'step3' and parts[1] in ('net', 'net_ema'):
    return f'step3/{parts[1]}/' + ('stats' if 'running_' in parts[-1] else 'params')
  if parts[0] == 'step3' or (parts[0] == 'step1' and parts[1] == 'grad'):
    return f'{parts[0]}/{parts[1]}'
  return 'init' if parts[0] == 'init' else key


def encode(reference: dict) -> tuple[dict, dict]:
  """Reference arrays -> (stored arrays, the storage error per group, see `_group`)."""
  out = {'format': np.array(FORMAT)}
  out.update({k: v for k, v in reference.items() if k.startswith('config/')})
  for k in STEPS:
    for name, how in STEP_ENTRIES.items():
      key, value = f'step{k}/{name}', reference[f'step{k}/{name}']
      if how == 'exact32':
        value = _exact32(key, value)
      elif how == 'float64':
        value = np.asarray(value, np.float64)
      out[key] = value
  for prefix, encoding in PACKS:
    out.update(_pack(reference, prefix, encoding))
  decoded = decode(out)
  errors = {}
  for key, value in reference.items():
    if key in decoded and value.dtype.kind == 'f' and np.abs(value).max() > 0:
      err = float(np.abs(decoded[key] - value).max() / np.abs(value).max())
      errors[_group(key)] = max(errors.get(_group(key), 0.0), err)
  return out, errors


def decode(stored) -> dict:
  """Stored arrays (this script's output, or the reference itself) -> the reference's arrays.

  Floats of the reference come back as float64; config, images, integer buffers and this script's
  extras (radius channels, storage errors, digest) as stored. A reference file (no matching 'format'
  entry) comes back as it is.
  """
  stored = {k: np.asarray(stored[k]) for k in stored}
  if str(stored.get('format', '')) != FORMAT:
    return stored
  out = {k: (v.astype(np.float64) if v.dtype == np.float32 and k.startswith('step') else v)
         for k, v in stored.items() if not k.startswith('pack/')}
  init = _unpack(stored, 'init/', None)
  out.update(init)
  for prefix, _ in PACKS[1:]:
    out.update(_unpack(stored, prefix, init))
  return out


def _make(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_string('reference', None, 'the shared float64 train_step.npz', flag_values=fv)
  flags.DEFINE_string('output', None, 'where to write the compact golden .npz', flag_values=fv)
  flags.DEFINE_string('radius_from', '', 'copy the official radius channels from this earlier output instead of '
                      'computing them with PyTorch', flag_values=fv)
  if command.parse():
    raise flags.Error('no positional arguments are taken')
  command.require('reference', 'output')
  args = fv
  if not pathlib.Path(args.reference).is_file():
    raise cli.UserError(f'--reference {args.reference} is not a file')
  with np.load(args.reference) as f:
    reference = {k: f[k] for k in f.files}
  stored, errors = encode(reference)
  if args.radius_from:
    with np.load(args.radius_from) as f:
      radius = {n: f[f'coordconv/radius_{n}'] for n in RADIUS_SIZES}
      source = str(f['coordconv/source'])
  else:
    try:
      import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise cli.UserError('PyTorch is needed for the official CoordConv radius channels (see the module '
                          'docstring), or pass --radius_from an earlier output') from None
    radius = {n: official_radius_with_torch(n) for n in RADIUS_SIZES}
    source = f'torch {torch.__version__}: torch.sqrt (MKL VML) on a CPU'
  for n, r in radius.items():
    stored[f'coordconv/radius_{n}'] = np.asarray(r, np.float32)
  stored['coordconv/source'] = np.array(source)
  for group, err in errors.items():
    stored[f'storage_relerr/{group}'] = np.float64(err)
  stored['sha256'] = np.array(content_digest(stored))

  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(output, **stored)
  print(f'wrote {output} ({output.stat().st_size / 1e6:.2f} MB, {len(stored)} arrays)')
  print('storage error (max abs error / max abs value per tensor), per group:')
  print(json.dumps({g: f'{e:.1e}' for g, e in sorted(errors.items()) if e > 0}, indent=1))
  return 0


def main(argv=None) -> int:
  return cli.guarded(_make, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
