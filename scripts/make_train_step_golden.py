"""Makes tests/testdata/train_step_golden.npz, the compact golden data of tests/training/test_train_step_parity.py.

  python scripts/make_train_step_golden.py --reference PATH/train_step.npz \
      --output tests/testdata/train_step_golden.npz [--radius_from OLD_GOLDEN.npz]

Input: the float64 reference of three official training steps (train_step.npz, described in the
reference README, or a draw of scripts/make_train_step_draw.py, which writes its compact form with this
module). Output: what the test needs from it, about a quarter of the size. `decode` turns
the output back into the reference's keys and meaning (float64 arrays), and passes a reference file
through unchanged, so the test reads either. Stored (`PACKS`, `STEP_ENTRIES`):
  * config/* and self_agreement/* as they are;
  * the inputs and the initial weights as float32: they are float32 values in the reference
    (checked: the script refuses to round anything), except the point maps of a reference made float64
    throughout (config/pure64 = 1), which the official encoder resized in float64: kept as float64;
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

The radius channel (only for a reference with the official float32 islands; a pure64 one has none to
emulate): the official AddCoordsTh computes sqrt(x^2 + y^2) in float32 with torch.sqrt,
which on CPUs goes through MKL's vectorised sqrt (VML, high-accuracy mode). That is not correctly
rounded: at 64 x 64, 614 of the 4096 values (after the division by the maximum) differ by 1-2 ulps
from the ones numpy's and XLA's correctly rounded sqrt give, 32 of 256 at 16 x 16. The reference run
used those values, and the float64 network amplifies that input difference to ~1e-6 in the losses,
so a 1e-8 comparison needs them. They are computed here
with PyTorch (the same float32 operations as the official code), which must therefore be installed,
on a CPU whose MKL rounds as the reference machine's did (an AMD EPYC / AVX2 machine did); the test
shows it (step-1 losses within 1e-12 with the right values, ~1e-6 off with wrong ones).
`--radius_from` instead copies them from an earlier output of this script (no PyTorch needed).

The module also defines the measure of the parity test and of the draws' self-agreement (`compare`: per
group, max |a - b| / max |b| per tensor or loss term), so both measure alike.
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
# Inputs that may carry more than float32 precision: in a run whose float32 islands ran in float64
# (config/pure64 = 1), the official encoder interpolates the point maps in float64.
WIDE_INPUTS = ('pointmaps', 'edgemaps', 'landmarks')
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


def _is_exact32(value: np.ndarray) -> bool:
  return np.array_equal(value.astype(np.float32).astype(value.dtype), value)


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
  """Reference arrays -> (stored arrays, the storage error per group, see `_group`).

  config/* and self_agreement/* are copied as they are. The inputs are stored as float32, refused
  when that would round them, except in a pure64 reference (config/pure64 = 1), whose `WIDE_INPUTS`
  are kept as float64 where float32 cannot hold them."""
  out = {'format': np.array(FORMAT)}
  out.update({k: v for k, v in reference.items() if k.startswith(('config/', 'self_agreement/'))})
  wide = int(reference.get('config/pure64', 0)) == 1
  for k in STEPS:
    for name, how in STEP_ENTRIES.items():
      key, value = f'step{k}/{name}', reference[f'step{k}/{name}']
      if how == 'exact32' and wide and name in WIDE_INPUTS and not _is_exact32(value):
        value = np.asarray(value, np.float64)
      elif how == 'exact32':
        value = _exact32(key, value)
      elif how == 'float64':
        value = np.asarray(value, np.float64)
      out[key] = value
  for prefix, encoding in PACKS:
    out.update(_pack(reference, prefix, encoding))
  decoded = decode(out)
  errors = {}
  for key, value in reference.items():
    copied = key.startswith('self_agreement/')   # stored as they are, as config/* (whose 0 stays listed)
    if not copied and key in decoded and value.dtype.kind == 'f' and np.abs(value).max() > 0:
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


# ---- The measure: how far one run of the three steps is from another -------------------------------
# Used by the parity test (ours against the official run) and by make_train_step_draw.py (the official
# run against its reruns: the self-agreement stored in a golden).

# Groups, in the order reports list them. 'losses/step1' is the part of 'losses/steps12' from step 1.
GROUPS = ('losses/step1', 'losses/steps12', 'losses/step3', 'grad1', 'net', 'net_stats', 'ema', 'ema_stats',
          'adam_mu', 'adam_nu')
# A step-1 gradient below this fraction of the largest one is rounding noise: the loss is invariant to
# the parameter (conv biases before a train-mode BatchNorm, ...). Real gradients are >= 2e-5 of the
# largest; noise <= 1e-15.
NULL_GRADIENT = 1e-12


def tensor_keys(arrays: dict, prefix: str) -> list[str]:
  return sorted(k[len(prefix):] for k in arrays if k.startswith(prefix))


def relative_difference(a, b) -> float:
  """max |a - b| / max |b| (0 when both are all zero)."""
  b = np.asarray(b, np.float64)
  scale = float(np.abs(b).max())
  diff = float(np.abs(np.asarray(a, np.float64) - b).max())
  return diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf)


def null_gradient_keys(reference: dict) -> set[str]:
  """Parameters whose step-1 gradient is rounding noise (the loss is invariant to them)."""
  grads = {k: reference['step1/grad/' + k] for k in tensor_keys(reference, 'step1/grad/')}
  largest = max(float(np.abs(g).max()) for g in grads.values())
  return {k for k, g in grads.items() if np.abs(g).max() <= NULL_GRADIENT * largest}


def compare(reference: dict, other: dict) -> dict[str, list[tuple[float, str]]]:
  """Per group, (relative difference, name) for everything `other` has, largest first.

  Groups: 'losses/step1', 'losses/steps12', 'losses/step3' (each of the 12 terms and the total,
  relative to itself), 'grad1', 'net', 'net_stats', 'ema', 'ema_stats', 'adam_mu', 'adam_nu' (per
  tensor, `relative_difference`). Tensors whose step-1 gradient is rounding noise (`null_gradient_keys`
  of `reference`) go to 'net/null' and 'ema/null' (compared the same way), and to 'grad1/null',
  'adam_mu/null', 'adam_nu/null' as max |other| / the largest |reference| value of the group's other
  tensors (a bound, not a comparison).
  """
  null = null_gradient_keys(reference)
  groups: dict[str, list] = {}

  def add(group, err, name):
    groups.setdefault(group, []).append((float(err), name))

  for k in STEPS:
    groups_k = ['losses/step3'] if k == 3 else ['losses/steps12'] + (['losses/step1'] if k == 1 else [])
    errors = [(abs(a - b) / abs(b), f'step{k}/losses[{i}]')
              for i, (a, b) in enumerate(zip(other[f'step{k}/losses'], reference[f'step{k}/losses']))]
    errors.append((relative_difference(other[f'step{k}/total_loss'], reference[f'step{k}/total_loss']),
                   f'step{k}/total_loss'))
    for group in groups_k:
      for err, name in errors:
        add(group, err, name)
  largest = {p: max(float(np.abs(reference[p + k]).max()) for k in tensor_keys(other, p) if k not in null)
             for p in ('step1/grad/', 'step3/adam_mu/', 'step3/adam_nu/')}
  for prefix, group in (('step1/grad/', 'grad1'), ('step3/adam_mu/', 'adam_mu'), ('step3/adam_nu/', 'adam_nu')):
    for key in tensor_keys(other, prefix):
      if key in null:
        add(group + '/null', np.abs(other[prefix + key]).max() / largest[prefix], key)
      else:
        add(group, relative_difference(other[prefix + key], reference[prefix + key]), key)
  for prefix, group in (('step3/net/', 'net'), ('step3/net_ema/', 'ema')):
    for key in tensor_keys(other, prefix):
      if np.asarray(reference[prefix + key]).dtype.kind != 'f':
        continue   # num_batches_tracked: checked on its own
      kind = '_stats' if 'running_' in key else '/null' if key in null else ''
      add(group + kind, relative_difference(other[prefix + key], reference[prefix + key]), key)
  return {g: sorted(v, reverse=True) for g, v in groups.items()}


def step1_loss_terms(reference: dict, other: dict) -> np.ndarray:
  """(12,) the relative difference of each step-1 loss term."""
  return np.abs(np.asarray(other['step1/losses']) - reference['step1/losses']) / np.abs(reference['step1/losses'])


def cosine(reference: dict, other: dict, prefix: str) -> float:
  """Cosine similarity of `other` and `reference` over all weights under `prefix` (no BatchNorm
  statistics, no zero-gradient tensors) taken together; step-3 states as updates, value - init."""
  null = null_gradient_keys(reference)
  keys = [k for k in tensor_keys(other, prefix) if k not in null and 'running_' not in k and 'num_batches' not in k]
  base = (lambda k: reference['init/' + k]) if prefix.startswith('step3/net') else (lambda k: 0.0)
  a = np.concatenate([(other[prefix + k] - base(k)).ravel() for k in keys])
  b = np.concatenate([(reference[prefix + k] - base(k)).ravel() for k in keys])
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def report(errors: dict) -> str:
  """One line per group: largest and median difference and the three worst tensors."""
  lines = []
  for group, values in sorted(errors.items()):
    worst = ', '.join(f'{name} {err:.1e}' for err, name in values[:3])
    lines.append(f'{group:16s} max {values[0][0]:.1e}  median {values[len(values) // 2][0]:.1e}  '
                 f'n={len(values):4d}  worst: {worst}')
  return '\n'.join(lines)


def draw_digest(arrays: dict) -> str:
  """sha256 of a draw's inputs (initial weights, images, landmarks, target maps) as float64 values,
  the same for a reference file and its compact form."""
  keys = [k for k in arrays if k.startswith('init/')]
  keys += [f'step{k}/{name}' for k in STEPS for name in ('image_rgb_uint8', 'landmarks', 'pointmaps', 'edgemaps')]
  h = hashlib.sha256()
  for key in sorted(keys):
    a = np.asarray(arrays[key])
    a = np.ascontiguousarray(a.astype(np.float64) if a.dtype.kind == 'f' else a)
    h.update(f'{key}|{a.dtype.str}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


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
  if int(reference.get('config/pure64', 0)) == 1:
    radius, source = {}, ''   # computed in float64 by the official run: nothing to emulate
  elif args.radius_from:
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
  if radius:
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
