"""Benchmark: STAR loss forward + backward (batch 32, 98 points, 64x64 maps, float32).

Times `jax.jit(jax.value_and_grad(star_loss))` on the default JAX backend and, when `--official PATH`
is given and PyTorch imports, the official STARLoss_v2 forward + backward on the same input (loaded
from that checkout at run time; its eigendecomposition runs on the CPU, as the official code does). The
official loss runs on the GPU when ours does (`--official_device` chooses), moving its covariances to
the CPU for the eigendecomposition as shipped.
"""

from __future__ import annotations

import statistics
import time

import numpy as np

import benchmarks
from benchmarks import official

BATCH, POINTS, SIZE = 32, 98, 64


def _inputs(seed: int = 0):
  """Smooth non-negative maps (a blob per point plus noise) and targets near the blobs."""
  rng = np.random.default_rng(seed)
  grid = np.linspace(-1, 1, SIZE, dtype=np.float32)
  centres = rng.uniform(-0.8, 0.8, (BATCH, POINTS, 2)).astype(np.float32)
  sig = rng.uniform(0.03, 0.1, (BATCH, POINTS, 2)).astype(np.float32)
  gx = np.exp(-0.5 * ((grid[None, None, :] - centres[..., :1]) / sig[..., :1]) ** 2)   # (B, N, W)
  gy = np.exp(-0.5 * ((grid[None, None, :] - centres[..., 1:]) / sig[..., 1:]) ** 2)   # (B, N, H)
  maps = np.einsum('bnh,bnw->bhwn', gy, gx) + 0.01 * rng.random((BATCH, SIZE, SIZE, POINTS), np.float32)
  targets = centres + rng.normal(0, 0.02, centres.shape).astype(np.float32)
  return maps.astype(np.float32), targets


def _official_step(path, maps, targets, device: str = 'cpu'):
  """A no-argument function running the official STARLoss_v2 forward + backward on `device` (its
  eigendecomposition on the CPU, as shipped), or (None, why not)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, 'PyTorch is not installed: official timing skipped'
  star_v2 = official.losses(path).STARLoss_v2()
  device = torch.device(device)
  cuda = device.type == 'cuda'
  heatmap = torch.from_numpy(np.ascontiguousarray(maps.transpose(0, 3, 1, 2))).to(device)   # NCHW
  target = torch.from_numpy(targets).to(device)

  def step():
    h = heatmap.clone().requires_grad_(True)
    star_v2(h, target).backward()
    if cuda:
      torch.cuda.synchronize(device)
    return h.grad.cpu()

  where = torch.cuda.get_device_name(device) if cuda else f'{torch.get_num_threads()} threads'
  return step, f'torch {torch.__version__}, {where}, eigh on CPU'


def _interleaved_medians(fns, repeats):
  """Median wall time of each function, timing them in turn within every round, so that a change in
  machine load (a shared CPU) affects all of them alike."""
  for fn in fns:
    fn()
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, out in zip(fns, times):
      t0 = time.perf_counter()
      fn()
      out.append(time.perf_counter() - t0)
  return [statistics.median(t) for t in times]


def run(args):
  import jax  # pylint: disable=import-outside-toplevel
  from star_jax import losses  # pylint: disable=import-outside-toplevel

  repeats = benchmarks.repeats(args)
  maps, targets = _inputs()
  fn = jax.jit(jax.value_and_grad(losses.star_loss))
  hm, tg = jax.device_put(maps), jax.device_put(targets)
  ours = lambda: jax.block_until_ready(fn(hm, tg))
  ours()                                                       # compile
  name = 'star_loss fwd+bwd, jit (B32 N98 64x64)'
  note = f'{jax.default_backend()}, median of {repeats}'
  official = getattr(args, 'official', '')
  device = 'cuda' if jax.default_backend() == 'gpu' else 'cpu'
  if getattr(args, 'official_device', 'auto') not in (None, '', 'auto'):
    device = args.official_device
  step, official_note = _official_step(official, maps, targets, device) if official else (None, '')
  if step is None:   # ours alone
    rows = [{'name': name, 'value': benchmarks.median_time(ours, repeats, warmup=2) * 1e3, 'unit': 'ms',
             'notes': note}]
    if official:
      rows.append({'name': 'official STARLoss_v2 fwd+bwd', 'value': float('nan'), 'unit': 'ms',
                   'notes': official_note})
    return rows
  ours_s, official_s = _interleaved_medians([ours, step], repeats)
  # Parity on this full-size input too: the official gradient is NCHW.
  ours_grad = np.asarray(fn(hm, tg)[1])
  official_grad = step().numpy().transpose(0, 2, 3, 1)
  grad_diff = float(np.abs(ours_grad - official_grad).max() / np.abs(official_grad).max())
  return [
      {'name': name, 'value': ours_s * 1e3, 'unit': 'ms', 'notes': note + ', interleaved with the official'},
      {'name': 'official STARLoss_v2 fwd+bwd (B32 N98 64x64)', 'value': official_s * 1e3, 'unit': 'ms',
       'notes': official_note},
      {'name': 'speed-up of star_loss over official', 'value': official_s / ours_s, 'unit': 'x',
       'notes': 'official time / star_jax time; target >= 10'},
      {'name': 'gradient difference to official', 'value': grad_diff, 'unit': 'rel',
       'notes': 'max |ours - official| / max |official|, same input'},
  ]
