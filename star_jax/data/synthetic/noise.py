"""Annotation ambiguity of the synthetic faces: the training labels slide along the tangent of their
curve by a seeded Gaussian amount, largest on the contour and brows (where human annotators disagree
most); the test labels are exact. Coordinates: pixel (x, y) of the 98 WFLW points."""

from __future__ import annotations

import numpy as np

from star_jax import layouts


# Standard deviation of the tangential label noise per part, as a fraction of the inter-ocular
# distance at level 1: outline and brows are where annotators disagree most.
AMBIGUITY_FRACTION = {
    'contour': 0.04, 'brow': 0.03, 'nose_line': 0.02, 'nose_base': 0.01, 'eye': 0.01,
    'outer_lip': 0.015, 'inner_lip': 0.01, 'pupil': 0.0,
}
PART_SLICES = {
    'contour': slice(0, 33), 'brow': slice(33, 51), 'nose_line': slice(51, 55),
    'nose_base': slice(55, 60), 'eye': slice(60, 76), 'outer_lip': slice(76, 88),
    'inner_lip': slice(88, 96), 'pupil': slice(96, 98),
}
_NOISE_CLIP = 3.0  # truncate the Gaussian at this many standard deviations


def ambiguity_fractions() -> np.ndarray:
  """(98,) float: per-point noise standard deviation at level 1, as a fraction of the IOD."""
  f = np.zeros(98, np.float64)
  for part, sl in PART_SLICES.items():
    f[sl] = AMBIGUITY_FRACTION[part]
  return f


def curve_tangents(points: np.ndarray, layout: layouts.Layout = layouts.WFLW) -> np.ndarray:
  """Unit tangents (N, 2) of `points` (N, 2) along the layout's edges.

  The tangent at a point is the direction from its previous to its next neighbour on its edge
  (closed edges wrap around; an open edge's end points use their one neighbour). Points on no edge,
  or whose neighbours coincide, get a zero tangent. A point on several edges keeps its first one.
  """
  points = np.asarray(points, np.float64)
  t = np.zeros_like(points)
  done = np.zeros(len(points), bool)
  for closed, idx in layout.edges:
    idx = np.asarray(idx)
    p = points[idx]
    if closed:
      d = np.roll(p, -1, axis=0) - np.roll(p, 1, axis=0)
    else:
      nxt = np.concatenate([p[1:], p[-1:]])
      prv = np.concatenate([p[:1], p[:-1]])
      d = nxt - prv
    norm = np.linalg.norm(d, axis=-1, keepdims=True)
    d = np.where(norm > 1e-9, d / np.maximum(norm, 1e-12), 0.0)
    new = ~done[idx]
    t[idx[new]] = d[new]
    done[idx] = True
  return t


def inter_ocular(points98: np.ndarray) -> float:
  """Distance between the outer eye corners (WFLW 60 and 72), in the units of `points98`."""
  return float(np.linalg.norm(points98[60] - points98[72]))


def _room(points: np.ndarray, dirs: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """(N,) largest t >= 0 with lo <= points + t * dirs <= hi in both coordinates (inf if unbounded)."""
  with np.errstate(divide='ignore', invalid='ignore'):
    limit = np.where(dirs > 0, (hi - points) / dirs, np.where(dirs < 0, (lo - points) / dirs, np.inf))
  return np.maximum(limit.min(-1), 0.0)


def tangential_noise(clean98: np.ndarray, z: np.ndarray, level: float,
                     image_size: int | None = None) -> np.ndarray:
  """The annotated labels: `clean98` (98, 2) moved along their tangents.

  Args:
    clean98: exact points, pixels.
    z: (98,) standard-normal draws (one per point; the caller's seeded stream).
    level: ambiguity level (0 = exact labels); the displacement is linear in it.
    image_size: if given, shorten a displacement that would leave [0, image_size - 1] (still along
      the tangent) so labels stay inside the image.

  Returns:
    (98, 2) float64 points with (noisy - clean) parallel to `curve_tangents(clean98)`.
  """
  tangent = curve_tangents(clean98, layouts.WFLW)
  sigma = level * ambiguity_fractions() * inter_ocular(clean98)
  amount = sigma * np.clip(z, -_NOISE_CLIP, _NOISE_CLIP)
  if image_size is not None:
    # Shorten steps that would leave the image (why: labels must stay valid targets); the moved
    # point stays on the tangent line.
    fwd = _room(clean98, tangent, 0.0, image_size - 1.0)
    back = _room(clean98, -tangent, 0.0, image_size - 1.0)
    amount = np.clip(amount, -back, fwd)
  return clean98 + amount[:, None] * tangent

