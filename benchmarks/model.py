"""Speed of the full WFLW network (256x256 input, 4 stacks, 256 channels): images per second.

Forward (eval mode) and forward + backward (train mode, batch statistics, gradient of a loss over
all stack outputs) at batch 8, jit-compiled, median of `--repeats` runs (default 3 on a CPU); on a
GPU also batch 32 in float32 and bfloat16. `--batch` and `--dtypes` time those settings instead,
`--small` a small network (64 px, 4 stacks, 32 channels: dry runs). With `--official PATH` (a checkout of
ZhenglinZhou/STAR) and PyTorch importable, the official network's forward is timed the same way, in a
child process, for comparison: on `--official_device` (the GPU when ours runs on one) at each float32
setting's batch (batch 8 when every setting is bfloat16).
"""

from __future__ import annotations

import time
import types

import jax
import jax.numpy as jnp
from flax import nnx

import benchmarks
from benchmarks import official
from benchmarks import train as train_bench
from star_jax import layouts
from star_jax.models import StackedHGNet

LAYOUT = layouts.WFLW


def _model(dtype: str, shape: train_bench.Shape = train_bench.FULL) -> StackedHGNet:
  return StackedHGNet(LAYOUT.num_points, LAYOUT.edge_membership(), image_size=shape.image, nstack=shape.nstack,
                      nlevels=4, channels=shape.channels, dtype=dtype, rngs=nnx.Rngs(0))


def _surrogate_loss(outputs) -> jax.Array:
  """Touches every output of every stack, as the training losses do."""
  total = 0.0
  for out in outputs:
    total += jnp.mean(jnp.square(out['landmarks']))
    total += jnp.mean(out['pointmaps']) + jnp.mean(out['edgemaps']) + jnp.mean(out['heatmaps'])
  return total


def _time_ours(dtype: str, batch: int, repeats: int, shape: train_bench.Shape = train_bench.FULL):
  """Returns (forward s, first call s, fwd+bwd s, first call s) per batch.

  The first call's time is compilation plus one run.
  """
  model = _model(dtype, shape)
  images = jax.random.normal(jax.random.key(0), (batch, shape.image, shape.image, 3), jnp.float32)

  @nnx.jit
  def forward(model, images):
    return model(images)[-1]['landmarks']

  @nnx.jit
  def forward_backward(model, images):
    return nnx.value_and_grad(lambda m: _surrogate_loss(m(images)))(model)

  def block(x):
    return jax.block_until_ready(x)

  model.eval()
  t0 = time.perf_counter()
  block(forward(model, images))
  fwd_compile = time.perf_counter() - t0
  fwd = benchmarks.median_time(lambda: block(forward(model, images)), repeats, warmup=0)
  model.train()  # batch statistics, updated in place like a training step does
  t0 = time.perf_counter()
  block(forward_backward(model, images))
  bwd_compile = time.perf_counter() - t0
  bwd = benchmarks.median_time(lambda: block(forward_backward(model, images)), repeats, warmup=0)
  return fwd, fwd_compile, bwd, bwd_compile


def _time_official(path: str, batch: int, repeats: int, shape: train_bench.Shape = train_bench.FULL,
                   device: str = 'cpu'):
  """(seconds per forward, a note) of the official network in eval mode under no_grad on `device`."""
  import torch  # pylint: disable=import-outside-toplevel
  device = torch.device(device)
  cuda = device.type == 'cuda'
  if cuda:
    torch.backends.cudnn.benchmark = True   # as the official set_environment does
  net = official.network(path, LAYOUT, image_size=shape.image, nstack=shape.nstack,
                         channels=shape.channels).to(device).eval()
  images = torch.randn(batch, 3, shape.image, shape.image, device=device)

  def forward():
    with torch.no_grad():
      net(images)
    if cuda:
      torch.cuda.synchronize(device)

  seconds = benchmarks.median_time(forward, repeats, warmup=2 if cuda else 1)
  where = f'torch {torch.cuda.get_device_name(device)}' if cuda else f'torch CPU, {torch.get_num_threads()} threads'
  return seconds, where


def _time_official_child(path: str, batch: int, repeats: int, shape: train_bench.Shape, device: str):
  """`_time_official` in a child process (PyTorch and JAX on one GPU in one process could clash over
  CUDA libraries and memory; a crash there must not take our rows with it)."""
  import json  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  proc = subprocess.run([sys.executable, '-m', 'benchmarks.model', '--official-forward', path, str(batch),
                         str(repeats), 'small' if shape == train_bench.SMALL else 'full', device],
                        env=benchmarks.child_environment(), capture_output=True, text=True, timeout=600)
  lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
  if proc.returncode or not lines:
    raise RuntimeError(f'official forward failed ({proc.returncode}): {proc.stderr[-1500:]}')
  result = json.loads(lines[-1])
  return result['seconds'], result['note']


def run(args):
  backend = jax.default_backend()
  repeats = benchmarks.repeats(args, full_network=True)
  shape = train_bench.shape_of(args)
  where = f'{backend}, jit, median of {repeats}'
  if getattr(args, 'batch', None) or getattr(args, 'dtypes', None):
    settings = train_bench.settings(args, backend)
  else:
    settings = [(8, 'float32')]
    if backend == 'gpu':
      settings += [(32, 'float32'), (32, 'bfloat16')]
  label = shape.label
  rows = []
  for batch, dtype in settings:
    fwd, fwd_c, bwd, bwd_c = _time_ours(dtype, batch, repeats, shape)
    fields = {'ours': True, 'batch': batch, 'dtype': dtype, 'backend': backend, 'shape': label}
    rows.append({'name': f'StackedHGNet {label} forward b{batch} {dtype}', 'value': batch / fwd,
                 'unit': 'images/s', 'notes': f'{fwd * 1e3:.0f} ms/batch, compile {fwd_c:.0f} s; {where}',
                 'pass': 'forward', 'step_s': fwd, 'compile_s': fwd_c, **fields})
    rows.append({'name': f'StackedHGNet {label} fwd+bwd b{batch} {dtype}', 'value': batch / bwd,
                 'unit': 'images/s', 'notes': f'{bwd * 1e3:.0f} ms/batch, compile {bwd_c:.0f} s; {where}',
                 'pass': 'forward+backward', 'step_s': bwd, 'compile_s': bwd_c, **fields})
  rows[-1]['memory'] = train_bench.device_memory()
  if getattr(args, 'official', ''):
    device = train_bench.official_device(args, backend)
    batches = sorted({b for b, d in settings if d == 'float32'})
    for batch in batches or [8]:
      try:
        seconds, note = _time_official_child(args.official, batch, repeats, shape, device)
      except (ImportError, RuntimeError, AssertionError) as e:
        rows.append({'name': f'official PyTorch forward b{batch} float32', 'value': float('nan'),
                     'unit': 'images/s', 'notes': f'skipped: {e}', 'official': True, 'error': str(e)})
      else:
        rows.append({'name': f'official PyTorch forward b{batch} float32', 'value': batch / seconds,
                     'unit': 'images/s', 'notes': f'{seconds * 1e3:.0f} ms/batch, {note}, eval, no_grad',
                     'official': True, 'batch': batch, 'dtype': 'float32', 'pass': 'forward', 'step_s': seconds,
                     'device': device})
  return rows


if __name__ == '__main__':
  import sys  # pylint: disable=import-outside-toplevel
  if len(sys.argv) == 7 and sys.argv[1] == '--official-forward':   # the child of _time_official_child
    import json  # pylint: disable=import-outside-toplevel
    import warnings  # pylint: disable=import-outside-toplevel
    warnings.simplefilter('ignore')
    _shape = train_bench.SMALL if sys.argv[5] == 'small' else train_bench.FULL
    _seconds, _note = _time_official(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), _shape, sys.argv[6])
    print(json.dumps({'seconds': _seconds, 'note': _note}), flush=True)
  else:  # quick manual run: python -m benchmarks.model
    print(run(types.SimpleNamespace(repeats=None, official='')))
