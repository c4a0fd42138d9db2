"""Drawing on images: face boxes, landmarks (one colour, or one per face part) and the ambiguity
ellipses of predicted covariances, and tiling images into a contact sheet.

Images are uint8 (H, W, 3) RGB; points are (x, y) 0-based image pixels; covariances are (2, 2) over
(x, y) in image pixels squared.
"""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

# cv2 draws with integer coordinates; `shift` fractional bits give sub-pixel placement (the official
# demo's draw_pts does the same with shift 4).
_SHIFT = 4
_ONE = 1 << _SHIFT

POINT_COLOR = (0, 255, 0)       # RGB
ELLIPSE_COLOR = (255, 200, 0)
BOX_COLOR = (255, 64, 64)
# One colour per face part (edge) of a layout, in edge order: contour, brows, nose, eyes, lips.
PART_COLORS = ((255, 60, 60), (255, 200, 0), (255, 200, 0), (0, 220, 255), (0, 220, 255),
               (60, 255, 60), (60, 255, 60), (255, 0, 255), (255, 120, 255))


def _fixed(v: float) -> int:
  return int(round(float(v) * _ONE))


def _thickness(image: np.ndarray) -> int:
  """Line width that stays visible on big photos: about 1 px per 500 px of the shorter side."""
  return max(1, int(round(min(image.shape[:2]) / 500)))


def _canvas(image: np.ndarray, inplace: bool) -> np.ndarray:
  """`image` itself to draw on in place (a contiguous writable array), else a copy of it."""
  if inplace:
    if not (image.flags.c_contiguous and image.flags.writeable):
      raise ValueError('drawing in place needs a contiguous, writable image')
    return image
  return np.ascontiguousarray(image).copy()


def draw_box(image: np.ndarray, box: Sequence[float], color=BOX_COLOR, *, inplace: bool = False) -> np.ndarray:
  """Draws a face box (x_min, y_min, x_max, y_max) on a copy of `image` (on `image` itself with
  `inplace`: no copy of a large photo per drawing)."""
  out = _canvas(image, inplace)
  x1, y1, x2, y2 = box
  cv2.rectangle(out, (_fixed(x1), _fixed(y1)), (_fixed(x2), _fixed(y2)), color, _thickness(out),
                cv2.LINE_AA, _SHIFT)
  return out


def part_colors(layout) -> np.ndarray:
  """(N, 3) RGB colours of a layout's points: one per edge (face part), white for points on no edge."""
  colors = np.full((layout.num_points, 3), 255, np.int32)
  for e, (_, indices) in enumerate(layout.edges):
    colors[list(indices)] = PART_COLORS[e % len(PART_COLORS)]
  return colors


def draw_landmarks(image: np.ndarray, landmarks: np.ndarray, color=POINT_COLOR,
                   radius: float | None = None, origins: np.ndarray | None = None, *,
                   inplace: bool = False) -> np.ndarray:
  """Draws (N, 2) landmarks as filled anti-aliased dots on a copy of `image` (`inplace`: on it).

  color: one RGB colour, or (N, 3) colours, one per point (e.g. `part_colors(layout)`).
  radius: dot radius in pixels (default: scaled with the face, 1/150 of the landmarks' extent, at least 1).
  origins: optional (N, 2) points each dot is joined to by a thin white line (e.g. the exact points
    that noisy labels were drawn from).
  """
  out = _canvas(image, inplace)
  pts = np.asarray(landmarks, np.float64)
  colors = np.broadcast_to(np.asarray(color), (len(pts), 3))
  if radius is None:
    extent = float(np.max(pts.max(0) - pts.min(0))) if len(pts) else 0.0
    radius = max(1.0, extent / 150.0)
  for i, (x, y) in enumerate(pts):
    if not (np.isfinite(x) and np.isfinite(y)):
      continue
    if origins is not None:
      ox, oy = origins[i]
      cv2.line(out, (_fixed(ox), _fixed(oy)), (_fixed(x), _fixed(y)), (255, 255, 255), 1, cv2.LINE_AA, _SHIFT)
    cv2.circle(out, (_fixed(x), _fixed(y)), _fixed(radius), tuple(int(c) for c in colors[i]), -1,
               cv2.LINE_AA, _SHIFT)
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
                  color=ELLIPSE_COLOR, *, inplace: bool = False) -> np.ndarray:
  """Draws each point's `n_std` covariance ellipse, centred on the point, on a copy of `image`
  (`inplace`: on it).

  landmarks: (N, 2) image px; covariances: (N, 2, 2) image px^2. The long axis is the direction in
  which the model is least sure where the point lies (STAR's semantic ambiguity).
  """
  out = _canvas(image, inplace)
  thickness = _thickness(out)
  for (x, y), cov in zip(np.asarray(landmarks, np.float64), np.asarray(covariances, np.float64)):
    if not (np.all(np.isfinite(cov)) and np.isfinite(x) and np.isfinite(y)):
      continue
    (a, b), angle = covariance_ellipse(cov, n_std)
    cv2.ellipse(out, (_fixed(x), _fixed(y)), (max(_fixed(a), 1), max(_fixed(b), 1)), angle, 0, 360, color,
                thickness, cv2.LINE_AA, _SHIFT)
  return out


def contact_sheet(images: list[np.ndarray], columns: int = 4) -> np.ndarray:
  """Tiles equally sized RGB images into one (rows x columns) image, row by row."""
  h, w = images[0].shape[:2]
  rows = -(-len(images) // columns)
  sheet = np.zeros((rows * h, columns * w, 3), np.uint8)
  for i, im in enumerate(images):
    r, c = divmod(i, columns)
    sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
  return sheet
