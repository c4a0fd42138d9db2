"""Evaluation metrics of face alignment: NME, failure rate, AUC and the CED curve (numpy).

Follows the official STAR code (lib/metric/nme.py, lib/metric/fr_and_auc.py). Landmarks are (x, y) in
any common unit (pixels of the original image in the official evaluation); NME is scale-free.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import integrate

from star_jax.layouts import Layout


def _norm_point(landmarks: np.ndarray, index) -> np.ndarray:
  """(M, 2): landmarks[:, index], or the mean of several points when `index` is a sequence."""
  if isinstance(index, (int, np.integer)):
    return landmarks[:, index]
  return landmarks[:, list(index)].mean(axis=1)


def nme_per_image(pred, gt, layout: Layout, norm: str | None = None, dtype=None) -> np.ndarray:
  """Normalised mean error of each image: mean point-to-point distance / normalising distance.

  The normalising distance is between two ground-truth points (or point-group means) given by
  `layout.norm_indices(norm)`: the outer eye corners for 'ocular', the pupils (or the eye centres for
  300W) for 'pupil'.

  Args:
    pred, gt: (M, N, 2) predicted and ground-truth landmarks, N = layout.num_points.
    layout: the dataset's landmark layout.
    norm: 'ocular' / 'pupil' / None (the layout's default).
    dtype: arithmetic precision. None computes in the inputs' own precision (float32 for float32
      landmarks: the official code evaluates the network's float32 tensors in float32, and this is what
      reproduces its numbers to the last bit); pass np.float64 for double precision.
  Returns:
    (M,) float64 NMEs (a fraction, not a percentage).
  """
  pred, gt = np.asarray(pred), np.asarray(gt)
  if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
    raise ValueError(f'nme_per_image: pred and gt must both be (images, points, 2), got {pred.shape} and {gt.shape}')
  if gt.shape[1] != layout.num_points:
    raise ValueError(f'nme_per_image: {layout.name} has {layout.num_points} points, the landmarks have {gt.shape[1]}')
  if dtype is None:
    dtype = np.result_type(pred.dtype, gt.dtype, np.float32)
  pred, gt = pred.astype(dtype, copy=False), gt.astype(dtype, copy=False)
  left, right = layout.norm_indices(norm)
  norm_distance = np.linalg.norm(_norm_point(gt, left) - _norm_point(gt, right), axis=-1)    # (M,)
  errors = np.linalg.norm(pred - gt, axis=-1)                                               # (M, N)
  return (errors / norm_distance[:, None]).mean(axis=1).astype(np.float64)


def ced(nmes, threshold: float, step: float = 1e-4):
  """Cumulative error distribution: the fraction of images with NME <= x, for x on a grid.

  The grid is the official one, np.arange(0, threshold + step, step); note that floating-point
  arange can end one step past `threshold` (it does for 0.05).

  Returns:
    (xs, ys), two float64 arrays of the grid's length.
  """
  nmes = np.asarray(nmes, np.float64).ravel()
  if nmes.size == 0:
    raise ValueError('ced: no NMEs given')
  xs = np.arange(0, threshold + step, step)
  # searchsorted on the sorted NMEs counts nmes <= x exactly as the official count_nonzero loop (NaN
  # sorts last and is never counted, as NaN <= x is False).
  ys = np.searchsorted(np.sort(nmes), xs, side='right') / float(nmes.size)
  return xs, ys


def fr_auc(nmes, threshold: float, step: float = 1e-4):
  """Failure rate and area under the CED curve, as the official FR_AUC.test.

  FR = 1 - CED at the grid's last point; AUC = Simpson's rule of the CED over the grid, divided by
  `threshold`. Rounded as the official code does: FR to 4 and AUC to 6 decimals. Simpson's rule is
  scipy's (>= 1.11); for an even number of grid points (threshold 0.05) its last interval uses
  Cartwright's correction, which is what reproduces the reference numbers (older scipy `simps`
  averaged two trapezoid-ended variants instead, off by ~1e-5 there).

  Returns:
    (fr, auc) as Python floats, fractions in [0, 1].
  """
  xs, ys = ced(nmes, threshold, step)
  fr = 1.0 - ys[-1]
  auc = integrate.simpson(ys, x=xs) / threshold
  return round(float(fr), 4), round(float(auc), 6)


def _subset_flags(attributes, layout: Layout, num_images: int) -> dict[str, np.ndarray]:
  """Normalises `attributes` (a name -> (M,) mapping, or an (M, A) array in layout.attributes order)."""
  if isinstance(attributes, Mapping):
    unknown = sorted(set(attributes) - set(layout.attributes))
    if unknown:
      raise ValueError(f'summarize: {layout.name} has no attribute(s) {unknown}; it has {list(layout.attributes)}')
    flags = {name: np.asarray(attributes[name]) for name in layout.attributes if name in attributes}
  else:
    array = np.asarray(attributes)
    if array.ndim == 2 and array.shape[1] == 0:
      return {}  # a dataset that records no attribute flags (your own data): no subsets
    if array.ndim != 2 or array.shape[1] != len(layout.attributes):
      raise ValueError(f'summarize: attributes must be (images, {len(layout.attributes)}) for {layout.name} '
                       f'({list(layout.attributes)}), got shape {array.shape}')
    flags = {name: array[:, i] for i, name in enumerate(layout.attributes)}
  for name, flag in flags.items():
    if flag.shape != (num_images,):
      raise ValueError(f'summarize: attribute {name!r} has shape {flag.shape}, expected ({num_images},)')
  return {name: flag.astype(bool) if flag.dtype == bool else flag == 1 for name, flag in flags.items()}


def _scores(nmes: np.ndarray, threshold: float) -> dict[str, float]:
  if nmes.size == 0:
    return {'nme': float('nan'), 'fr': float('nan'), 'auc': float('nan'), 'count': 0}
  fr, auc = fr_auc(nmes, threshold)
  return {'nme': float(nmes.mean()), 'fr': fr, 'auc': auc, 'count': int(nmes.size)}


def summarize(pred, gt, layout: Layout, norm: str | None = None,
              attributes: Mapping[str, Sequence[int]] | np.ndarray | None = None) -> dict[str, float]:
  """NME, FR and AUC over all images and over each attribute subset, in one flat dict.

  Args:
    pred, gt: (M, N, 2) landmarks.
    layout: the dataset's layout; its `threshold` is used for FR / AUC.
    norm: 'ocular' / 'pupil' / None (the layout's default).
    attributes: optional per-image 0/1 flags, either {name: (M,)} with names from layout.attributes or
      an (M, len(layout.attributes)) array in that order. A subset is the images whose flag is 1. An
      (M, 0) array (a dataset without flags) gives no subsets.
  Returns:
    {'nme', 'fr', 'auc', 'count'} for all images and '<attribute>/<key>' for each subset (NaN
    scores for an empty subset); NME, FR and AUC are fractions (x100 for the usual percentages).
  """
  nmes = nme_per_image(pred, gt, layout, norm)
  out = _scores(nmes, layout.threshold)
  if attributes is not None:
    for name, flag in _subset_flags(attributes, layout, nmes.size).items():
      for key, value in _scores(nmes[flag], layout.threshold).items():
        out[f'{name}/{key}'] = value
  return out
