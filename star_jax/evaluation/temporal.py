"""Temporal stability of landmarks on video (300VW): how much the error changes from frame to frame.

A tracker can have a low NME and still jitter. Per video, over pairs of consecutive annotated frames
(frame numbers t - 1, t):
  nme_change  mean |NME_t - NME_{t-1}|: how much the size of the error changes;
  jitter      mean over points of |e_t - e_{t-1}| / d_t, with e the error vector (prediction minus
              ground truth, in frame pixels) and d_t the normalising distance of frame t: how much the
              prediction moves that the face did not. 0 for a prediction that follows the annotation
              with a constant offset.
Both are fractions like the NME (the tables show them in percent). Summaries average over videos, so
that each video counts once whatever its length.
"""

from __future__ import annotations

import numpy as np

from star_jax import metrics
from star_jax.layouts import Layout


def _norm_distance(gt: np.ndarray, layout: Layout, norm: str | None) -> np.ndarray:
  left, right = layout.norm_indices(norm)

  def point(index):
    return gt[:, index] if isinstance(index, (int, np.integer)) else gt[:, list(index)].mean(axis=1)
  return np.linalg.norm(point(left) - point(right), axis=-1)


def per_video(pred, gt, videos, frames, layout: Layout, norm: str | None = None,
              attributes: np.ndarray | None = None) -> list[dict]:
  """One row per video, in order of first appearance: 'video', 'subset' (the attribute flagged for
  its first frame, e.g. 'category3', or ''), 'frames', 'pairs' (consecutive frame pairs), 'nme',
  'nme_change', 'jitter' (fractions; NaN without pairs).

  Args:
    pred, gt: (M, N, 2) landmarks in frame pixels (any unit common to a video's frames).
    videos: (M,) video names. frames: (M,) frame numbers.
    layout, norm: for the normalising distance.
    attributes: optional (M, K) 0/1 flags in layout.attributes order.
  """
  pred, gt = np.asarray(pred, np.float64), np.asarray(gt, np.float64)
  videos = np.asarray([str(v) for v in videos])
  frames = np.asarray(frames, np.int64)
  nmes = metrics.nme_per_image(pred, gt, layout, norm, dtype=np.float64)
  distance = _norm_distance(gt, layout, norm)
  rows = []
  for video in dict.fromkeys(videos.tolist()):
    idx = np.flatnonzero(videos == video)
    idx = idx[np.argsort(frames[idx], kind='stable')]
    pairs = np.flatnonzero(np.diff(frames[idx]) == 1)
    before, after = idx[pairs], idx[pairs + 1]
    if len(pairs):
      change = float(np.mean(np.abs(nmes[after] - nmes[before])))
      moved = (pred[after] - gt[after]) - (pred[before] - gt[before])
      jitter = float(np.mean(np.linalg.norm(moved, axis=-1).mean(axis=1) / distance[after]))
    else:
      change = jitter = float('nan')
    subset = ''
    if attributes is not None and np.size(attributes):
      flagged = [name for k, name in enumerate(layout.attributes[:attributes.shape[1]]) if attributes[idx[0], k] == 1]
      subset = flagged[0] if flagged else ''
    rows.append({'video': video, 'subset': subset, 'frames': int(len(idx)), 'pairs': int(len(pairs)),
                 'nme': float(nmes[idx].mean()), 'nme_change': change, 'jitter': jitter})
  return rows


def summarize(rows: list[dict], all_name: str = 'all') -> list[dict]:
  """Means over videos, of all of them and of each subset: 'subset', 'videos', 'frames', 'nme',
  'nme_change', 'jitter' (videos without frame pairs left out of the two stability means)."""
  groups = {all_name: rows}
  for row in rows:
    if row['subset']:
      groups.setdefault(row['subset'], []).append(row)
  out = []
  for name, members in groups.items():
    def mean(key, members=members):
      values = [m[key] for m in members if np.isfinite(m[key])]
      return float(np.mean(values)) if values else float('nan')
    out.append({'subset': name, 'videos': len(members), 'frames': int(sum(m['frames'] for m in members)),
                'nme': mean('nme'), 'nme_change': mean('nme_change'), 'jitter': mean('jitter')})
  return out
