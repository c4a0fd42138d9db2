"""Running a model over an evaluation split and scoring it (NME, FR, AUC, per subset).

Conventions. The official tester scores the last stack's landmarks against the test targets in the
normalised crop frame ([-1, 1], align_corners False, ground truth *clipped* to the crop): that is
`nme` here, the figure comparable with the published numbers. Because the test crop is a similarity
transform, the same NME in original image pixels differs only where ground-truth points fall
outside the crop; we also report that (`nme_image`) and write predictions in image pixels.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import jax
import numpy as np
import tqdm

from star_jax import mesh as mesh_lib
from star_jax import metrics as metrics_lib
from star_jax import models
from star_jax.data import pipeline
from star_jax.data import transforms
from star_jax.layouts import Layout


def predict_split(predict_fn: Callable[[Any], dict], batches: Iterable[dict], mesh,
                  image_size: int, progress: bool = False) -> dict[str, np.ndarray]:
  """Runs `predict_fn(images) -> {'landmarks': (B, N, 2) in [-1, 1], ...}` over eval batches.

  Returns host arrays over the valid examples, in split order: 'pred' and 'gt' (M, N, 2) normalised
  crop coordinates, 'pred_px' and 'gt_px' (M, N, 2) original image pixels, 'attributes' (M, K),
  'index' (M,), plus 'seconds' and 'images_per_second' of the model alone (data loading excluded).
  """
  keys = ('landmarks', 'landmarks_px', 'matrix', 'attributes', 'index', 'valid')
  out = {k: [] for k in keys + ('pred',)}
  model_seconds = 0.0
  batches = iter(batches)
  if progress and jax.process_index() == 0:
    batches = tqdm.tqdm(batches, desc='evaluate', unit='batch', leave=False)
  for batch in batches:
    images = mesh_lib.to_global({'image': batch['image']}, mesh)['image']
    t0 = time.perf_counter()
    pred = mesh_lib.gather(predict_fn(images)['landmarks'])
    model_seconds += time.perf_counter() - t0
    out['pred'].append(pred)
    for k in keys:
      local = {k: np.asarray(batch[k])}
      out[k].append(mesh_lib.gather(mesh_lib.to_global(local, mesh)[k]) if jax.process_count() > 1 else local[k])
  cat = {k: np.concatenate(v) for k, v in out.items() if v}
  valid = cat.pop('valid').astype(bool)
  cat = {k: v[valid] for k, v in cat.items()}
  order = np.argsort(cat['index'], kind='stable')
  cat = {k: v[order] for k, v in cat.items()}
  return {
      'pred': cat['pred'], 'gt': cat['landmarks'],
      'pred_px': transforms.map_back(cat['pred'], cat['matrix'], image_size),
      'gt_px': cat['landmarks_px'], 'attributes': cat['attributes'], 'index': cat['index'],
      'seconds': model_seconds, 'images_per_second': len(order) / max(model_seconds, 1e-9),
  }


def score(results: dict[str, np.ndarray], layout: Layout, norm: str | None = None) -> dict[str, Any]:
  """NME / FR / AUC overall and per attribute subset, official crop frame; plus the image-frame NME."""
  summary = metrics_lib.summarize(results['pred'], results['gt'], layout, norm,
                                  attributes=results.get('attributes'))
  nme_image = metrics_lib.nme_per_image(results['pred_px'], results['gt_px'], layout, norm)
  summary['nme_image'] = float(np.mean(nme_image))
  summary['num_images'] = int(len(results['pred']))
  return summary


def evaluate_model(model, config, source, *, progress: bool = False) -> dict:
  """Runs an eval-mode `model` (built for `config`) over the test split `source` on every device, as
  the official tester does (the last stack's landmarks of the plain crops); returns `predict_split`'s
  dict plus 'wall_seconds' (data loading included). The model is compiled before the clock starts,
  on a batch laid out as the real ones, so that images/s measures the evaluation.
  """
  mesh = mesh_lib.make_mesh()
  graph, params, batch_stats = models.split(model)
  params, batch_stats = jax.device_put((params, batch_stats), mesh_lib.replicated(mesh))
  predict = jax.jit(models.make_predict_fn(graph, decode=config.model.get('decode', 'landmarks')))
  size = int(config.data.image_size)
  with jax.set_mesh(mesh):
    local = int(config.eval_batch_size) // jax.process_count()
    dummy = mesh_lib.to_global({'image': np.zeros((local, size, size, 3), np.uint8)}, mesh)['image']
    jax.block_until_ready(predict(params, batch_stats, dummy))
    t0 = time.perf_counter()
    results = predict_split(lambda images: predict(params, batch_stats, images),
                            pipeline.eval_batches(config, source), mesh, size, progress=progress)
  results['wall_seconds'] = time.perf_counter() - t0
  return results
