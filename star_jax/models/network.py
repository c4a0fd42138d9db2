"""StackedHGNetV1, the STAR landmark network, in Flax NNX (channels-last).

A faithful port of the official `StackedHGNetV1` (ZhenglinZhou/STAR, lib/backbone/stackedHGNetV1.py):
a CoordConv stem, `nstack` hourglasses of depth `nlevels`, per-stack heads for heatmaps and the AAM
point / edge maps, and soft-argmax landmarks of the fused heatmaps. Module names follow the
official ones where it helps the checkpoint converter (star_jax/convert_pytorch.py) map weights.

Input: (B, H, W, 3) RGB images normalised as (pixel - 127.5) / 127.5 (see `forward.preprocess`). The
official network reads BGR; the converter reverses the stem's colour input channels so that the
official weights see the same colours. Maps come out at (H / 4, W / 4).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from star_jax import layouts
from star_jax.models.decoding import soft_argmax
from star_jax.models.layers import (BatchNorm, Conv2d, ResBlock, add_coords, instance_norm,
                                    max_pool_2x2, stat_dtype, upsample_nearest_2x)

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float64': jnp.float64}  # float64: tests


def _edge_to_point(edgemaps: jax.Array, membership: tuple) -> jax.Array:
  """Edge maps (B, h, w, E) -> per-point weights (B, h, w, N), in the edge maps' dtype.

  A point's weight is the sum of the maps of the edges it lies on, or 1 for a point on no edge
  (official E2HTransform: a fixed 1x1 convolution with a 0/1 matrix and a 0/1 bias).
  """
  m = np.asarray(membership, np.float32)                       # (N, E)
  bias = (m.sum(axis=1) < 0.5).astype(np.float32)             # (N,)
  return jnp.einsum('bhwe,ne->bhwn', edgemaps, m) + bias


class CoordConv(nnx.Module):
  """Coordinate channels appended, then a 1x1 convolution (official CoordConvTh of an hourglass).

  in_features counts the input's own channels; the convolution sees 3 more (two coordinates and
  the radius) and, with `boundary=True`, 2 more boundary channels (see layers.add_coords).
  The coordinate channels are made for the actual feature-map size. (The official code sizes them
  from the input width / nstack, which equals the feature size, input / 4, only for nstack 4.)
  """

  def __init__(self, in_features: int, out_features: int, *, boundary: bool = False,
               dtype=jnp.float32, rngs: nnx.Rngs):
    extra = 3 + (2 if boundary else 0)
    self.boundary = boundary
    self.conv = Conv2d(in_features + extra, out_features, 1, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, boundary_map: jax.Array | None = None) -> jax.Array:
    if self.boundary != (boundary_map is not None):
      raise ValueError(f'CoordConv built with boundary={self.boundary} called with '
                       f'boundary_map={"an array" if boundary_map is not None else None}')
    return self.conv(add_coords(x, boundary_map))


class Stem(nnx.Module):
  """7x7 stride-2 convolution to 64 channels (with coordinate channels when add_coord, computed at
  the input resolution as officially), BatchNorm, ReLU. (B, H, W, 3) -> (B, H / 2, W / 2, 64)."""

  def __init__(self, add_coord: bool, *, dtype, rngs: nnx.Rngs):
    self.add_coord = add_coord
    self.conv = Conv2d(3 + (3 if add_coord else 0), 64, 7, stride=2, dtype=dtype, rngs=rngs)
    self.bn = BatchNorm(64)

  def __call__(self, images: jax.Array) -> jax.Array:
    x = add_coords(images) if self.add_coord else images
    return jax.nn.relu(self.bn(self.conv(x)))


class Hourglass(nnx.Module):
  """Recursive hourglass of depth `depth` on `features` channels; output has the input's shape.

  up1 = ResBlock(x); low = ResBlock -> (hourglass of depth - 1 | ResBlock) -> ResBlock on the 2x2
  max-pooled x; out = up1 + nearest-2x-upsampled low. The outermost level of each stack starts
  with a 1x1 CoordConv (with two boundary channels from the second stack on).
  """

  def __init__(self, depth: int, features: int, *, coord: bool = False, boundary: bool = False,
               dtype, rngs: nnx.Rngs):
    self.coordconv = (CoordConv(features, features, boundary=boundary, dtype=dtype, rngs=rngs)
                      if coord else None)
    self.up1 = ResBlock(features, features, dtype=dtype, rngs=rngs)
    self.low1 = ResBlock(features, features, dtype=dtype, rngs=rngs)
    if depth > 1:
      self.low2 = Hourglass(depth - 1, features, dtype=dtype, rngs=rngs)
    else:
      self.low2 = ResBlock(features, features, dtype=dtype, rngs=rngs)
    self.low3 = ResBlock(features, features, dtype=dtype, rngs=rngs)

  def __call__(self, x: jax.Array, boundary_map: jax.Array | None = None) -> jax.Array:
    """x (B, H, W, C); boundary_map (B, H, W) or None, used only by a boundary CoordConv."""
    if self.coordconv is not None:
      x = self.coordconv(x, boundary_map if self.coordconv.boundary else None)
    up1 = self.up1(x)
    low = self.low3(self.low2(self.low1(max_pool_2x2(x))))
    return up1 + upsample_nearest_2x(low)


class Features(nnx.Module):
  """Per-stack feature head: ResBlock, then 1x1 conv + BatchNorm + ReLU (official features[i])."""

  def __init__(self, features: int, *, dtype, rngs: nnx.Rngs):
    self.res = ResBlock(features, features, dtype=dtype, rngs=rngs)
    self.conv = Conv2d(features, features, 1, dtype=dtype, rngs=rngs)
    self.bn = BatchNorm(features)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(self.res(x))))


class StackedHGNet(nnx.Module):
  """The STAR network (official StackedHGNetV1).

  Args:
    num_points: N, landmarks (heatmap channels).
    edge_membership: (N, E) 0/1 matrix, point x edge (`Layout.edge_membership()`); defines the fixed
      edge-to-point transform of the AAM. Ignored without AAM.
    image_size: input side; must be a multiple of 4 * 2 ** nlevels.
    nstack, nlevels, channels: hourglasses, hourglass depth, feature channels C.
    add_coord: CoordConv in the stem and at the start of each hourglass.
    use_aam: the anisotropic attention module (point and edge maps fused into the heatmaps).
    dtype: compute dtype ('float32' / 'bfloat16' or a jnp dtype); parameters stay float32.
  """

  def __init__(self, num_points: int, edge_membership: np.ndarray | None = None, *,
               image_size: int = 256, nstack: int = 4, nlevels: int = 4, channels: int = 256,
               add_coord: bool = True, use_aam: bool = True, dtype: Any = 'float32',
               rngs: nnx.Rngs):
    if isinstance(dtype, str):
      if dtype not in DTYPES:
        raise ValueError(f'model dtype must be one of {sorted(DTYPES)}, got {dtype!r}')
      dtype = DTYPES[dtype]
    if image_size % (4 * 2 ** nlevels):
      raise ValueError(f'image_size {image_size} must be a multiple of 4 * 2 ** nlevels = '
                       f'{4 * 2 ** nlevels} (the maps are image_size / 4, pooled nlevels times)')
    if channels % 2:
      raise ValueError(f'channels must be even (bottleneck width C / 2), got {channels}')
    self.num_points = num_points
    self.image_size = image_size
    self.nstack = nstack
    self.use_aam = use_aam
    self.dtype = dtype
    kw = dict(dtype=dtype, rngs=rngs)
    c, n = channels, num_points

    self.stem = Stem(add_coord, **kw)
    self.pre_res1 = ResBlock(64, 128, **kw)
    self.pre_res2 = ResBlock(128, 128, **kw)
    self.pre_res3 = ResBlock(128, c, **kw)
    self.hourglasses = nnx.List([
        Hourglass(nlevels, c, coord=add_coord, boundary=add_coord and i > 0, **kw)
        for i in range(nstack)])
    self.features = nnx.List([Features(c, **kw) for _ in range(nstack)])
    self.out_heatmaps = nnx.List([Conv2d(c, n, 1, **kw) for _ in range(nstack)])
    self.merge_features = nnx.List([Conv2d(c, c, 1, **kw) for _ in range(nstack - 1)])
    self.merge_heatmaps = nnx.List([Conv2d(n, c, 1, **kw) for _ in range(nstack - 1)])
    if use_aam:
      if edge_membership is None:
        raise ValueError('use_aam=True needs edge_membership (Layout.edge_membership())')
      membership = np.asarray(edge_membership, np.float32)
      if membership.ndim != 2 or membership.shape[0] != n:
        raise ValueError(f'edge_membership must be (num_points={n}, num_edges), got {membership.shape}')
      e = membership.shape[1]
      self.num_edges = e
      # The fixed edge-to-point transform (official E2HTransform) is a constant, not state: kept
      # as a hashable tuple so it stays out of checkpoints and optimisers.
      self.edge_membership = tuple(tuple(int(v) for v in row) for row in (membership > 0.5))
      self.out_pointmaps = nnx.List([Conv2d(c, n, 1, **kw) for _ in range(nstack)])
      self.out_edgemaps = nnx.List([Conv2d(c, e, 1, **kw) for _ in range(nstack)])
      self.merge_pointmaps = nnx.List([Conv2d(n, c, 1, **kw) for _ in range(nstack - 1)])
      self.merge_edgemaps = nnx.List([Conv2d(e, c, 1, **kw) for _ in range(nstack - 1)])

  def __call__(self, images: jax.Array) -> list[dict[str, jax.Array]]:
    """images (B, H, W, 3) normalised RGB -> one dict per stack (see the module docstring).

    Keys: 'landmarks' (B, N, 2) in [-1, 1] (x, y, align-corners grid on the maps), 'heatmaps' and
    'fusion_heatmaps' (B, h, w, N), with AAM 'pointmaps' (B, h, w, N) and 'edgemaps' (B, h, w, E);
    h = H / 4. All float32, also with bfloat16 compute.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f'images must be (B, H, W, 3), got {images.shape}')
    if images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f'images are {images.shape[1]}x{images.shape[2]}, the model was built for '
                       f'{self.image_size}x{self.image_size}')
    x = self.stem(images.astype(self.dtype))
    x = self.pre_res1(x)
    x = max_pool_2x2(x)
    x = self.pre_res3(self.pre_res2(x))

    # Heads in float32 (float64 in x64 tests): cheap, and they feed the losses and soft-argmax.
    head_dtype = stat_dtype(self.dtype)
    outputs = []
    boundary_map = None
    for i in range(self.nstack):
      hg = self.hourglasses[i](x, boundary_map)
      feature = self.features[i](hg)
      heatmaps = jax.nn.relu(instance_norm(self.out_heatmaps[i](feature)))
      out = {'heatmaps': heatmaps}
      if self.use_aam:
        pointmaps = jax.nn.sigmoid(self.out_pointmaps[i](feature).astype(head_dtype))
        edgemaps = jax.nn.sigmoid(self.out_edgemaps[i](feature).astype(head_dtype))
        weights = _edge_to_point(edgemaps, self.edge_membership)
        fusion = weights * pointmaps * heatmaps
        out.update(pointmaps=pointmaps, edgemaps=edgemaps)
      else:
        fusion = heatmaps
      out['fusion_heatmaps'] = fusion
      out['landmarks'] = soft_argmax(fusion)
      outputs.append(out)

      if i < self.nstack - 1:
        x = x + self.merge_features[i](feature) + self.merge_heatmaps[i](heatmaps)
        if self.use_aam:
          x = x + self.merge_pointmaps[i](pointmaps) + self.merge_edgemaps[i](edgemaps)
        # The next hourglass's boundary channels come from this stack's last heatmap channel.
        boundary_map = heatmaps[..., -1]
    return outputs


def create_model(config, rngs: nnx.Rngs) -> StackedHGNet:
  """Builds the network from a configs/base.py config (layout, model.*, data.image_size)."""
  layout = layouts.get_layout(config.layout)
  m = config.model
  return StackedHGNet(
      layout.num_points, layout.edge_membership(), image_size=config.data.image_size,
      nstack=m.nstack, nlevels=m.nlevels, channels=m.channels, add_coord=m.add_coord,
      use_aam=m.use_aam, dtype=m.dtype, rngs=rngs)
