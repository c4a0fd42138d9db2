"""Scoring a cell on the exact-label test split: NME overall, on the ambiguous points (contour and
brows) and on the others, and the predicted covariance of every point against the true tangent of its
curve (the paper's premise: ambiguity shows up as an anisotropic distribution whose main axis follows
the ambiguous direction), and the error along and across that tangent.

NMEs are fractions of the inter-ocular distance (outer eye corners), in the official crop frame.
"""

from __future__ import annotations

import math
import pathlib
import warnings

import jax
import numpy as np

from star_jax import checkpoints
from star_jax import layouts
from star_jax import mesh as mesh_lib
from star_jax import models
from star_jax.data import build
from star_jax.data import pipeline
from star_jax.data import synthetic
from star_jax.evaluation import scoring

# Points whose level-1 noise is at least this fraction of the IOD: the face contour (0.04) and the
# brows (0.03), where the synthetic annotators (like real ones) are most ambiguous.
AMBIGUOUS_FRACTION = 0.03
# Point groups of the covariance and part tables (WFLW indices); 'others' is every point outside the
# contour and brows. Points without a tangent (the pupils) have no axis to compare.
GROUPS = {'contour': range(0, 33), 'brows': range(33, 51), 'others': range(51, 98)}
PARTS = {'contour': range(0, 33), 'brows': range(33, 51), 'nose': range(51, 60),
         'eyes': [*range(60, 76), 96, 97], 'mouth': range(76, 96)}
ANGLE_BINS = np.linspace(0.0, 90.0, 10)   # 10-degree bins of the axis-to-tangent angle
ALIGNED_DEGREES = 30.0                    # an axis within this of the tangent "follows" it


def finite(x) -> float | None:
  """x as a float, None when it is NaN or infinite (JSON has neither)."""
  x = float(x)
  return x if math.isfinite(x) else None


def ambiguous_points() -> np.ndarray:
  """(98,) bool: the points with the largest label noise (contour and brows)."""
  return synthetic.ambiguity_fractions() >= AMBIGUOUS_FRACTION


def _point_errors(pred: np.ndarray, gt: np.ndarray, layout: layouts.Layout) -> np.ndarray:
  left, right = layout.norm_indices('ocular')
  iod = np.linalg.norm(gt[:, left] - gt[:, right], axis=-1)                 # (M,)
  return np.linalg.norm(pred - gt, axis=-1) / iod[:, None]                  # (M, N)


def part_nmes(pred: np.ndarray, gt: np.ndarray, layout: layouts.Layout) -> dict[str, float]:
  """Mean error of the ambiguous points (contour, brows) and of the others, over images, / IOD; and
  of each part (`PARTS`, as 'nme_<part>').

  pred, gt: (M, 98, 2) in one frame (the normalised crop here); the IOD is the ground truth's.
  """
  err = _point_errors(pred, gt, layout)
  mask = ambiguous_points()
  out = {'nme_ambiguous': float(err[:, mask].mean()), 'nme_other': float(err[:, ~mask].mean())}
  out.update({f'nme_{part}': float(err[:, list(idx)].mean()) for part, idx in PARTS.items()})
  return out


def _tangents(gt_px: np.ndarray, layout: layouts.Layout) -> tuple[np.ndarray, np.ndarray]:
  """(M, N, 2) unit tangents of the exact points `gt_px` (M, N, 2) along their curves, and (M, N) bool:
  which points have one (the pupils have none)."""
  tangents = np.stack([synthetic.curve_tangents(p, layout) for p in np.asarray(gt_px, np.float64)])
  return tangents, np.linalg.norm(tangents, axis=-1) > 0.5


def axis_statistics(cov: np.ndarray, gt: np.ndarray, gt_px: np.ndarray, layout: layouts.Layout) -> dict:
  """How each point's predicted covariance lines up with the true tangent of its curve.

  Args:
    cov: (M, 98, 2, 2) predicted covariances in the normalised crop frame (x right, y down).
    gt: (M, 98, 2) exact points in that frame (for the IOD).
    gt_px: (M, 98, 2) exact points in image pixels (for the tangents: the eval crop is a scale and a
      translation, no rotation, so directions, and angles, are the same in both frames).
  Returns:
    {'groups': {group: stats}, 'points': {'angle_median', 'anisotropy_median': (98,) lists (None
    where a point has no tangent)}}. stats: 'angle_median', 'angle_mean' (degrees in [0, 90] between
    the principal axis, the eigenvector of the larger eigenvalue, and the tangent; an axis has no
    direction), 'aligned' (fraction within ALIGNED_DEGREES), 'angle_hist' (fractions in the 10-degree
    `ANGLE_BINS`), 'anisotropy_median' (larger / smaller eigenvalue), 'std_major' / 'std_minor'
    (medians of the square-rooted eigenvalues, / IOD), 'count'.
  """
  cov = np.asarray(cov, np.float64)
  cov = 0.5 * (cov + np.swapaxes(cov, -1, -2))
  evalues, evectors = np.linalg.eigh(cov)                                   # ascending
  major = evectors[..., :, 1]                                               # (M, N, 2)
  tangents, valid = _tangents(gt_px, layout)
  cosine = np.clip(np.abs((major * tangents).sum(-1)), 0.0, 1.0)
  angle = np.degrees(np.arccos(cosine))
  small = np.maximum(evalues[..., 0], 1e-12)
  anisotropy = np.maximum(evalues[..., 1], 1e-12) / small
  left, right = layout.norm_indices('ocular')
  iod = np.linalg.norm(gt[:, left] - gt[:, right], axis=-1)[:, None]
  std_major = np.sqrt(np.maximum(evalues[..., 1], 0.0)) / iod
  std_minor = np.sqrt(np.maximum(evalues[..., 0], 0.0)) / iod

  groups = {}
  for name, idx in GROUPS.items():
    idx = list(idx)
    ok = valid[:, idx]
    if not ok.any():
      continue
    a = angle[:, idx][ok]
    hist, _ = np.histogram(a, bins=ANGLE_BINS)
    groups[name] = {
        'angle_median': float(np.median(a)), 'angle_mean': float(a.mean()),
        'aligned': float((a <= ALIGNED_DEGREES).mean()), 'angle_hist': (hist / hist.sum()).tolist(),
        'anisotropy_median': float(np.median(anisotropy[:, idx][ok])),
        'std_major': float(np.median(std_major[:, idx][ok])), 'std_minor': float(np.median(std_minor[:, idx][ok])),
        'count': int(ok.sum())}
  with warnings.catch_warnings():   # a point without a tangent (the pupils) has no angle: NaN -> None
    warnings.simplefilter('ignore', RuntimeWarning)
    point_angle = np.nanmedian(np.where(valid, angle, np.nan), axis=0)
    point_aniso = np.nanmedian(np.where(valid, anisotropy, np.nan), axis=0)
  points = {'angle_median': [finite(v) for v in point_angle],
            'anisotropy_median': [finite(v) for v in point_aniso]}
  return {'groups': groups, 'points': points}


def error_split(pred: np.ndarray, gt: np.ndarray, gt_px: np.ndarray, layout: layouts.Layout) -> dict:
  """The test error of each point split along and across the true tangent of its curve.

  Args:
    pred, gt: (M, 98, 2) predicted and exact points in one frame (the normalised crop); the IOD is gt's.
    gt_px: (M, 98, 2) exact points in image pixels, for the tangents (the crop is a scale and a
      translation, so directions are the same in both frames).
  Returns:
    {group: {'tangential', 'normal'}}: per `GROUPS` group, the mean over faces and points with a tangent
    of |error . tangent| and |error . normal|, / IOD (as NME fractions); 'count' points.
  """
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  tangents, valid = _tangents(gt_px, layout)
  normals = np.stack([-tangents[..., 1], tangents[..., 0]], axis=-1)
  left, right = layout.norm_indices('ocular')
  iod = np.linalg.norm(gt[:, left] - gt[:, right], axis=-1)[:, None]
  err = pred - gt
  along = np.abs((err * tangents).sum(-1)) / iod
  across = np.abs((err * normals).sum(-1)) / iod
  out = {}
  for name, idx in GROUPS.items():
    ok = valid[:, list(idx)]
    if ok.any():
      out[name] = {'tangential': float(along[:, list(idx)][ok].mean()),
                   'normal': float(across[:, list(idx)][ok].mean()), 'count': int(ok.sum())}
  return out


def score_checkpoint(workdir: pathlib.Path, config) -> dict:
  """NME, FR, AUC, the image-frame NME, the part NMEs and the covariance statistics
  (`axis_statistics`) of a cell's final weights on the test split."""
  layout = layouts.get_layout(config.layout)
  loaded = checkpoints.load_model(workdir, weights='model')
  graph, params, batch_stats = models.split(loaded.model)
  predict = jax.jit(models.make_predict_fn(graph, decode=config.model.decode, covariances=True))
  mesh = mesh_lib.make_mesh()
  source = build.load_source(config.data, config.data.test_split, layout=config.layout)
  covariances = []

  def predict_fn(images):
    out = predict(params, batch_stats, images)
    covariances.append(mesh_lib.gather(out['covariances']))
    return out

  with jax.set_mesh(mesh):
    results = scoring.predict_split(predict_fn, pipeline.eval_batches(config, source), mesh,
                                    int(config.data.image_size))
  # Evaluation batches hold the split in order with the padding at the end (predict_split keeps the
  # valid rows in index order), so the first M covariances are the M test faces'.
  cov = np.concatenate(covariances)[:len(results['pred'])]
  if not np.array_equal(results['index'], np.arange(len(cov))):
    raise RuntimeError('the evaluation batches are not in split order; cannot match covariances to faces')
  summary = scoring.score(results, layout)
  parts = part_nmes(results['pred'], results['gt'], layout)
  return {'nme': finite(summary['nme']), **{k: finite(v) for k, v in parts.items()},
          'fr': finite(summary['fr']), 'auc': finite(summary['auc']), 'nme_image': finite(summary['nme_image']),
          'covariance': axis_statistics(cov, results['gt'], results['gt_px'], layout),
          'error_split': error_split(results['pred'], results['gt'], results['gt_px'], layout)}
