"""Offline face detection for `star_jax.predict` (the crop of a face box is `star_jax.data.crop.box_rule`).

Two detectors, both offline and both run by OpenCV (no TensorFlow, no PyTorch, nothing downloaded):

- `BlazeFaceDetector` (the default): MediaPipe's full-range BlazeFace, a small CNN (TFLite, 1.1 MB,
  Apache-2.0) shipped inside this package (star_jax/assets/face_detector/, with its licence, source
  and sha256) and run by `cv2.dnn`. The network sees a 192 x 192 input and finds faces of about
  7-30 % of it, so photos are scanned as a pyramid of overlapping tiles (see `BlazeFaceDetector`).
- `HaarFaceDetector`: OpenCV's frontal-face Haar cascade (inside the opencv wheel), a weak fallback
  (frontal, upright faces only; false faces in textures).

Boxes are (x_min, y_min, x_max, y_max) in 0-based image pixels, float. Detectors return faces ranked
by score, best first; `select` picks the largest, the best or all of them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import math
import os
import pathlib

import cv2
import numpy as np

CASCADE = 'haarcascade_frontalface_default.xml'

# The packaged BlazeFace model; star_jax/assets/face_detector/README.md says where it comes from.
MODEL_FILE = 'face_detection_full_range.tflite'
MODEL_SHA256 = '99bf9494d84f50acc6617d89873f71bf6635a841ea699c17cb3377f9507cfec3'

DETECTORS = ('blazeface', 'haar')
FACE_MODES = ('largest', 'best', 'all')
DEFAULT_MIN_FACE_SIZE = 32.0
DEFAULT_SCORE_THRESHOLD = 0.6


@dataclasses.dataclass(frozen=True)
class Face:
  """One detected (or given) face.

  box: (x_min, y_min, x_max, y_max) image pixels (float). A detected box may reach past the image
    border when the face is cut by it.
  score: the detector's confidence: a probability in [0, 1] for BlazeFace; for the Haar cascade its
    last-stage weight (only comparable within one image); None for a box given by the user.
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


def check_image(image_rgb: np.ndarray) -> np.ndarray:
  """`image_rgb` as a contiguous uint8 (H, W, 3) array; a ValueError naming what it got otherwise."""
  image = np.asarray(image_rgb)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or min(image.shape[:2]) < 1:
    raise ValueError(f'face detection needs a uint8 (H, W, 3) RGB image, got {image.dtype} {image.shape}')
  return np.ascontiguousarray(image)


# ---- The packaged model file --------------------------------------------------------------------

def default_model_path() -> pathlib.Path:
  """Where the packaged BlazeFace model is (package data, so it follows the package when installed)."""
  return pathlib.Path(str(importlib.resources.files('star_jax') / 'assets' / 'face_detector' / MODEL_FILE))


def file_sha256(path: os.PathLike | str) -> str:
  """Hex sha256 of a file's bytes."""
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def verify_model_file(path: os.PathLike | str, sha256: str | None) -> pathlib.Path:
  """Checks that the model file exists and, unless `sha256` is None, that its sha256 is `sha256`.

  Raises FileNotFoundError or ValueError naming the file.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'face detector model {str(path)!r} is missing (it ships inside the star_jax '
                            'package: reinstall it, e.g. pip install -e .)')
  if sha256 is not None:
    actual = file_sha256(path)
    if actual != sha256.lower():
      raise ValueError(f'face detector model {str(path)!r} has sha256 {actual}, expected {sha256} '
                       '(a damaged or different file: reinstall the package)')
  return path


# ---- BlazeFace ----------------------------------------------------------------------------------

def blazeface_anchors(input_size: int = 192, stride: int = 4) -> np.ndarray:
  """Anchor centres (A, 2) of full-range BlazeFace as (x, y) fractions of the input side.

  The model has one anchor per cell of a (input_size / stride)^2 grid, at the cell centre, in row-major
  order (the order of its 2304 outputs). Its anchors all have unit size: the box sizes it answers are in
  input pixels, not relative to an anchor.
  """
  cells = input_size // stride
  ys, xs = np.mgrid[0:cells, 0:cells]
  return np.stack([(xs.ravel() + 0.5) / cells, (ys.ravel() + 0.5) / cells], axis=1).astype(np.float32)


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
  """Intersection over union of one box (4,) with each of boxes (K, 4)."""
  iw = np.clip(np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0]), 0.0, None)
  ih = np.clip(np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1]), 0.0, None)
  inter = iw * ih
  area = lambda b: np.clip(b[..., 2] - b[..., 0], 0, None) * np.clip(b[..., 3] - b[..., 1], 0, None)
  union = area(box) + area(boxes) - inter
  return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.0)


def weighted_nms(boxes: np.ndarray, scores: np.ndarray,
                 iou_threshold: float) -> tuple[np.ndarray, list[np.ndarray]]:
  """Merges overlapping detections (boxes (F, 4), scores (F,)) into faces.

  Greedy: the best remaining detection takes every remaining one overlapping it by IoU >= iou_threshold;
  the group's box is the score-weighted mean of its boxes (one face is seen by many anchors, tiles and
  pyramid levels, each a little off; their mean is steadier than the single best).

  Returns: boxes (G, 4) and, for each, the indices into the input of its group, groups in the order of
  their best score.
  """
  order = np.argsort(-np.asarray(scores), kind='stable')
  alive = np.ones(len(order), bool)
  sorted_boxes = boxes[order]
  out_boxes, groups = [], []
  for i in range(len(order)):
    if not alive[i]:
      continue
    member = alive & (box_iou(sorted_boxes[i], sorted_boxes) >= iou_threshold)
    member[i] = True
    weights = scores[order[member]]
    out_boxes.append((sorted_boxes[member] * weights[:, None]).sum(0) / weights.sum())
    groups.append(order[member])
    alive &= ~member
  return (np.stack(out_boxes) if out_boxes else np.zeros((0, 4))), groups


def _tile_starts(length: int, tile: int) -> list[int]:
  """Start offsets of tiles of side `tile` covering [0, length) with at least half a tile of overlap;
  one tile centred on the image (so padded on both sides) when the image is not longer than a tile."""
  if length <= tile:
    return [-((tile - length) // 2)]
  n = math.ceil((length - tile) / (tile / 2)) + 1
  return [int(round(v)) for v in np.linspace(0, length - tile, n)]


class BlazeFaceDetector:
  """MediaPipe's full-range BlazeFace run by OpenCV's dnn module over an image pyramid.

  The network (192 x 192 RGB input in [-1, 1]) answers, for each of 2304 anchors (a 48 x 48 grid),
  a face logit and a box (centre offset and size, in input pixels) plus six keypoints, which are not
  used here. It finds faces of about 7 % to 30 % of its input side (on the photos of
  tests/testdata/real_faces_full its scores fall off outside that range), so a photo is scanned at several
  scales: the first level shrinks the whole photo until a face as large as the photo would be 30 % of
  the input; each next level halves the window, down to the one whose smallest face (7 %) is
  `min_face_size`. A level larger than the input is cut into tiles overlapping by half a tile, so every
  face small enough for that level lies whole inside some tile; a box touching a tile edge that lies
  inside the photo is dropped (a cut face, found whole in a neighbouring tile). A level (but the last)
  that would be at most `ONE_TILE_SLACK` times the input side is shrunk to fit one tile instead of two:
  its faces come out that much smaller, still within the network's range, at half the cost.

  Every tile also goes through the network mirrored (`flip`): a face is a face in a mirror too, while
  many of BlazeFace's false faces (a painted deer, blob textures) score high one way only. All boxes
  scoring at least `candidate_threshold`, of all tiles, levels and both orientations, are merged by
  `weighted_nms`; a merged face's score is the mean of its best score upright and its best score
  mirrored (its best score when `flip` is off), and faces scoring below `score_threshold` are dropped.

  Args:
    model_path: the TFLite file (default: the packaged one).
    sha256: expected sha256 of the model file (default: the packaged file's); None skips the check.
    score_threshold: least face score kept. 0.6: on the three photos of tests/testdata/real_faces_full
      the faces score 0.72-0.96 and false faces (the deer on einstein.jpg's wall painting) up to 0.57;
      on blob textures false faces reached 0.55.
    min_face_size: least box side in image pixels; smaller faces are neither searched for nor kept.
    iou_threshold: overlap (IoU) from which two boxes are the same face.
    flip: also run every tile mirrored (twice the time, far fewer false faces).
    candidate_threshold: least score of a single box to take part in the merge.
  """

  INPUT_SIZE = 192
  NUM_ANCHORS = 2304
  SMALLEST_FACE = 0.07   # face sides the network finds, as fractions of its input side
  LARGEST_FACE = 0.30
  # A box closer than this (fraction of the tile) to an inner tile edge counts as cut by it.
  TILE_EDGE_MARGIN = 0.02
  # A level at most this much larger than the input is shrunk into one tile (see the class docstring).
  ONE_TILE_SLACK = 1.25

  def __init__(self, model_path: os.PathLike | str | None = None, sha256: str | None = MODEL_SHA256,
               score_threshold: float = DEFAULT_SCORE_THRESHOLD, min_face_size: float = DEFAULT_MIN_FACE_SIZE,
               iou_threshold: float = 0.3, flip: bool = True, candidate_threshold: float = 0.3):
    if not min_face_size > 0:
      raise ValueError(f'min_face_size must be positive (image pixels), got {min_face_size!r}')
    self.model_path = verify_model_file(default_model_path() if model_path is None else model_path, sha256)
    try:
      self._net = cv2.dnn.readNetFromTFLite(str(self.model_path))
    except cv2.error as e:
      raise ValueError(f'cannot read the face detector model {str(self.model_path)!r} as a TFLite '
                       f'network: {e}') from e
    self._outputs = self._net.getUnconnectedOutLayersNames()
    self._anchors = blazeface_anchors(self.INPUT_SIZE)
    self.score_threshold = float(score_threshold)
    self.min_face_size = float(min_face_size)
    self.iou_threshold = float(iou_threshold)
    self.flip = bool(flip)
    self.candidate_threshold = float(candidate_threshold)

  def pyramid(self, height: int, width: int) -> list[float]:
    """Window sides (image pixels) of the pyramid levels for a height x width photo, largest first."""
    longer = max(height, width)
    windows = [longer / self.LARGEST_FACE]
    while self.SMALLEST_FACE * windows[-1] > self.min_face_size:
      windows.append(max(windows[-1] / 2, self.min_face_size / self.SMALLEST_FACE))
    # A level just larger than one tile fits one when slightly shrunk (the last keeps its smallest face).
    return [longer if longer / self.ONE_TILE_SLACK <= w < longer and i < len(windows) - 1 else w
            for i, w in enumerate(windows)]

  def run_network(self, tile_rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The network on one uint8 (192, 192, 3) RGB tile: boxes (2304, 4) as fractions of the tile side
    and face probabilities (2304,)."""
    blob = cv2.dnn.blobFromImage(np.ascontiguousarray(tile_rgb), scalefactor=1 / 127.5,
                                 mean=(127.5, 127.5, 127.5))
    self._net.setInput(blob)
    outs = self._net.forward(self._outputs)
    by_width = {o.shape[-1]: o.reshape(-1, o.shape[-1]) for o in outs}
    if set(by_width) != {1, 16} or any(len(v) != self.NUM_ANCHORS for v in by_width.values()):
      raise ValueError(f'face detector model {str(self.model_path)!r} answers '
                       f'{[tuple(o.shape) for o in outs]}, not full-range BlazeFace\'s '
                       f'(1, {self.NUM_ANCHORS}, 1) scores and (1, {self.NUM_ANCHORS}, 16) boxes')
    # MediaPipe clips the logits to +-100 before the sigmoid; so do we (and exp stays finite).
    logits = np.clip(by_width[1][:, 0].astype(np.float64), -100.0, 100.0)
    scores = 1.0 / (1.0 + np.exp(-logits))
    reg = by_width[16].astype(np.float64) / self.INPUT_SIZE
    centers = self._anchors + reg[:, 0:2]
    half = reg[:, 2:4] / 2
    return np.concatenate([centers - half, centers + half], axis=1), scores

  def _level(self, image: np.ndarray, window: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidates of one pyramid level (window side `window`, image pixels): see `candidates`."""
    h, w = image.shape[:2]
    size, margin = self.INPUT_SIZE, self.TILE_EDGE_MARGIN
    s = size / window
    rw, rh = max(1, round(w * s)), max(1, round(h * s))
    # INTER_AREA when shrinking: bilinear sampling aliases badly at the coarse levels.
    level = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_LINEAR)
    to_image = np.array([w / rw, h / rh, w / rw, h / rh])
    found = []
    for y0 in _tile_starts(rh, size):
      for x0 in _tile_starts(rw, size):
        tile = np.zeros((size, size, 3), np.uint8)
        ty, tx = max(y0, 0), max(x0, 0)
        part = level[ty:y0 + size, tx:x0 + size]
        tile[ty - y0:ty - y0 + part.shape[0], tx - x0:tx - x0 + part.shape[1]] = part
        # The tile's edges that lie inside the photo, where a face may be cut.
        inner = (x0 > 0, y0 > 0, x0 + size < rw, y0 + size < rh)
        for mirrored in (False, True) if self.flip else (False,):
          boxes, scores = self.run_network(tile[:, ::-1] if mirrored else tile)
          if mirrored:
            boxes = np.stack([1 - boxes[:, 2], boxes[:, 1], 1 - boxes[:, 0], boxes[:, 3]], axis=1)
          cut = ((inner[0] & (boxes[:, 0] < margin)) | (inner[1] & (boxes[:, 1] < margin))
                 | (inner[2] & (boxes[:, 2] > 1 - margin)) | (inner[3] & (boxes[:, 3] > 1 - margin)))
          keep = (scores >= self.candidate_threshold) & ~cut
          boxes = (boxes[keep] * size + [x0, y0, x0, y0]) * to_image
          found.append((boxes, scores[keep], np.full(len(boxes), mirrored)))
    return tuple(np.concatenate([f[i] for f in found]) for i in range(3))

  def candidates(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every box of every tile, level and orientation that scores at least `candidate_threshold` and is
    not cut by a tile edge: boxes (F, 4) image pixels, scores (F,), mirrored (F,) bool."""
    levels = [self._level(image, window) for window in self.pyramid(*image.shape[:2])]
    return tuple(np.concatenate([lv[i] for lv in levels]) for i in range(3))

  def _merge(self, boxes: np.ndarray, scores: np.ndarray, mirrored: np.ndarray) -> list[Face]:
    """Candidates merged into faces (`weighted_nms`), scored, thresholded; best score first."""
    big = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]) >= self.min_face_size
    boxes, scores, mirrored = boxes[big], scores[big], mirrored[big]
    merged, groups = weighted_nms(boxes, scores, self.iou_threshold)
    faces = []
    for box, group in zip(merged, groups):
      if self.flip:
        score = float(np.mean([scores[group][mirrored[group] == m].max(initial=0.0) for m in (False, True)]))
      else:
        score = float(scores[group].max())
      if score >= self.score_threshold:
        faces.append(Face(tuple(float(v) for v in box), score))
    return sorted(faces, key=lambda f: -f.score)

  def detect(self, image_rgb: np.ndarray) -> list[Face]:
    """Faces in a uint8 (H, W, 3) RGB image, best score first."""
    return self._merge(*self.candidates(check_image(image_rgb)))

  def detect_largest(self, image_rgb: np.ndarray) -> list[Face]:
    """The largest face (by box area) in a uint8 (H, W, 3) RGB image, as a list of at most one Face.

    The pyramid is scanned from its coarsest level (the largest faces) down, and stops after the
    first level at which the largest face found so far is within the range of the coarser level too
    (at least SMALLEST_FACE of its window; twice that of the coarsest level's own window): every face
    at least that large lies in the ranges of the levels already scanned, and has had the two looks
    the pyramid gives each size (this level's and the coarser one's). The finer levels, which hold
    most of the tiles, look for smaller faces only. The box is merged from the levels scanned, so it
    can differ from `detect`'s box of the same face by a few percent of its side (up to 4 % on the
    photos of tests/testdata/real_faces_full: as much as the same photo resized moves it); the face
    chosen is the same.
    """
    image = check_image(image_rgb)
    windows = self.pyramid(*image.shape[:2])
    parts, largest = [], None
    for j, window in enumerate(windows):
      parts.append(self._level(image, window))
      faces = self._merge(*(np.concatenate([p[i] for p in parts]) for i in range(3)))
      largest = max(faces, key=lambda f: f.area) if faces else None
      coarser = windows[j - 1] if j else 2 * window
      if largest is not None and min(largest.box[2] - largest.box[0],
                                     largest.box[3] - largest.box[1]) >= self.SMALLEST_FACE * coarser:
        break
    return [] if largest is None else [largest]


# ---- Haar cascade (fallback) --------------------------------------------------------------------

class HaarFaceDetector:
  """OpenCV's frontal-face Haar cascade.

  Args:
    cascade: file name inside `cv2.data.haarcascades`, or a path to a cascade XML.
    scale_factor, min_neighbors: `detectMultiScale` settings (OpenCV's usual 1.1 and 5).
    min_face_size: smallest face side searched, image pixels (at least 24, the cascade's window);
      default: 4 % of the image's shorter side, so big photos are not scanned at tiny scales.
  """

  def __init__(self, cascade: str = CASCADE, scale_factor: float = 1.1, min_neighbors: int = 5,
               min_face_size: float | None = None):
    path = cascade if os.path.isfile(cascade) else os.path.join(cv2.data.haarcascades, cascade)
    self._classifier = cv2.CascadeClassifier(path)
    if self._classifier.empty():
      raise FileNotFoundError(f'cannot load the OpenCV face cascade {path!r} (is opencv-python-headless '
                              'installed with its data files?)')
    self.scale_factor = scale_factor
    self.min_neighbors = min_neighbors
    self.min_face_size = min_face_size

  def detect(self, image_rgb: np.ndarray) -> list[Face]:
    """Faces in a uint8 (H, W, 3) RGB image, best score first."""
    grey = cv2.cvtColor(check_image(image_rgb), cv2.COLOR_RGB2GRAY)
    # Histogram equalisation: the cascade was trained on equalised windows and misses dim faces without it.
    grey = cv2.equalizeHist(grey)
    wanted = 0.04 * min(grey.shape) if self.min_face_size is None else self.min_face_size
    min_side = max(24, int(math.ceil(wanted)))
    rects, _, weights = self._classifier.detectMultiScale3(
        grey, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors, minSize=(min_side, min_side),
        outputRejectLevels=True)
    faces = [Face((float(x), float(y), float(x + w), float(y + h)), float(s))
             for (x, y, w, h), s in zip(np.reshape(rects, (-1, 4)), np.ravel(weights))]
    return sorted(faces, key=lambda f: -f.score)


def make_detector(name: str = 'blazeface', min_face_size: float | None = None,
                  min_score: float | None = None):
  """A detector by name: 'blazeface' (the default) or 'haar'.

  min_face_size: smallest face side in image pixels (None: the detector's default).
  min_score: BlazeFace's score threshold (None: its default); the Haar cascade has no such setting.
  """
  if name == 'blazeface':
    return BlazeFaceDetector(
        min_face_size=DEFAULT_MIN_FACE_SIZE if min_face_size is None else min_face_size,
        score_threshold=DEFAULT_SCORE_THRESHOLD if min_score is None else min_score)
  if name == 'haar':
    return HaarFaceDetector(min_face_size=min_face_size)
  raise ValueError(f'detector must be one of {", ".join(DETECTORS)}, got {name!r}')


def select(faces: list[Face], mode: str) -> list[Face]:
  """Faces to process: 'largest' (by box area), 'best' (highest score) or 'all' (in the given order,
  which for a detector's output is best score first)."""
  if mode == 'largest':
    return [max(faces, key=lambda f: f.area)] if faces else []
  if mode == 'best':
    score = lambda f: -math.inf if f.score is None else f.score
    return [max(faces, key=score)] if faces else []
  if mode == 'all':
    return list(faces)
  raise ValueError(f'faces must be one of {", ".join(FACE_MODES)}, got {mode!r}')
