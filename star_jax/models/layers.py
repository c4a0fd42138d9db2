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

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax.models.decoding import align_corners_grid
from star_jax.models.decoding import grid_dtype


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
      # A 1x1 convolution as a 2-D matmul over flattened pixels: on XLA:CPU much faster than
      # conv_general_dilated, forward and backward (docs/benchmarks.md, "CPU training step").
      b, h, w, c = x.shape
      y = (x.reshape(b * h * w, c) @ kernel[0, 0]).reshape(b, h, w, self.out_features)
    elif matmul_weight_gradients(x.shape, self.stride):
      y = conv_matmul_weight_grad(x, kernel, self.stride)
    else:
      y = _conv(x, kernel, self.stride)
    return add_bias(y, self.bias[...])


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y (..., C) + bias (C,), in y's dtype; the bias gradient (the sum of y's cotangent over all other
  axes) is accumulated in (at least) float32 and returned in the bias's dtype.

  With bfloat16 compute, autodiff of `y + bias.astype(bfloat16)` would sum up to B x H x W cotangents
  (131072 per channel for a WFLW batch of 32 on 64 x 64 maps) in bfloat16, whose 8-bit mantissa stops
  adding small terms to a large partial sum. Forward values and y's gradient are unchanged.
  """
  return y + bias.astype(y.dtype)


def _add_bias_fwd(y, bias):
  return add_bias(y, bias), bias


def _add_bias_bwd(bias, g):
  axes = tuple(range(g.ndim - 1))
  return g, g.astype(stat_dtype(g.dtype)).sum(axes).astype(bias.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


def matmul_weight_gradients(x_shape: tuple[int, ...], stride: int) -> bool:
  """Whether a k x k convolution of an input of `x_shape` (B, H, W, I) takes its weight gradient as
  matmuls (`conv_matmul_weight_grad`) instead of XLA's convolution.

  Decided at trace time. Only on XLA:CPU (GPUs keep cuDNN's convolutions), and only where it was
  measured to pay on the whole WFLW training step (docs/benchmarks.md, "CPU training step"): wide
  inputs (I >= 128) on maps of at least 32 x 32 output pixels, e.g. the hourglass 3 x 3 convolutions
  at 64 x 64 and 32 x 32. Narrower inputs (the 64-channel 3 x 3 convolutions, the 6-channel stem) and
  small maps stay XLA's convolution.
  """
  _, h, w, cin = x_shape
  return jax.default_backend() == 'cpu' and cin >= 128 and (h // stride) * (w // stride) >= 1024


def _conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  """(B, H, W, I) x (k, k, I, O) -> (B, H', W', O), zero padding (k - 1) // 2 (PyTorch's)."""
  pad = (kernel.shape[0] - 1) // 2
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=((pad, pad), (pad, pad)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_mm(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return _conv(x, kernel, stride)


def _conv_mm_fwd(x, kernel, stride):
  return _conv(x, kernel, stride), (x, kernel)


def _conv_mm_bwd(stride, residuals, dy):
  x, kernel = residuals
  k, _, cin, cout = kernel.shape
  b, h, w, _ = dy.shape
  # Input gradient: XLA's own transposed convolution (as fast on CPU as the forward pass).
  _, conv_vjp = jax.vjp(lambda v: _conv(v, kernel, stride), x)
  (dx,) = conv_vjp(dy)
  # Weight gradient: dW[i, j] = tap_ij^T @ dy, one matmul per kernel tap (i, j) contracting over all
  # B * H' * W' output pixels; tap_ij[b, y, x] = padded_x[b, stride * y + i, stride * x + j]. A loop
  # over the taps, so that only one tap (a shifted copy of x) is alive at a time: unrolled, XLA
  # materialised all k * k of them at once (+1.6 GB of scratch memory per training step).
  pad = (k - 1) // 2
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  rows = dy.reshape(b * h * w, cout)
  window = (b, stride * (h - 1) + 1, stride * (w - 1) + 1, cin)

  def tap_grad(_, offset):
    tap = jax.lax.dynamic_slice(xp, (0, offset[0], offset[1], 0), window)[:, ::stride, ::stride]
    return None, jax.lax.dot_general(tap.reshape(b * h * w, cin), rows, (((0,), (0,)), ((), ())),
                                     preferred_element_type=stat_dtype(dy.dtype))

  offsets = jnp.asarray([(i, j) for i in range(k) for j in range(k)], jnp.int32)
  _, dk = jax.lax.scan(tap_grad, None, offsets)
  dk = dk.reshape(k, k, cin, cout)
  return dx, dk.astype(kernel.dtype)


_conv_mm.defvjp(_conv_mm_fwd, _conv_mm_bwd)


def conv_matmul_weight_grad(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """The convolution of `_conv` (same forward values), whose weight gradient is computed as matmuls.

  XLA:CPU's weight gradient of a k x k convolution (a convolution over the batch and pixel axes) runs
  at a fraction of its matmul speed and needs transposed copies of both operands; as one
  (I, B H' W') @ (B H' W', O) matmul per kernel tap it is faster for wide inputs and saves scratch
  memory (see `matmul_weight_gradients`).
  Forward values and the input gradient are XLA's convolution, unchanged.
  x (B, H, W, I), kernel (k, k, I, O), k odd; the weight gradient is accumulated in (at least)
  float32.
  """
  return _conv_mm(x, kernel, stride)


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

  def __call__(self, x: jax.Array, *, relu: bool = False) -> jax.Array:
    """x (..., C) -> normalised x in x's dtype; `relu=True` applies a ReLU too (fused, see below)."""
    if self.use_running_average:
      y = _normalize(x, self.scale[...], self.bias[...], self.mean[...], self.var[...], self.epsilon)
      return jax.nn.relu(y) if relu else y
    y, mean, var = _batch_norm_train(x, self.scale[...], self.bias[...], self.epsilon, relu)
    n = math.prod(x.shape[:-1])
    unbiased = var * (n / max(n - 1, 1))
    m = self.momentum
    # set_value, not `self.mean[...] = `: that path compares the new value's sharding with the old
    # one's, and asking a tracer for its sharding builds an error message by walking the whole
    # jaxpr traced so far (about half of the training step's trace time).
    running_mean, running_var = self.mean[...], self.var[...]
    self.mean.set_value(jax.lax.stop_gradient(m * running_mean + (1 - m) * mean).astype(running_mean.dtype))
    self.var.set_value(jax.lax.stop_gradient(m * running_var + (1 - m) * unbiased).astype(running_var.dtype))
    return y

  def set_view(self, use_running_average: bool | None = None):
    """Lets `nnx.view(model, use_running_average=...)` switch the mode, as for nnx.BatchNorm."""
    if use_running_average is not None:
      self.use_running_average = use_running_average


def _normalize(x, scale, bias, mean, var, epsilon):
  """scale * (x - mean) / sqrt(var + eps) + bias, folded into one multiply-add over x, in x's dtype."""
  mul = scale * jax.lax.rsqrt(var + epsilon)
  add = bias - mean * mul
  return (x * mul.astype(x.dtype) + add.astype(x.dtype)).astype(x.dtype)


def _batch_stats(x):
  """Per-channel mean and biased variance of x (..., C), in (at least) float32."""
  axes = tuple(range(x.ndim - 1))
  xf = x.astype(stat_dtype(x.dtype))
  mean = xf.mean(axes)
  # Two-pass variance: E[(x - mean)^2] is as accurate as PyTorch's, E[x^2] - mean^2 is not.
  return mean, jnp.square(xf - mean).mean(axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _batch_norm_train(x, scale, bias, epsilon: float, relu: bool):
  """Training-mode BatchNorm (+ ReLU when `relu`): returns (y, batch mean, biased batch variance).

  Differentiable in x, scale and bias through all three outputs. The custom VJP is the textbook
  BatchNorm gradient: it saves only x and per-channel statistics (plus y with the ReLU, which the
  next convolution keeps anyway), where autodiff also kept x - mean and the ReLU mask: 160 MB instead
  of 118 MB of saved residuals for BatchNorm + ReLU + 1x1 convolution of a (8, 64, 64, 256) map; and
  it takes two passes over the maps (the two channel sums, then dx) instead of autodiff's several.
  """
  return _batch_norm_train_fwd(x, scale, bias, epsilon, relu)[0]


def _batch_norm_train_fwd(x, scale, bias, epsilon, relu):
  mean, var = _batch_stats(x)
  y = _normalize(x, scale, bias, mean, var, epsilon)
  if relu:
    y = jax.nn.relu(y)
  inv_std = jax.lax.rsqrt(var + epsilon)
  return (y, mean, var), (x, scale, mean, inv_std, y if relu else None)


def _batch_norm_train_bwd(epsilon, relu, residuals, cotangents):
  del epsilon
  x, scale, mean, inv_std, y = residuals
  g, g_mean, g_var = cotangents
  if relu:
    g = jnp.where(y > 0, g, jnp.zeros_like(g))
  axes = tuple(range(x.ndim - 1))
  n = math.prod(x.shape[:-1])
  stat = stat_dtype(x.dtype)
  gf, xc = g.astype(stat), x.astype(stat) - mean
  sum_g = gf.sum(axes)
  sum_gx = (gf * xc).sum(axes)
  # With xhat = xc * inv_std and y = scale * xhat + bias:
  #   dx = scale * inv_std * (g - sum_g / n - xhat * sum(g * xhat) / n)
  # plus the direct paths through the returned statistics, d mean / dx = 1 / n and
  # d var / dx = 2 xc / n, so dx = a * g + b * xc + c with per-channel a, b, c.
  a = scale * inv_std
  b = (2.0 * g_var - a * inv_std * inv_std * sum_gx) / n
  c = (g_mean - a * sum_g) / n
  dx = (a * gf + b * xc + c).astype(x.dtype)
  return dx, (sum_gx * inv_std).astype(scale.dtype), sum_g.astype(scale.dtype)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


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
    out = self.conv1(self.bn1(x, relu=True))
    out = self.conv2(self.bn2(out, relu=True))
    out = self.conv3(self.bn3(out, relu=True))
    return out + residual


def coord_channels(height: int, width: int, dtype=np.float32) -> np.ndarray:
  """The CoordConv channels for an (height, width) map: (height, width, 3) in [-1, 1].

  Channel order and values follow the official AddCoordsTh: channel 0 runs from -1 to 1 *down the
  rows* and channel 1 across the columns (the official code calls them x and y but builds them
  transposed; the trained weights expect this order, so we keep it), channel 2 is the radius
  sqrt(c0^2 + c1^2) divided by its maximum. Computed in float64 for a float64 compute `dtype`, else in
  float32 (as the official code builds them), and returned in that precision (`grid_dtype`).
  """
  precision = grid_dtype(dtype)
  rows, cols = align_corners_grid(height, precision), align_corners_grid(width, precision)
  c0 = np.broadcast_to(rows[:, None], (height, width))
  c1 = np.broadcast_to(cols[None, :], (height, width))
  r = np.sqrt(c0 ** 2 + c1 ** 2)
  r = r / r.max()
  return np.stack([c0, c1, r], axis=-1).astype(precision)


def add_coords(x: jax.Array, boundary_map: jax.Array | None = None) -> jax.Array:
  """Appends the coordinate channels (and optionally two boundary channels) to x (B, H, W, C).

  `boundary_map` (B, H, W) is the previous stack's last heatmap channel: the boundary channels are
  coordinate channels 0 and 1 where clip(boundary_map, 0, 1) > 0.05 and zero elsewhere (official
  with_boundary). Returns (B, H, W, C + 3) or (B, H, W, C + 5) in x's dtype; the channels are
  computed in float64 when x is float64, else in float32 (`coord_channels`).
  """
  b, h, w, _ = x.shape
  coords = jnp.asarray(coord_channels(h, w, x.dtype))
  parts = [x, jnp.broadcast_to(coords, (b, h, w, 3)).astype(x.dtype)]
  if boundary_map is not None:
    on = (jnp.clip(boundary_map, 0.0, 1.0) > 0.05)[..., None]
    parts.append(jnp.where(on, coords[None, :, :, :2], 0.0).astype(x.dtype))
  return jnp.concatenate(parts, axis=-1)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 on (B, H, W, C); odd trailing rows / columns are dropped (floor).

  The gradient goes to the first maximum of each window in row-major order, as PyTorch's
  max_pool2d routes it (JAX's own max gradient splits it among ties).
  """
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2]
  return _max_pool_windows(x.reshape(b, h // 2, 2, w // 2, 2, c))


@jax.custom_vjp
def _max_pool_windows(windows: jax.Array) -> jax.Array:
  """(B, H', 2, W', 2, C) -> (B, H', W', C), the max of each 2 x 2 window."""
  return windows.max(axis=(2, 4))


def _max_pool_windows_fwd(windows):
  y = windows.max(axis=(2, 4))
  return y, (windows, y)


def _max_pool_windows_bwd(residuals, g):
  # One elementwise pass: each window position takes g if it holds the max and no earlier position
  # did (NaN counts as the max, as in PyTorch). Autodiff of `max` takes several full-size passes
  # (equality mask, tie counts, division).
  windows, y = residuals
  taken = jnp.zeros(y.shape, bool)
  rows = []
  for i in range(2):
    cols = []
    for j in range(2):
      v = windows[:, :, i, :, j]
      hit = ((v == y) | jnp.isnan(v)) & ~taken
      taken = taken | hit
      cols.append(jnp.where(hit, g, jnp.zeros_like(g)))
    rows.append(jnp.stack(cols, axis=3))
  return (jnp.stack(rows, axis=2),)


_max_pool_windows.defvjp(_max_pool_windows_fwd, _max_pool_windows_bwd)


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """Nearest-neighbour 2x upsampling of (B, H, W, C) to (B, 2H, 2W, C)."""
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def instance_norm(x: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Per-sample, per-channel normalisation over H and W without affine (F.instance_norm), >= float32."""
  x = x.astype(stat_dtype(x.dtype))
  mean = _mean_hw(x)
  var = _mean_hw(jnp.square(x - mean))
  return (x - mean) * jax.lax.rsqrt(var + eps)


def _mean_hw(x: jax.Array) -> jax.Array:
  """Mean of (B, H, W, C) over H and W, kept as (B, 1, 1, C): a sum over W, then one over H.

  The same value as one mean over both axes, and as accurate under XLA; but exported to ONNX, one
  ReduceSum over all H * W values runs in onnxruntime with ~10x XLA's rounding error, which moved
  the full model's landmarks by ~1e-3 px; two short sums keep it within 2.4e-4 px
  (tests/test_export.py).
  """
  return x.sum(axis=2, keepdims=True).sum(axis=1, keepdims=True) / (x.shape[1] * x.shape[2])
