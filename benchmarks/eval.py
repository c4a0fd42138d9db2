"""Evaluation speed: images/s of the full WFLW network (256x256, 4 stacks, 256 channels), forward
pass plus mapping the landmarks back to image pixels, as star_jax.evaluate and star_jax.predict run it.

Batch 8 on CPU; batch 32 when a GPU is present. Random weights (speed does not depend on them) and
random images; data loading is not included (scripts/evaluate.py reports both figures on real data).
"""

from __future__ import annotations

import numpy as np

import benchmarks


def _wflw_config():
  from star_jax import config_lib  # pylint: disable=g-import-not-at-top
  return config_lib.load_config('configs/wflw.py')


def _time(predict_fn, batch: int, image_size: int, repeats: int, seed: int = 0) -> float:
  from star_jax.data import transforms  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
  matrices = np.stack([transforms.crop_matrix(rng.uniform(0.8, 2.0), rng.uniform(100, 400, 2), image_size)
                       for _ in range(batch)])

  def step():
    out = predict_fn(images)  # numpy: blocks until the device is done
    transforms.map_back(out['landmarks'], matrices, image_size)

  return benchmarks.median_time(step, repeats=repeats, warmup=1)


def run(args) -> list[dict]:
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from star_jax import models  # pylint: disable=g-import-not-at-top

  config = _wflw_config()
  size = int(config.data.image_size)
  on_gpu = jax.default_backend() == 'gpu'
  rows = []
  cases = [('float32', 32)] if on_gpu else [('float32', 8)]
  if on_gpu:
    cases.append(('bfloat16', 32))
  repeats = benchmarks.repeats(args, full_network=True)
  for dtype, batch in cases:
    config.model.dtype = dtype
    model = models.create_model(config, nnx.Rngs(0))
    model.eval()
    for with_cov in (False, True):
      fn = models.network_fn(model, with_covariance=with_cov)
      seconds = _time(fn, batch, size, repeats)
      what = 'forward + map back' + (' + covariances' if with_cov else '')
      rows.append({
          'name': f'eval {what}, WFLW {size}px nstack {config.model.nstack} C{config.model.channels} '
                  f'{dtype} b{batch}',
          'value': batch / seconds, 'unit': 'images/s',
          'notes': f'median of {repeats}, {seconds:.3f} s/batch on {jax.default_backend()}',
      })
  return rows
