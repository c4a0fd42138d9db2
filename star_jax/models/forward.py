"""Running the network: the forward pass on uint8 images, and the one prediction function that
training-time evaluation, the evaluate command, inference and the ambiguity study all use.

The model is an NNX module; these functions work on its split state (`nnx.split(model, nnx.Param,
nnx.BatchStat)` -> graph, params, batch_stats) so that `jax.jit` sees plain pytrees.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from star_jax.models import decoding

DECODERS = ('landmarks', 'pointmaps')


def preprocess(images_uint8_rgb, dtype=jnp.float32) -> jax.Array:
  """uint8 (or float) RGB pixels in [0, 255], any shape (..., 3) -> (x - 127.5) / 127.5 in `dtype`.

  float32 by default (also for bfloat16 compute: the model rounds its input), computed as the official
  data pipeline computes it, (x - 127.5) * float32(1 / 127.5) (AlignmentDataset's `scale`), so the
  network sees bit-equal float32 inputs (dividing by 127.5 instead differs by 1 ulp for 126 of the 256
  pixel values). float64 (x64 runs, float64 throughout): the exact value, rounded once.
  """
  x = jnp.asarray(images_uint8_rgb, dtype)
  if jnp.dtype(dtype) == jnp.float64:
    return (x - 127.5) / 127.5
  return (x - 127.5) * (1 / 127.5)


def split(model: nnx.Module):
  """(graph, params, batch_stats) of a model, in the mode (train / eval) it is in."""
  return nnx.split(model, nnx.Param, nnx.BatchStat)


def forward(graph, params, batch_stats, images_uint8: jax.Array):
  """Runs the model given by (graph, params, batch_stats) on uint8 RGB images (B, S, S, 3).

  Returns (per-stack outputs, the batch statistics after the call): in train mode BatchNorm
  updates its running statistics as a side effect, which a functional step hands back.
  """
  model = nnx.merge(graph, params, batch_stats)
  # float32 input for float32 / bfloat16 compute, float64 for float64 (x64 parity tests).
  outputs = model(preprocess(images_uint8, jnp.promote_types(model.dtype, jnp.float32)))
  return outputs, nnx.state(model, nnx.BatchStat)


def make_predict_fn(graph, *, decode: str = 'landmarks', covariances: bool = False):
  """Returns `predict(params, batch_stats, images_uint8) -> dict`, pure and jit-able.

  graph: the model's graph in eval mode (running BatchNorm statistics).
  decode: 'landmarks', the last stack's soft-argmax landmarks (the official output), or
    'pointmaps', its point maps decoded by argmax and a local centroid (for models trained without
    a landmark term, see `decoding.decode_pointmaps`).
  covariances: also return the covariance of each normalised fusion heatmap of the last stack, in the
    same normalised frame (the STAR loss uses exactly this covariance: its principal axes are the
    directions of the point's semantic ambiguity).
  The dict: 'landmarks' (B, N, 2) as (x, y) in [-1, 1]; with `covariances`, 'covariances' (B, N, 2, 2).
  """
  if decode not in DECODERS:
    raise ValueError(f'decode must be one of {DECODERS}, got {decode!r}')

  def predict(params, batch_stats, images):
    outputs, _ = forward(graph, params, batch_stats, images)
    last = outputs[-1]
    if decode == 'pointmaps':
      out = {'landmarks': decoding.decode_pointmaps(last['pointmaps'])}
    else:
      out = {'landmarks': last['landmarks']}
    if covariances:
      _, out['covariances'] = decoding.heatmap_moments(last['fusion_heatmaps'])
    return out

  return predict
