"""A network ready for inference: compiled as a function of numpy crops (`network_fn`), or rebuilt to
compute in float32 (`float32_model`) for export."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax.models.forward import make_predict_fn, split
from star_jax.models.network import create_model


def network_fn(model, with_covariance: bool, decode: str = 'landmarks') -> Callable[[np.ndarray], dict]:
  """A jit-compiled `fn(images uint8 (B, S, S, 3) RGB) -> dict of numpy arrays` of an eval-mode model:
  'landmarks' (B, N, 2) in [-1, 1] and, with `with_covariance`, 'covariances' (B, N, 2, 2) in the
  same normalised frame (see `forward.make_predict_fn`, also for `decode`)."""
  graph, params, batch_stats = split(model)
  predict = jax.jit(make_predict_fn(graph, decode=decode, covariances=with_covariance))

  def run(images: np.ndarray) -> dict:
    return {k: np.asarray(v) for k, v in predict(params, batch_stats, images).items()}

  return run


def float32_model(model, config):
  """The model computing in float32 (same weights; the model itself when it already does), in eval
  mode. `config`: the config the model was built from."""
  if model.dtype == jnp.float32:
    return model
  config = config.copy_and_resolve_references()
  config.model.dtype = 'float32'
  float32 = create_model(config, nnx.Rngs(0))
  nnx.update(float32, nnx.state(model))   # parameters and statistics are float32 in any case
  float32.eval()
  return float32
