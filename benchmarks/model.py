"""Speed of the full WFLW network (256x256 input, 4 stacks, 256 channels): images per second.

Forward (eval mode) and forward + backward (train mode, batch statistics, gradient of a loss over
all stack outputs) at batch 8, jit-compiled, median of `--repeats` runs (default 3 on a CPU); on a
GPU also batch 32 in float32 and bfloat16. With `--official PATH` (a checkout of
ZhenglinZhou/STAR) and PyTorch importable, the official network's batch-8 forward is timed the same
way, in the same process, for comparison.
"""

from __future__ import annotations

import time
import types

import jax
import jax.numpy as jnp
from flax import nnx

import benchmarks
from benchmarks import official
from star_jax import layouts
from star_jax.models import StackedHGNet

LAYOUT = layouts.WFLW


def _model(dtype: str) -> StackedHGNet:
  return StackedHGNet(LAYOUT.num_points, LAYOUT.edge_membership(), image_size=256, nstack=4,
                      nlevels=4, channels=256, dtype=dtype, rngs=nnx.Rngs(0))


def _surrogate_loss(outputs) -> jax.Array:
  """Touches every output of every stack, as the training losses do."""
  total = 0.0
  for out in outputs:
    total += jnp.mean(jnp.square(out['landmarks']))
    total += jnp.mean(out['pointmaps']) + jnp.mean(out['edgemaps']) + jnp.mean(out['heatmaps'])
  return total


def _time_ours(dtype: str, batch: int, repeats: int):
  """Returns (forward s, first call s, fwd+bwd s, first call s) per batch.

  The first call's time is compilation plus one run.
  """
  model = _model(dtype)
  images = jax.random.normal(jax.random.key(0), (batch, 256, 256, 3), jnp.float32)

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


def _time_official(path: str, batch: int, repeats: int):
  import torch  # pylint: disable=import-outside-toplevel
  net = official.network(path, LAYOUT).eval()
  images = torch.randn(batch, 3, 256, 256)
  with torch.no_grad():
    return benchmarks.median_time(lambda: net(images), repeats), torch.get_num_threads()


def run(args):
  backend = jax.default_backend()
  repeats = benchmarks.repeats(args, full_network=True)
  where = f'{backend}, jit, median of {repeats}'
  settings = [(8, 'float32')]
  if backend == 'gpu':
    settings += [(32, 'float32'), (32, 'bfloat16')]
  rows = []
  for batch, dtype in settings:
    fwd, fwd_c, bwd, bwd_c = _time_ours(dtype, batch, repeats)
    rows.append({'name': f'StackedHGNet WFLW 256px forward b{batch} {dtype}', 'value': batch / fwd,
                 'unit': 'images/s', 'notes': f'{fwd * 1e3:.0f} ms/batch, compile {fwd_c:.0f} s; {where}'})
    rows.append({'name': f'StackedHGNet WFLW 256px fwd+bwd b{batch} {dtype}', 'value': batch / bwd,
                 'unit': 'images/s', 'notes': f'{bwd * 1e3:.0f} ms/batch, compile {bwd_c:.0f} s; {where}'})
  if getattr(args, 'official', ''):
    try:
      seconds, threads = _time_official(args.official, 8, repeats)
    except ImportError as e:
      rows.append({'name': 'official PyTorch forward b8 float32', 'value': float('nan'),
                   'unit': 'images/s', 'notes': f'skipped: {e}'})
    else:
      rows.append({'name': 'official PyTorch forward b8 float32', 'value': 8 / seconds,
                   'unit': 'images/s',
                   'notes': f'{seconds * 1e3:.0f} ms/batch, torch CPU, {threads} threads, eval, no_grad'})
  return rows


if __name__ == '__main__':  # quick manual run: python -m benchmarks.model
  print(run(types.SimpleNamespace(repeats=None, official='')))
