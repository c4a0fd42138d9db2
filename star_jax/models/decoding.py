"""Decoding heatmaps into landmarks: soft-argmax, heatmap moments (mean and covariance), and the
argmax decoding of point maps. Shared by the network (its landmark output), the losses (STAR's
moments) and inference (covariance ellipses).

Conventions (the whole of star_jax):
  * heatmaps are channels-last, `(batch, height, width, points)`;
  * landmarks are `(batch, points, 2)` as (x, y), normalised to [-1, 1] on the *align-corners* grid of
    the heatmap: column 0 is x = -1 and column `width - 1` is x = +1 (the official decoder's grid).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The official normalisation clamps heatmap sums to at least this before dividing.
_SUM_FLOOR = 1e-6



def align_corners_grid(n: int, dtype=np.float32) -> np.ndarray:
  """(n,) coordinates in [-1, 1] of n pixels on the align-corners grid: pixel 0 is -1, pixel n - 1 is
  +1. The one grid of the project: soft-argmax, heatmap moments, CoordConv channels and point-map
  decoding all use it.

  `dtype` is the compute dtype it serves: float64 gives the grid computed in float64 (a float64 run is
  float64 throughout); any other dtype the float32 grid (callers cast it to bfloat16 or float16).
  """
  # The official order of operations (arange / (n - 1) * 2 - 1) in the returned precision: in float32
  # bit-equal to the official `_make_grid` and AddCoordsTh channels, which are built in float32.
  precision = grid_dtype(dtype)
  i = np.arange(n, dtype=precision)
  return i / precision.type(n - 1) * precision.type(2) - precision.type(1)


def grid_dtype(dtype) -> np.dtype:
  """The precision of the coordinate grids for a compute dtype: float64 for float64, else float32."""
  return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _grid(n: int, dtype) -> jnp.ndarray:
  """The align-corners grid of n pixels as a JAX array of `dtype`."""
  return jnp.asarray(align_corners_grid(n, dtype)).astype(dtype)


def check_heatmaps(heatmaps, name='heatmaps'):
  if heatmaps.ndim != 4:
    raise ValueError(f'{name} must be (batch, height, width, points), got shape {heatmaps.shape}')
  if heatmaps.shape[1] < 2 or heatmaps.shape[2] < 2:
    raise ValueError(f'{name} need height and width >= 2 for the align-corners grid, got {heatmaps.shape}')


def as_float(x):
  """Upcasts bfloat16 / float16 maps to float32 (moments of sharp maps need the precision)."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def soft_argmax(heatmaps: jnp.ndarray) -> jnp.ndarray:
  """Expected (x, y) position of each heatmap, the official `decoder_default`.

  Args:
    heatmaps: (B, H, W, N) non-negative maps (not necessarily normalised).
  Returns:
    (B, N, 2) as (x, y) in [-1, 1] on the align-corners grid. An all-zero map decodes to (0, 0)
    (its sum is clamped to 1e-6, as the official code does).
  """
  check_heatmaps(heatmaps)
  heatmaps = as_float(heatmaps)
  _, h, w, _ = heatmaps.shape
  total = jnp.maximum(heatmaps.sum(axis=(1, 2)), _SUM_FLOOR)            # (B, N)
  # The x grid varies along W only and the y grid along H only, so the weighted sums reduce to
  # 1-D dot products with the marginals; no full-size grid is materialised.
  x = jnp.einsum('bwn,w->bn', heatmaps.sum(axis=1), _grid(w, heatmaps.dtype))
  y = jnp.einsum('bhn,h->bn', heatmaps.sum(axis=2), _grid(h, heatmaps.dtype))
  return jnp.stack([x, y], axis=-1) / total[..., None]


def _refined_mean(marginal, coords, s1):
  """sum_i marginal_i coords_i, for (B, K, N) marginals and (K,) coordinates, to about 1 ulp.

  Computed as m0 * s1 + sum_i marginal_i (coords_i - m0) around a first estimate m0: the same value
  in exact arithmetic, but the centred sum's rounding scales with the map's spread, not with |m0|,
  which keeps the centred moments and the gradient consistent with the mean.
  """
  m0 = (marginal * coords[None, :, None]).sum(1)
  return m0 * s1 + (marginal * (coords[None, :, None] - m0[:, None])).sum(1)


def _moments_forward(heatmaps):
  """Per-map statistics of the normalised maps p = heatmaps / max(sum, 1e-6), in four passes over the maps.

  Returns a dict of (B, N) arrays: mx, my (weighted means), sxx, syy, sxy (centred second moments
  sum p (c - m)(c' - m')), s1 = sum p, s2 = sum p^2, ex = sum p (x - mx), ey (0 unless s1 != 1),
  total (the clamped sum) and unclamped (1.0 where the sum was above the clamp, else 0.0).
  """
  _, h, w, _ = heatmaps.shape
  xs, ys = _grid(w, heatmaps.dtype), _grid(h, heatmaps.dtype)
  # Three read-only passes over the maps (the marginals and the sum of squares), then the cross moment
  # below.
  px_raw = heatmaps.sum(axis=1)                                         # (B, W, N) x marginal
  py_raw = heatmaps.sum(axis=2)                                         # (B, H, N) y marginal
  sq_raw = jnp.square(heatmaps).sum(axis=(1, 2))                        # (B, N)
  # The barrier keeps the total below a sum of the small marginal: XLA would otherwise merge the two
  # reductions into a fifth full-size pass over the maps.
  px_raw = jax.lax.optimization_barrier(px_raw)
  raw_sum = px_raw.sum(axis=1)
  total = jnp.maximum(raw_sum, _SUM_FLOOR)
  px, py = px_raw / total[:, None], py_raw / total[:, None]
  s1 = raw_sum / total
  mx = _refined_mean(px, xs, s1)
  my = _refined_mean(py, ys, s1)
  dx = xs[None, :, None] - mx[:, None]                                  # (B, W, N)
  dy = ys[None, :, None] - my[:, None]                                  # (B, H, N)
  # Cross moment sum_h (y - my) sum_w p (x - mx), with the rows centred on each map's own mean, as the
  # official code centres its float32 sums: accurate on sharp maps
  # (tests/test_losses.py::test_star_loss_is_accurate_on_sharp_maps), where one fixed centre cancels in
  # float32, and faster than sums about several fixed centres (docs/benchmarks.md, "STAR loss").
  # p = hm / T first, as px is made: a map on the diagonal then gives sxy equal to sxx bit for bit (the
  # same products in the same order), so its singular covariance has the exact zero eigenvalue that
  # LAPACK finds there (tests/test_losses.py's hard cases).
  row_x = ((heatmaps / total[:, None, None]) * dx[:, None]).sum(axis=2)  # sum_w p (x - mx), (B, H, N)
  return dict(
      mx=mx, my=my,
      sxx=(px * dx * dx).sum(1), syy=(py * dy * dy).sum(1), sxy=(row_x * dy).sum(1),
      s1=s1, s2=sq_raw / (total * total),
      ex=(px * dx).sum(1), ey=(py * dy).sum(1),
      total=total, unclamped=(raw_sum > _SUM_FLOOR).astype(heatmaps.dtype))


_MOMENT_KEYS = ('mx', 'my', 'sxx', 'syy', 'sxy', 's1', 's2')


@jax.custom_vjp
def _normalised_moments(heatmaps):
  """(mx, my, sxx, syy, sxy, s1, s2) of the normalised maps, each (B, N); see `_moments_forward`."""
  stats = _moments_forward(heatmaps)
  return tuple(stats[k] for k in _MOMENT_KEYS)


def _normalised_moments_fwd(heatmaps):
  stats = _moments_forward(heatmaps)
  return tuple(stats[k] for k in _MOMENT_KEYS), (heatmaps, stats)


def _normalised_moments_bwd(residuals, cotangents):
  """Gradient w.r.t. the maps in one elementwise pass (autodiff needs several full-size passes).

  With p = hm / T, a loss F(p) has dF/dhm = (G - k * sum(G p)) / T, G = dF/dp, k = 1 unless the sum
  was clamped. Each statistic is a polynomial of degree <= 2 in (x - mx, y - my) or p, so
  G - k sum(G p) is too, with coefficients computed per map from the statistics: the full-size
  gradient is rebuilt from (B, W, N) and (B, H, N) pieces plus a multiple of hm, all centred on the
  means (a raw-coordinate polynomial would cancel in float32).
  """
  heatmaps, st = residuals
  g_mx, g_my, g_sxx, g_syy, g_sxy, g_s1, g_s2 = cotangents
  _, h, w, _ = heatmaps.shape
  xs, ys = _grid(w, heatmaps.dtype), _grid(h, heatmaps.dtype)
  mx, my, k, inv_t = st['mx'], st['my'], st['unclamped'], 1.0 / st['total']
  # dF/dp, taking mx and my as functions of p: d sxx / dp = (x - mx)^2 - 2 ex x, and so on.
  c_x = g_mx - 2.0 * g_sxx * st['ex'] - g_sxy * st['ey']
  c_y = g_my - 2.0 * g_syy * st['ey'] - g_sxy * st['ex']
  # With x = dx + mx: everything constant per map, less k * sum(G p) (the normalisation).
  c_0 = ((1.0 - k) * (c_x * mx + c_y * my) - k * (g_sxx * st['sxx'] + g_syy * st['syy'] + g_sxy * st['sxy'])
         + g_s1 * (1.0 - k * st['s1']) - 2.0 * k * g_s2 * st['s2'])
  dx = xs[None, :, None] - mx[:, None]                                  # (B, W, N)
  dy = ys[None, :, None] - my[:, None]                                  # (B, H, N)
  along_x = (c_0[:, None] + c_x[:, None] * dx + g_sxx[:, None] * dx * dx) * inv_t[:, None]
  along_y = (c_y[:, None] + g_syy[:, None] * dy) * dy * inv_t[:, None]
  cross = (g_sxy * inv_t)[:, None] * dy                                 # times dx below
  hm_coef = 2.0 * g_s2 * inv_t * inv_t                                  # d (s2 = sum hm^2 / T^2) / d hm
  grad = (along_x[:, None] + along_y[:, :, None] + cross[:, :, None] * dx[:, None]
          + hm_coef[:, None, None] * heatmaps)
  return (grad,)


_normalised_moments.defvjp(_normalised_moments_fwd, _normalised_moments_bwd)


def heatmap_moments(heatmaps: jnp.ndarray, eps: float = 1e-5):
  """Mean and unbiased weighted covariance of each heatmap, as in the official STAR losses.

  Each map is first normalised to sum 1 (sum clamped to >= 1e-6). The covariance is the official
  "unbiased weighted covariance": sum_p p (c - mean)(c - mean)^T / (V1 - V2 / V1), with
  V1 = sum p + eps and V2 = sum p^2 + eps. Reverse-mode differentiable (a custom VJP that costs one
  pass over the maps); not forward-mode.

  Args:
    heatmaps: (B, H, W, N) non-negative maps (computed in float32 at least).
    eps: the official EPSILON added to V1 and V2.
  Returns:
    means (B, N, 2) as (x, y) in [-1, 1]; covariances (B, N, 2, 2) over (x, y).
  """
  check_heatmaps(heatmaps)
  mx, my, sxx, syy, sxy, s1, s2 = _normalised_moments(as_float(heatmaps))
  v1 = s1 + eps
  denom = v1 - (s2 + eps) / v1
  cov = jnp.stack([jnp.stack([sxx, sxy], -1), jnp.stack([sxy, syy], -1)], -2) / denom[..., None, None]
  return jnp.stack([mx, my], axis=-1), cov


def decode_pointmaps(maps):
  """Landmarks of heatmap regression: (B, h, w, N) maps -> (B, N, 2) (x, y) in [-1, 1].

  Argmax, then the centroid of the map over the 3 x 3 pixels around it (sub-pixel), on the
  align-corners grid of the network's own soft-argmax. For models trained without a landmark term
  (AWing alone): their 'landmarks' come from heatmaps that nothing trains, so they are read from the
  AWing-trained point maps, as a heatmap-regression model (AWing's own setting) is.
  """
  b, h, w, n = maps.shape
  flat = maps.reshape(b, h * w, n)
  peak = jnp.argmax(flat, axis=1)                                    # (B, N)
  py, px = peak // w, peak % w
  ys, xs = jnp.arange(h), jnp.arange(w)
  near_y = jnp.abs(ys[None, :, None] - py[:, None, :]) <= 1          # (B, h, N)
  near_x = jnp.abs(xs[None, :, None] - px[:, None, :]) <= 1          # (B, w, N)
  weights = maps * (near_y[:, :, None, :] & near_x[:, None, :, :])   # (B, h, w, N)
  total = jnp.maximum(weights.sum(axis=(1, 2)), 1e-12)
  grid_type = as_float(maps).dtype
  x = jnp.einsum('bhwn,w->bn', weights, _grid(w, grid_type)) / total
  y = jnp.einsum('bhwn,h->bn', weights, _grid(h, grid_type)) / total
  return jnp.stack([x, y], axis=-1)
