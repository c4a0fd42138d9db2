"""Building blocks of the stacked hourglass network, channels-last (NHWC), in Flax NNX.

The blocks mirror the official PyTorch layers (ZhenglinZhou/STAR, lib/backbone) one for one so that
the official weights load without surgery: convolutions with biases and PyTorch's default
initialisation, BatchNorm with PyTorch's momentum / epsilon and running-variance update, the
pre-activation bottleneck residual block and the CoordConv coordinate channels.

Precision: parameters and BatchNorm statistics are float32; `dtype` is the compute dtype of the
convolutions (float32 or bfloat16). Normalisation statistics are always reduced in (at least)
float32.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def stat_dtype(dtype):
  """Dtype for statistics and heads: float32, or float64 when computing in float64 (x64 tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def _torch_uniform(key, shape, bound: float) -> jax.Array:
  """U(-bound, bound) float32 draws of `shape`: PyTorch's default for conv weights and biases.

  With a concrete key the draws come from numpy seeded by the key's bits: XLA would otherwise
  compile a separate random-number program for each parameter shape (about 0.5 s each on a CPU,
  ~15 s per model). Under tracing (nnx.eval_shape, jit) jax.random is used. Both are deterministic
  functions of the key.
  """
  if isinstance(key, jax.core.Tracer):
    return jax.random.uniform(key, shape, jnp.float32, -bound, bound)
  seed = np.asarray(jax.random.key_data(key)).ravel()
  draws = np.random.default_rng(seed).uniform(-bound, bound, shape).astype(np.float32)
  return jnp.asarray(draws)


class Conv2d(nnx.Module):
  """2-D convolution with bias and symmetric zero padding (k - 1) // 2, as PyTorch's Conv2d.

  Kernel layout HWIO (k, k, in, out). Initialised as PyTorch does (kaiming-uniform with a = sqrt(5),
  i.e. U(+-1/sqrt(fan_in)) for the weights and the bias), so training from scratch starts where the
  official code starts. (B, H, W, in) -> (B, H', W', out) in the compute dtype.
  """

  def __init__(self, in_features: int, out_features: int, kernel_size: int = 1, *, stride: int = 1,
               dtype=jnp.float32, rngs: nnx.Rngs):
    self.in_features = in_features
    self.out_features = out_features
    self.kernel_size = kernel_size
    self.stride = stride
    self.dtype = dtype
    bound = 1.0 / math.sqrt(in_features * kernel_size * kernel_size)
    self.kernel = nnx.Param(_torch_uniform(
        rngs.params(), (kernel_size, kernel_size, in_features, out_features), bound))
    self.bias = nnx.Param(_torch_uniform(rngs.params(), (out_features,), bound))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    kernel = self.kernel[...].astype(self.dtype)
    if self.kernel_size == 1 and self.stride == 1:
      # A 1x1 convolution as a 2-D matmul over flattened pixels: on XLA:CPU the forward pass is
      # ~2x and the weight gradient ~6x faster than conv_general_dilated (or a 4-D einsum).
      b, h, w, c = x.shape
      y = (x.reshape(b * h * w, c) @ kernel[0, 0]).reshape(b, h, w, self.out_features)
    else:
      pad = (self.kernel_size - 1) // 2
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(self.stride, self.stride), padding=((pad, pad), (pad, pad)),
          dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + self.bias[...].astype(self.dtype)


class BatchNorm(nnx.Module):
  """BatchNorm over all axes but the last, with PyTorch's semantics.

  Normalises with batch statistics in training (`use_running_average=False`, set by
  `model.train()`) and with the running statistics in evaluation (`model.eval()`). Follows
  torch.nn.BatchNorm2d: eps 1e-5, running = 0.9 * running + 0.1 * batch (PyTorch momentum 0.1,
  flax momentum 0.9), and the running *variance* takes the unbiased batch variance (n / (n - 1))
  while normalisation uses the biased one (nnx.BatchNorm would store the biased one). Statistics
  are computed in (at least) float32 whatever the compute dtype; the output has the input's dtype.
  """

  def __init__(self, num_features: int, *, momentum: float = 0.9, epsilon: float = 1e-5,
               use_running_average: bool = False, rngs: nnx.Rngs | None = None):
    del rngs  # deterministic initialisation; accepted for a uniform constructor signature
    self.num_features = num_features
    self.momentum = momentum
    self.epsilon = epsilon
    self.use_running_average = use_running_average
    self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
    self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
    self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
    self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

  def __call__(self, x: jax.Array) -> jax.Array:
    axes = tuple(range(x.ndim - 1))
    if self.use_running_average:
      mean, var = self.mean[...], self.var[...]
    else:
      xf = x.astype(stat_dtype(x.dtype))
      mean = xf.mean(axes)
      # Two-pass variance: E[(x - mean)^2] is as accurate as PyTorch's, E[x^2] - mean^2 is not.
      var = jnp.square(xf - mean).mean(axes)
      n = math.prod(x.shape[:-1])
      unbiased = var * (n / max(n - 1, 1))
      m = self.momentum
      self.mean[...] = jax.lax.stop_gradient(m * self.mean[...] + (1 - m) * mean)
      self.var[...] = jax.lax.stop_gradient(m * self.var[...] + (1 - m) * unbiased)
    # Fold the affine transform into one scale and shift: a single fused multiply-add over x.
    mul = self.scale[...] * jax.lax.rsqrt(var + self.epsilon)
    add = self.bias[...] - mean * mul
    return (x * mul.astype(x.dtype) + add.astype(x.dtype)).astype(x.dtype)

  def set_view(self, use_running_average: bool | None = None):
    """Lets `nnx.view(model, use_running_average=...)` switch the mode, as for nnx.BatchNorm."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


class ResBlock(nnx.Module):
  """Pre-activation bottleneck: BN-ReLU-1x1 (C_out / 2), BN-ReLU-3x3, BN-ReLU-1x1 (C_out), plus skip.

  The skip path is a 1x1 projection when the channel count changes, the identity otherwise. (The
  official block builds the projection in both cases and leaves it unused in the second; we do
  not create it, and the converter skips those weights.) (B, H, W, C_in) -> (B, H, W, C_out).
  """

  def __init__(self, in_features: int, out_features: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
    mid = out_features // 2
    self.bn1 = BatchNorm(in_features)
    self.conv1 = Conv2d(in_features, mid, 1, dtype=dtype, rngs=rngs)
    self.bn2 = BatchNorm(mid)
    self.conv2 = Conv2d(mid, mid, 3, dtype=dtype, rngs=rngs)
    self.bn3 = BatchNorm(mid)
    self.conv3 = Conv2d(mid, out_features, 1, dtype=dtype, rngs=rngs)
    self.skip = (Conv2d(in_features, out_features, 1, dtype=dtype, rngs=rngs)
                 if in_features != out_features else None)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.astype(self.dtype)
    residual = self.skip(x) if self.skip is not None else x
    out = self.conv1(jax.nn.relu(self.bn1(x)))
    out = self.conv2(jax.nn.relu(self.bn2(out)))
    out = self.conv3(jax.nn.relu(self.bn3(out)))
    return out + residual


def coord_channels(height: int, width: int) -> np.ndarray:
  """The CoordConv channels for an (height, width) map: (height, width, 3) float32 in [-1, 1].

  Channel order and values follow the official AddCoordsTh: channel 0 runs from -1 to 1 *down the
  rows* and channel 1 across the columns (the official code calls them x and y but builds them
  transposed; the trained weights expect this order, so we keep it), channel 2 is the radius
  sqrt(c0^2 + c1^2) divided by its maximum.
  """
  rows = np.arange(height, dtype=np.float32) / np.float32(height - 1) * 2 - 1
  cols = np.arange(width, dtype=np.float32) / np.float32(width - 1) * 2 - 1
  c0 = np.broadcast_to(rows[:, None], (height, width))
  c1 = np.broadcast_to(cols[None, :], (height, width))
  r = np.sqrt(c0 ** 2 + c1 ** 2)
  r = r / r.max()
  return np.stack([c0, c1, r], axis=-1).astype(np.float32)


def add_coords(x: jax.Array, boundary_map: jax.Array | None = None) -> jax.Array:
  """Appends the coordinate channels (and optionally two boundary channels) to x (B, H, W, C).

  `boundary_map` (B, H, W) is the previous stack's last heatmap channel: the boundary channels are
  coordinate channels 0 and 1 where clip(boundary_map, 0, 1) > 0.05 and zero elsewhere (official
  with_boundary). Returns (B, H, W, C + 3) or (B, H, W, C + 5) in x's dtype.
  """
  b, h, w, _ = x.shape
  coords = jnp.asarray(coord_channels(h, w))
  parts = [x, jnp.broadcast_to(coords, (b, h, w, 3)).astype(x.dtype)]
  if boundary_map is not None:
    on = (jnp.clip(boundary_map, 0.0, 1.0) > 0.05)[..., None]
    parts.append(jnp.where(on, coords[None, :, :, :2], 0.0).astype(x.dtype))
  return jnp.concatenate(parts, axis=-1)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 on (B, H, W, C); odd trailing rows / columns are dropped (floor)."""
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling of (B, H, W, C) to (B, 2H, 2W, C)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Per-sample, per-channel normalisation over H and W without affine (F.instance_norm), >= float32."""
  x = x.astype(stat_dtype(x.dtype))
  mean = x.mean(axis=(1, 2), keepdims=True)
  var = jnp.square(x - mean).mean(axis=(1, 2), keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps)
