"""Pictures: the cumulative error distribution (CED) of an evaluation, and landmarks / ambiguity
ellipses drawn on a photo.

Images are uint8 (H, W, 3) RGB; points are (x, y) 0-based image pixels; covariances are (2, 2) over
(x, y) in image pixels squared.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import cv2
import numpy as np

# cv2 draws with integer coordinates; `shift` fractional bits give sub-pixel placement (the official
# demo's draw_pts does the same with shift 4).
_SHIFT = 4
_ONE = 1 << _SHIFT

POINT_COLOR = (0, 255, 0)       # RGB
ELLIPSE_COLOR = (255, 200, 0)
BOX_COLOR = (255, 64, 64)


def _fixed(v: float) -> int:
  return int(round(float(v) * _ONE))


def _thickness(image: np.ndarray) -> int:
  """Line width that stays visible on big photos: about 1 px per 500 px of the shorter side."""
  return max(1, int(round(min(image.shape[:2]) / 500)))


def draw_box(image: np.ndarray, box: Sequence[float], color=BOX_COLOR) -> np.ndarray:
  """Draws a face box (x_min, y_min, x_max, y_max) on a copy of `image`."""
  out = np.ascontiguousarray(image).copy()
  x1, y1, x2, y2 = box
  cv2.rectangle(out, (_fixed(x1), _fixed(y1)), (_fixed(x2), _fixed(y2)), color, _thickness(out),
                cv2.LINE_AA, _SHIFT)
  return out


def draw_landmarks(image: np.ndarray, landmarks: np.ndarray, color=POINT_COLOR,
                   radius: float | None = None) -> np.ndarray:
  """Draws (N, 2) landmarks as filled anti-aliased dots on a copy of `image`.

  radius: dot radius in pixels (default: scaled with the face, 1/150 of the landmarks' extent, at least 1).
  """
  out = np.ascontiguousarray(image).copy()
  pts = np.asarray(landmarks, np.float64)
  if radius is None:
    extent = float(np.max(pts.max(0) - pts.min(0))) if len(pts) else 0.0
    radius = max(1.0, extent / 150.0)
  for x, y in pts:
    if np.isfinite(x) and np.isfinite(y):
      cv2.circle(out, (_fixed(x), _fixed(y)), _fixed(radius), color, -1, cv2.LINE_AA, _SHIFT)
  return out


def covariance_ellipse(cov: np.ndarray, n_std: float = 1.0) -> tuple[tuple[float, float], float]:
  """Semi-axes (a, b) in pixels (a >= b) and the angle of the major axis (degrees, from +x towards +y,
  as cv2.ellipse expects in image axes) of the `n_std` contour of a 2x2 covariance."""
  cov = np.asarray(cov, np.float64)
  cov = (cov + cov.T) / 2.0
  evalues, evectors = np.linalg.eigh(cov)          # ascending
  evalues = np.clip(evalues, 0.0, None)
  major = evectors[:, 1]
  angle = math.degrees(math.atan2(major[1], major[0]))
  return (n_std * math.sqrt(evalues[1]), n_std * math.sqrt(evalues[0])), angle


def draw_ellipses(image: np.ndarray, landmarks: np.ndarray, covariances: np.ndarray, n_std: float = 1.0,
                  color=ELLIPSE_COLOR) -> np.ndarray:
  """Draws each point's `n_std` covariance ellipse, centred on the point, on a copy of `image`.

  landmarks: (N, 2) image px; covariances: (N, 2, 2) image px^2. The long axis is the direction in
  which the model is least sure where the point lies (STAR's semantic ambiguity).
  """
  out = np.ascontiguousarray(image).copy()
  thickness = _thickness(out)
  for (x, y), cov in zip(np.asarray(landmarks, np.float64), np.asarray(covariances, np.float64)):
    if not (np.all(np.isfinite(cov)) and np.isfinite(x) and np.isfinite(y)):
      continue
    (a, b), angle = covariance_ellipse(cov, n_std)
    cv2.ellipse(out, (_fixed(x), _fixed(y)), (max(_fixed(a), 1), max(_fixed(b), 1)), angle, 0, 360, color,
                thickness, cv2.LINE_AA, _SHIFT)
  return out


def ced_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], threshold: float, path: str,
               title: str = 'Cumulative error distribution') -> None:
  """Writes a CED plot (PNG) of one or more curves.

  curves: label -> (xs, ys): NME thresholds (fractions of the normalising distance) and the fraction
    of images with NME at or below each (`metrics.ced`). Plotted in percent, up to `threshold`; the
    first curve (the whole split) is drawn in black.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top  (only the evaluation needs it)
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
  for k, (label, (xs, ys)) in enumerate(curves.items()):
    # The first curve (the whole split) in black and bolder, the subsets in colour.
    style = {'color': 'black', 'linewidth': 2.2} if k == 0 else {'linewidth': 1.3}
    ax.plot(np.asarray(xs) * 100.0, np.asarray(ys) * 100.0, label=label, **style)
  ax.set_xlim(0, threshold * 100.0)
  ax.set_ylim(0, 100)
  ax.set_xlabel('NME (%)')
  ax.set_ylabel('images (%)')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(loc='lower right', fontsize='small')
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)
