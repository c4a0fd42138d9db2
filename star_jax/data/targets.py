"""STAR training targets from crop-space landmarks: normalised points, point maps and edge maps.

Follows the official `AlignmentDataset` / `encoder_default` (ZhenglinZhou/STAR) value for value, but
computes each map directly at the heatmap resolution instead of drawing 256 x 256 images and resizing
them, which is what makes our input pipeline fast:

* point maps: the official draws, per point, a Gaussian patch (peak 1) into a 256 x 256 map and
  bilinearly resizes it to 64 x 64 (torch `interpolate`, align_corners=False, no antialiasing). The
  patch is separable and the resize is linear and separable, so each 64 x 64 map is the outer product
  of two resized 1-D profiles.
* edge maps: the official draws each curve with cv2.polylines at 4x (1024 x 1024), area-resizes it
  back to 256 and bilinearly resizes to 64. We draw the same polyline at 4x, but only on a window
  around the curve; the two resizes together average one box of the 4x canvas per output pixel
  (an 8 x 8 box for 256 -> 64), which we read off the window's integral image.

Inputs are float32 (N, 2) landmarks (x, y) in crop pixels of an `image_size` square; outputs are
channels-last float32 (heatmap_size, heatmap_size, C).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np
from scipy import interpolate

EDGE_DRAW_SCALE = 4      # the official draws edge curves at 4x the crop resolution
EDGE_DENSITY = 5         # spline samples per landmark segment (official `_fit_curve` density)


def normalize_landmarks(landmarks: np.ndarray, image_size: int) -> np.ndarray:
  """Crop px -> [-1, 1], align_corners=False, clipped (the official `_norm_points`)."""
  p = np.asarray(landmarks, np.float32)
  out = (p * np.float32(2.0) + np.float32(1.0)) / np.float32(image_size) - np.float32(1.0)
  return np.clip(out, -1.0, 1.0).astype(np.float32)


@functools.lru_cache(maxsize=32)
def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """(out_size, in_size) float32 R with resized = R @ signal: torch's `interpolate(mode='bilinear',
  align_corners=False)` along one axis, without antialiasing: a 4x downscale averages the middle two
  samples of each group of 4. (On float32 maps cv2.INTER_LINEAR computes the same, to float
  rounding; cv2.INTER_AREA, the mean of all four, does not.)"""
  scale = in_size / out_size
  r = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    src = max((i + 0.5) * scale - 0.5, 0.0)
    i0 = min(int(src), in_size - 1)
    i1 = min(i0 + 1, in_size - 1)
    frac = src - i0
    r[i, i0] += 1.0 - frac
    r[i, i1] += frac
  r.setflags(write=False)
  return r


# ---- Point maps ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=32)
def _resize_taps(in_size: int, out_size: int):
  """The two taps of each row of bilinear_resize_matrix: (index0, index1, weight0, weight1), each (out,)."""
  r = bilinear_resize_matrix(in_size, out_size)
  rows = np.arange(out_size)
  scale = in_size / out_size
  i0 = np.minimum(np.maximum((rows + 0.5) * scale - 0.5, 0.0).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  w0 = r[rows, i0].copy()
  w1 = np.where(i1 != i0, r[rows, i1], 0).astype(np.float32)
  return i0, i1, w0, w1


def _gaussian_profile_at(coords: np.ndarray, pixels: np.ndarray, size: int, sigma: float) -> np.ndarray:
  """(N, len(pixels)) float32: per point, the 1-D profile of the official `_circle` patch along one
  axis of a `size` px map, evaluated at integer `pixels`.

  Official quirks kept: the patch starts at int(p - 3 sigma) (truncation towards zero), holds
  ceil(6 sigma + 1) samples and peaks at its sample (6 sigma + 1) // 2, so the peak lies on an integer
  pixel near p (not at p), and the patch is cut at int(p + 3 sigma + 1) and at the map border."""
  tmp = sigma * 3
  patch_size = 2 * tmp + 1
  patch_len = int(np.ceil(patch_size))
  centre = patch_size // 2
  ul = np.trunc(coords - tmp).astype(np.int64)[:, None]
  br = np.trunc(coords + tmp + 1).astype(np.int64)[:, None]
  offset = pixels[None, :] - ul                                  # position inside the patch
  inside = (pixels[None, :] >= np.maximum(ul, 0)) & (pixels[None, :] < np.minimum(br, size))
  inside &= (offset >= 0) & (offset < patch_len)
  d = offset.astype(np.float32) - np.float32(centre)
  prof = np.exp(-(d * d) / np.float32(2 * sigma ** 2))
  return np.where(inside, prof, np.float32(0)).astype(np.float32)


def _resized_profiles(coords: np.ndarray, image_size: int, heatmap_size: int, sigma: float) -> np.ndarray:
  """(len(coords), heatmap_size): the Gaussian profiles bilinearly resized, evaluated only at the
  resize's two taps per output pixel."""
  i0, i1, w0, w1 = _resize_taps(image_size, heatmap_size)
  both = _gaussian_profile_at(coords, np.concatenate([i0, i1]), image_size, sigma)
  return w0 * both[:, :heatmap_size] + w1 * both[:, heatmap_size:]


def point_maps(landmarks: np.ndarray, image_size: int, heatmap_size: int, sigma: float) -> np.ndarray:
  """(heatmap_size, heatmap_size, N) float32 point-map targets for (N, 2) crop-px landmarks.

  The official: per point, clip to [0, image_size - 1], draw a peak-1 Gaussian (std `sigma` px at
  image_size) into an image_size map, then bilinear-resize to heatmap_size. Computed here as the
  outer product of the resized x and y profiles (the Gaussian and the resize are both separable;
  the product differs from the official joint exponential by float32 rounding, < 1e-7)."""
  p = np.clip(np.asarray(landmarks, np.float64), 0, image_size - 1)
  n = len(p)
  # A point whose patch misses the map entirely is skipped by the official; with clipped points this
  # never happens, and its profiles would be zero anyway.
  profiles = _resized_profiles(np.concatenate([p[:, 0], p[:, 1]]), image_size, heatmap_size, sigma)
  gx, gy = profiles[:n].T, profiles[n:].T   # (w, N), (h, N)
  return gy[:, None, :] * gx[None, :, :]


# ---- Edge maps ----------------------------------------------------------------------------------

def fit_curve(points: np.ndarray, closed: bool, density: int = EDGE_DENSITY) -> np.ndarray:
  """(M, 2) float64 samples of an interpolating cubic spline through (K, 2) points (the official
  `_fit_curve`): scipy splprep (s=0, periodic if closed, chord-length parameters u), sampled at
  `density` evenly spaced parameters per segment [u_i, u_i+1), plus the last u for an open curve.
  Falls back to the points themselves where the fit fails (e.g. repeated points), as the official."""
  x = np.asarray(points[:, 0], np.float64)
  y = np.asarray(points[:, 1], np.float64)
  if closed:
    x, y = np.concatenate([x, x[:1]]), np.concatenate([y, y[:1]])
  try:
    tck, u = interpolate.splprep([x, y], s=0, per=int(closed), k=3, quiet=1)
    # np.linspace(u_i, u_i+1, density, endpoint=False) per segment, with linspace's rounding.
    ts = (np.arange(density)[None, :] * ((u[1:] - u[:-1]) / density)[:, None] + u[:-1, None]).ravel()
    if not closed:
      ts = np.concatenate([ts, u[-1:]])
    out = np.stack(interpolate.splev(ts, tck, der=0), axis=-1)
  except Exception:  # noqa: BLE001 -- the official catches everything here and draws the raw points
    return np.asarray(points, np.float64)
  return out if np.all(np.isfinite(out)) else np.asarray(points, np.float64)


def _curve_pixels(points: np.ndarray, closed: bool, image_size: int) -> np.ndarray:
  """(M, 2) int32 vertices at the 4x drawing resolution: the fitted curve clipped to the crop, then
  rounded as the official (int(4 p + 0.5))."""
  curve = np.clip(fit_curve(points, closed), 0, image_size - 1)
  return (curve * EDGE_DRAW_SCALE + 0.5).astype(np.int32)


# In the general path a drawn 4x pixel holds this value, so that cv2's uint8 INTER_AREA 4x4 average
# is the exact count of drawn pixels per block (16 k / 16 = k, at most 16), and the map value is
# count / 16. The official draws 255 on float32 and divides by 255 after averaging: the same k / 16.
_INK = EDGE_DRAW_SCALE * EDGE_DRAW_SCALE


def _draw(canvas: np.ndarray, vertices: np.ndarray, closed: bool, value: float) -> None:
  # The official passes cv2.LINE_AA but draws on a float32 canvas, where OpenCV does not anti-alias
  # and draws 8-connected lines: LINE_8 is the same rasterisation on any canvas type.
  cv2.polylines(canvas, [vertices.reshape(-1, 1, 2)], bool(closed), value, EDGE_DRAW_SCALE, cv2.LINE_8)


def edge_maps(landmarks: np.ndarray, edges, image_size: int, heatmap_size: int) -> np.ndarray:
  """(heatmap_size, heatmap_size, E) float32 edge-map targets, one per `edges` entry
  ((is_closed, indices), star_jax.layouts) for (N, 2) crop-px landmarks.

  Per edge as the official: a cubic spline through the edge's points (fit_curve), clipped to the crop,
  drawn 4 px thick at 4x resolution, area-averaged back to image_size (values in [0, 1]) and
  bilinear-resized to heatmap_size. Only a window around the curve is drawn (the polyline never
  reaches past its vertices by more than its half width). When image_size is a whole multiple of
  heatmap_size (always, in the configs) the two resizes together are one box mean per output pixel
  over the 4x canvas, read off its integral image."""
  landmarks = np.asarray(landmarks)
  ratio = image_size // heatmap_size if image_size % heatmap_size == 0 else 0
  align = ratio or 1   # windows of whole resize blocks: each output pixel is inside or outside
  out = np.zeros((heatmap_size, heatmap_size, len(edges)), np.float32)
  margin = 2 * EDGE_DRAW_SCALE  # 4x px: > the line's half width plus the rasteriser's rounding
  for e, (closed, indices) in enumerate(edges):
    v = _curve_pixels(landmarks[list(indices)], closed, image_size)
    # The window in crop px, made of whole resize blocks (so also of whole 4 x 4 canvas blocks).
    x0, y0 = np.maximum((v.min(0) - margin) // EDGE_DRAW_SCALE // align * align, 0)
    x1, y1 = np.minimum(-(-((v.max(0) + margin) // EDGE_DRAW_SCALE + 1) // align) * align, image_size)
    canvas = np.zeros(((y1 - y0) * EDGE_DRAW_SCALE, (x1 - x0) * EDGE_DRAW_SCALE), np.uint8)
    offset = np.array([x0, y0], np.int32) * EDGE_DRAW_SCALE
    if ratio:
      _draw(canvas, v - offset, closed, 1)
      out[y0 // ratio:y1 // ratio, x0 // ratio:x1 // ratio, e] = _box_means(canvas, ratio)
    else:
      _draw(canvas, v - offset, closed, _INK)
      counts = cv2.resize(canvas, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
      window = counts.astype(np.float32) * np.float32(1 / _INK)
      out[..., e] = _resize_window(_resize_window(window, y0, image_size, heatmap_size).T, x0, image_size,
                                   heatmap_size).T
  return out


def _box_means(canvas: np.ndarray, ratio: int) -> np.ndarray:
  """Area average to crop px, then bilinear downscale by the whole factor `ratio`, of a 0/1 4x canvas
  made of whole blocks of 4 * ratio px: (canvas.shape // (4 * ratio)) float32.

  Along each axis the downscale reads output pixel i off crop px [ratio i + lo, ratio i + lo + band)
  with equal weights (lo = (ratio - 1) // 2; band 2 for an even ratio, whose source position falls
  halfway between two pixels, else 1): one box mean of the canvas per output pixel."""
  s = EDGE_DRAW_SCALE
  lo, band = (ratio - 1) // 2, (2 if ratio % 2 == 0 else 1)
  first, size, stride = s * lo, s * band, s * ratio
  rows, cols = canvas.shape[0] // stride, canvas.shape[1] // stride
  integral = cv2.integral(canvas, sdepth=cv2.CV_32S)       # (H + 1, W + 1)
  top = integral[first::stride][:rows]
  bottom = integral[first + size::stride][:rows]
  sums = (bottom[:, first + size::stride][:, :cols] - bottom[:, first::stride][:, :cols]
          - top[:, first + size::stride][:, :cols] + top[:, first::stride][:, :cols])
  return sums.astype(np.float32) * np.float32(1 / (size * size))


def _resize_window(window: np.ndarray, start: int, in_size: int, out_size: int) -> np.ndarray:
  """Rows of the bilinear resize (bilinear_resize_matrix) of a map that is zero outside rows
  [start, start + len(window)): (out_size, window.shape[1]). Uses the resize's two taps per output
  row instead of a matrix product (BLAS would thread these small products, slowly, on busy cores)."""
  i0, i1, w0, w1 = _resize_taps(in_size, out_size)
  rows = len(window)
  out = np.zeros((out_size, window.shape[1]), np.float32)
  for idx, w in ((i0, w0), (i1, w1)):
    local = idx - start
    keep = (local >= 0) & (local < rows) & (w != 0)
    out[keep] += w[keep, None] * window[local[keep]]
  return out
