"""Offline face detection for `star_jax.predict` (the crop of a face box is `star_jax.data.crop.box_rule`).

The detector is OpenCV's frontal-face Haar cascade, which ships inside the opencv-python(-headless)
wheel (`cv2.data.haarcascades`), so prediction needs no download and no extra package. It is a weak
detector (frontal, upright faces; misses tilted or profile faces and small faces in large scenes):
pass `--box` to the predict command when it fails.

Boxes are (x_min, y_min, x_max, y_max) in 0-based image pixels, float.
"""

from __future__ import annotations

import dataclasses
import os

import cv2
import numpy as np

CASCADE = 'haarcascade_frontalface_default.xml'


@dataclasses.dataclass(frozen=True)
class Face:
  """One detected (or given) face.

  box: (x_min, y_min, x_max, y_max) image pixels.
  score: the cascade's confidence (its last-stage weight; only comparable within one image), or
    None for a box given by the user.
  """
  box: tuple[float, float, float, float]
  score: float | None = None

  @property
  def area(self) -> float:
    x1, y1, x2, y2 = self.box
    return max(x2 - x1, 0.0) * max(y2 - y1, 0.0)


def parse_box(text: str) -> tuple[float, float, float, float]:
  """Parses 'x1,y1,x2,y2' (image pixels) into a valid box; a clear ValueError otherwise."""
  parts = [p for p in str(text).replace(' ', '').split(',') if p]
  try:
    values = tuple(float(p) for p in parts)
  except ValueError:
    values = ()
  if len(values) != 4 or not all(np.isfinite(values)):
    raise ValueError(f'--box must be four numbers x1,y1,x2,y2 (image pixels), got {text!r}')
  x1, y1, x2, y2 = values
  if not (x2 > x1 and y2 > y1):
    raise ValueError(f'--box {text!r}: need x2 > x1 and y2 > y1')
  return values


class HaarFaceDetector:
  """OpenCV's frontal-face Haar cascade.

  Args:
    cascade: file name inside `cv2.data.haarcascades`, or a path to a cascade XML.
    scale_factor, min_neighbors: `detectMultiScale` settings (OpenCV's usual 1.1 and 5).
    min_size_fraction: smallest face side searched, as a fraction of the image's shorter side
      (at least 24 px, the cascade's window), so big photos are not scanned at tiny scales.
  """

  def __init__(self, cascade: str = CASCADE, scale_factor: float = 1.1, min_neighbors: int = 5,
               min_size_fraction: float = 0.04):
    path = cascade if os.path.isfile(cascade) else os.path.join(cv2.data.haarcascades, cascade)
    self._classifier = cv2.CascadeClassifier(path)
    if self._classifier.empty():
      raise FileNotFoundError(f'cannot load the OpenCV face cascade {path!r} (is opencv-python-headless '
                              'installed with its data files?)')
    self.scale_factor = scale_factor
    self.min_neighbors = min_neighbors
    self.min_size_fraction = min_size_fraction

  def detect(self, image_rgb: np.ndarray) -> list[Face]:
    """Faces in a uint8 (H, W, 3) RGB image, largest first."""
    grey = cv2.cvtColor(np.ascontiguousarray(image_rgb), cv2.COLOR_RGB2GRAY)
    # Histogram equalisation: the cascade was trained on equalised windows and misses dim faces without it.
    grey = cv2.equalizeHist(grey)
    min_side = max(24, int(self.min_size_fraction * min(grey.shape)))
    rects, _, weights = self._classifier.detectMultiScale3(
        grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(min_side, min_side),
        outputRejectLevels=True)
    faces = [Face((float(x), float(y), float(x + w), float(y + h)), float(s))
             for (x, y, w, h), s in zip(np.reshape(rects, (-1, 4)), np.ravel(weights))]
    return sorted(faces, key=lambda f: -f.area)


def select(faces: list[Face], mode: str) -> list[Face]:
  """'largest': the largest face only; 'all': every face (largest first)."""
  if mode == 'largest':
    return faces[:1]
  if mode == 'all':
    return list(faces)
  raise ValueError(f"faces must be 'largest' or 'all', got {mode!r}")
