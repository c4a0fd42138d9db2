"""The STAR network (StackedHGNetV1) in Flax NNX, its building blocks, and decoding its heatmaps.

  network.py   StackedHGNet and `create_model(config, rngs)`
  layers.py    convolutions, BatchNorm, residual blocks, CoordConv channels, pooling
  decoding.py  soft-argmax, heatmap moments (mean, covariance), point-map decoding; the one grid
  forward.py   `preprocess`, `forward` and `make_predict_fn` on the split model state
  inference.py a model ready for inference: `network_fn` (jit-compiled, numpy in and out), `float32_model`
"""

from star_jax.models.forward import forward, make_predict_fn, preprocess, split
from star_jax.models.inference import float32_model, network_fn
from star_jax.models.network import StackedHGNet, create_model

__all__ = ['StackedHGNet', 'create_model', 'float32_model', 'forward', 'make_predict_fn', 'network_fn', 'preprocess',
           'split']
