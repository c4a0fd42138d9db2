"""Annotation ambiguity of the synthetic faces: the training labels slide along the tangent of their
curve by a seeded Gaussian amount, largest on the contour and brows (where human annotators disagree
most); the test labels are exact. Coordinates: pixel (x, y) of the 98 WFLW points.

Two models of how the slide is drawn (`RELABEL_MODELS`), both in units of the per-point standard
deviation `level x AMBIGUITY_FRACTION[part] x IOD` (`tangential_noise`):
  * 'independent': every label of every face draws its own standard-normal amount (the builder's).
  * 'annotators': a pool of simulated annotators, each with a consistent habit (a fixed amount per
    point, the same on every face they label: `annotator_biases`) plus their own random error; each
    training face is labelled by one of them (`annotator_noise`). The habits are smooth along each
    curve, mirror-symmetric (a horizontal flip of a labelled face is labelled by the same habit) and
    centred over the pool (the pool's consensus is the exact point), with unit variance per point,
    so both models give every label the same spread at a level.
"""

from __future__ import annotations

import functools

import numpy as np

from star_jax import layouts
from star_jax.data.synthetic.params import neutral_params
from star_jax.data.synthetic.render import render


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



# ------------------------------------------------------------------------------------------------
# Simulated annotators
# ------------------------------------------------------------------------------------------------

RELABEL_MODELS = ('independent', 'annotators')
# Share of the label variance that is the annotator's habit (the rest is their random error).
# Assumed: most disagreement between annotators is systematic (each places a contour point a little
# higher or lower than the others, on every face), not a fresh random error per face.
ANNOTATOR_BIAS_SHARE = 0.75
# Correlation length of a habit along its curve, in points (neighbours are placed alike).
ANNOTATOR_SMOOTHING = 2.0
# Mixed into the habits' seed, so that they are a stream of their own (not a sample's).
_ANNOTATOR_STREAM = 0x5A4E


@functools.lru_cache(maxsize=None)
def flip_signs() -> np.ndarray:
  """(98,) +1 / -1 / 0: how a horizontal flip maps tangents. Point i's mirrored tangent is
  `flip_signs()[i]` times the tangent of its flip partner, on a frontal face (0: no tangent)."""
  # A frontal face with an open mouth: its inner lip corners have two distinct neighbours.
  points = render(neutral_params(mouth_open=0.5), 256).points
  tangent = curve_tangents(points, layouts.WFLW)
  perm = layouts.WFLW.flip_permutation()
  dots = (tangent * np.array([-1.0, 1.0]) * tangent[perm]).sum(-1)
  return np.where(np.abs(dots) > 0.5, np.sign(dots), 0.0)


@functools.lru_cache(maxsize=None)
def _habit_map(smoothing: float) -> np.ndarray:
  """(98, 98) A: habit = A @ e for standard-normal e (98,) is smooth along each curve (Gaussian
  kernel over the index, `smoothing` points), mirror-symmetric, and of unit variance per point
  (zero where symmetry forbids a habit: a self-mirrored point with a horizontal tangent, the
  chin; and points without a tangent, the pupils)."""
  n = 98
  smooth = np.eye(n)
  if smoothing > 0:
    done = np.zeros(n, bool)
    for closed, idx in layouts.WFLW.edges:   # a point on several edges keeps its first, as curve_tangents
      idx = np.asarray(idx)
      k = np.arange(len(idx))
      d = np.abs(k[:, None] - k[None, :])
      if closed:
        d = np.minimum(d, len(idx) - d)
      kernel = np.exp(-0.5 * (d / smoothing) ** 2)
      rows = idx[~done[idx]]
      smooth[np.ix_(rows, idx)] = kernel[~done[idx]]
      done[idx] = True
  # Symmetrise: a flip moves the label of point i to its partner p(i) with the amount times s_i, so a
  # mirror-invariant habit has b[p(i)] = s_i b[i]; (b + F b) / 2 with (F b)[j] = s_j b[p(j)] is one.
  perm = layouts.WFLW.flip_permutation()
  flip = np.zeros((n, n))
  flip[np.arange(n), perm] = flip_signs()
  a = 0.5 * (np.eye(n) + flip) @ smooth
  a[flip_signs() == 0] = 0.0
  norm = np.linalg.norm(a, axis=1, keepdims=True)
  return np.where(norm > 1e-9, a / np.maximum(norm, 1e-12), 0.0)


def annotator_biases(seed: int, num_annotators: int, smoothing: float = ANNOTATOR_SMOOTHING) -> np.ndarray:
  """(K, 98) the habits of a pool of K >= 2 annotators, in standard deviations of the label noise.

  Deterministic in (seed, K, smoothing). Each row is smooth along the curves and mirror-symmetric
  (`_habit_map`); the rows are centred (their mean over the pool is exactly 0: the annotators'
  consensus is the exact point, as a benchmark's test labels are the same annotators' consensus)
  and scaled by sqrt(K / (K - 1)), which keeps each point's variance over the draw of the pool at 1.
  """
  k = int(num_annotators)
  if k < 2:
    raise ValueError(f'the annotator model needs at least 2 annotators, got {num_annotators}')
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), _ANNOTATOR_STREAM, k]))
  habits = rng.standard_normal((k, 98)) @ _habit_map(float(smoothing)).T
  return (habits - habits.mean(0)) * np.sqrt(k / (k - 1))


def annotator_noise(biases: np.ndarray, annotator: int, z: np.ndarray,
                    bias_share: float = ANNOTATOR_BIAS_SHARE) -> np.ndarray:
  """(98,) standard-normal-scale amounts of one face labelled by `annotator`: the habit plus the
  face's own draws `z` (98,), weighted so the variance stays 1: sqrt(share) b + sqrt(1 - share) z.
  Pass it to `tangential_noise` as its `z`."""
  if not 0.0 <= bias_share <= 1.0:
    raise ValueError(f'the annotators\' bias share must be in [0, 1], got {bias_share}')
  return np.sqrt(bias_share) * biases[int(annotator)] + np.sqrt(1.0 - bias_share) * np.asarray(z, np.float64)
