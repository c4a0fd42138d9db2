"""Crop parameters of a face: the STAR box rule and the official ADNet / STAR metadata files.

The official pipeline crops every face by two numbers per face (their naming): `scale` and `center`
(center_w, center_h). A square of side `scale * 200` px of the original image, centred on `center`,
is mapped onto the network input. Every dataset record carries its own (scale, center), decided here
when the dataset is built, by one of two rules:

- 'official_tsv': taken from the metadata files the STAR authors used (ADNet's `train.tsv` /
  `test.tsv`), matched to a face by its image file name and its landmarks. This is the crop behind the
  published numbers.
- 'box_rule': derived from a face box by the rule the STAR authors gave for their metadata
  (github.com/ZhenglinZhou/STAR issues 13 and 22): scale = min(w, h) / 200 * 1.05, centre = the
  box centre.

Coordinates are original-image pixels, (x, y); boxes are (x_min, y_min, x_max, y_max).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
from typing import Callable

import numpy as np

from star_jax.data import annotations
from star_jax.data.annotations import AnnotationError

FACE_SIDE_PX = 200.0    # scale 1 means a 200 px face: the unit of the official `scale`
BOX_RULE_MARGIN = 1.05  # the STAR authors' margin on the shorter box side

OFFICIAL_TSV = 'official_tsv'
BOX_RULE = 'box_rule'


def box_rule(box) -> tuple[float, np.ndarray]:
  """(scale, center) of a face box by the STAR authors' rule.

  Args:
    box: (4,) x_min, y_min, x_max, y_max in pixels.

  Returns:
    scale: min(width, height) / 200 * 1.05, a Python float.
    center: (2,) float32, the box centre (center_w, center_h).
  """
  x_min, y_min, x_max, y_max = (float(v) for v in np.asarray(box, np.float64).reshape(4))
  width, height = x_max - x_min, y_max - y_min
  if not (width > 0 and height > 0):
    raise ValueError(f'face box {box!r} has no area (need x_min < x_max and y_min < y_max)')
  scale = min(width, height) / FACE_SIDE_PX * BOX_RULE_MARGIN
  center = np.array([(x_min + x_max) / 2, (y_min + y_max) / 2], np.float32)
  return scale, center


def landmarks_box(landmarks) -> np.ndarray:
  """(4,) bounding box x_min, y_min, x_max, y_max of (N, 2) landmarks, in their float dtype (float32
  for anything else)."""
  points = np.asarray(landmarks)
  if not np.issubdtype(points.dtype, np.floating):
    points = points.astype(np.float32)
  points = points.reshape(-1, 2)
  return np.concatenate([points.min(axis=0), points.max(axis=0)])


@dataclasses.dataclass(frozen=True)
class MetadataRow:
  """One face of an official metadata file.

  Attributes:
    image_path: the image path as written in the file, with '\\' turned into '/'.
    landmarks: (N, 2) float32 landmarks (x, y), as written in the file.
    scale: the official crop scale (face side / 200 px).
    center: (2,) float32 official crop centre (center_w, center_h).
    line: 1-based line number in the file, for messages.
  """
  image_path: str
  landmarks: np.ndarray
  scale: float
  center: np.ndarray
  line: int


def _is_header(fields: list[str]) -> bool:
  # A header names its columns: none of the landmark, scale and centre columns is a number. (A data
  # line with one damaged field still has the others, so damage never turns a face into a header.)
  return len(fields) >= 6 and not any(
      annotations.is_number(v) for f in fields[2:6] for v in f.split(','))


def read_metadata_tsv(path, num_points: int,
                      skip: Callable[[AnnotationError], None] | None = None) -> list[MetadataRow]:
  """Reads an ADNet / STAR metadata file (`train.tsv` / `test.tsv`).

  Each line is tab-separated: image path, 5 points "x,y,...", `num_points` points "x,y,...", scale,
  center_w, center_h, then optional comma-separated 0/1 tags (ignored here: the builders take the
  attributes from the raw annotations).

  A first line whose landmark, scale and centre columns are all not numbers is a header and skipped.
  The official reader (pandas `read_csv` with its default header=0) always consumes the first line as
  a header, so with a header-less file it silently drops the first face; we keep every face.

  skip: None to raise on the first malformed line; else called with each one's AnnotationError, and
  the line is left out.

  Raises:
    AnnotationError (a ValueError) naming the file and line, for a malformed line: a missing field,
    a value that is not a finite number (NaN rows included), a non-positive scale.
  """
  path = pathlib.Path(path)
  rows = []
  for line_no, line in enumerate(annotations.text_lines(path.read_bytes(), str(path)), start=1):
    if not line.strip():
      continue
    fields = line.split('\t')
    if line_no == 1 and _is_header(fields):
      continue
    try:
      rows.append(_metadata_row(fields, num_points, f'{path}:{line_no}', line_no))
    except AnnotationError as e:
      if skip is None:
        raise
      skip(e)
  return rows


def _metadata_row(fields: list[str], num_points: int, where: str, line_no: int) -> MetadataRow:
  if len(fields) < 6:
    raise AnnotationError(where, f'expected at least 6 tab-separated fields (image path, 5 points, '
                                 f'{num_points} points, scale, center_w, center_h), got {len(fields)}')
  if not fields[0].strip():
    raise AnnotationError(where, 'the image path is empty')
  scale = annotations.number(fields[3], where, 'scale, center_w and center_h')
  center = annotations.numbers(fields[4:6], where, 'scale, center_w and center_h')
  points = annotations.numbers(fields[2].split(','), where, f'the {num_points} landmarks')
  if points.size != 2 * num_points:
    raise AnnotationError(where, f'expected {2 * num_points} landmark coordinates ({num_points} points), '
                                 f'got {points.size}')
  if not scale > 0:
    raise AnnotationError(where, f'scale must be positive, got {scale}')
  landmarks = points.reshape(num_points, 2).astype(np.float32)
  return MetadataRow(image_path=fields[0].replace('\\', '/'), landmarks=landmarks, scale=scale,
                     center=center.astype(np.float32), line=line_no)


def _mean_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Mean point distance between (N, 2) `a` and each of (M, N, 2) `b`: (M,)."""
  return np.sqrt(((b - a[None]) ** 2).sum(-1)).mean(-1)


class CropTable:
  """Finds the official metadata row of a face from its image file name and landmarks.

  Rows are first narrowed to those whose image has the same file name (official paths carry
  prefixes of the authors' machines, e.g. './rawImages/', so only the name is compared); when no
  row has that name (COFW's metadata names images the .mat files don't), all rows are candidates.
  The nearest candidate by mean landmark distance is the match if that distance is within
  `max(2 px, 2% of the face's landmark box side)`: enough for a one-pixel convention shift
  (MATLAB 1-based vs 0-based), far below the distance to another face.
  """

  def __init__(self, rows: list[MetadataRow], source: str):
    if not rows:
      raise ValueError(f'{source}: no faces in the metadata file')
    self.source = source
    self.rows = rows
    self._landmarks = np.stack([r.landmarks for r in rows]).astype(np.float64)
    self._by_name = collections.defaultdict(list)
    for i, row in enumerate(rows):
      self._by_name[os.path.basename(row.image_path)].append(i)
    self._all = np.arange(len(rows))

  @classmethod
  def from_tsv(cls, path, num_points: int, skip: Callable[[AnnotationError], None] | None = None) -> CropTable:
    return cls(read_metadata_tsv(path, num_points, skip=skip), str(path))

  def lookup(self, image_name: str, landmarks) -> MetadataRow | None:
    """The row of the face with (N, 2) `landmarks` in `image_name`, or None when none is close."""
    points = np.asarray(landmarks, np.float64)
    if points.shape != self._landmarks.shape[1:]:
      raise ValueError(f'{self.source}: landmarks of shape {points.shape} cannot match rows of '
                       f'shape {self._landmarks.shape[1:]}')
    candidates = self._by_name.get(os.path.basename(str(image_name).replace('\\', '/')))
    candidates = np.asarray(candidates) if candidates else self._all
    distances = _mean_distance(points, self._landmarks[candidates])
    best = int(np.argmin(distances))
    side = float(np.max(points.max(0) - points.min(0)))
    if distances[best] > max(2.0, 0.02 * side):
      return None
    return self.rows[int(candidates[best])]


class CropRule:
  """Gives each face of one split its (scale, center) and keeps count of how.

  With a `table`, faces found in it get the official crop ('official_tsv'); the others fall back
  to the box rule and are counted and logged (a metadata file that lacks a few faces still gives the
  rest their official crop). Without a table every face gets the box rule.
  """

  def __init__(self, table: CropTable | None = None):
    self.table = table
    self.matched = 0
    self.fallbacks = []          # image names that fell back to the box rule
    self._offsets = []           # metadata landmarks minus ours, per matched face (mean over points)

  @property
  def name(self) -> str:
    return OFFICIAL_TSV if self.table is not None else BOX_RULE

  def __call__(self, image_name: str, landmarks, box) -> tuple[float, np.ndarray]:
    """(scale, center (2,) float32) of the face with (N, 2) `landmarks` and (4,) `box`."""
    if self.table is not None:
      row = self.table.lookup(image_name, landmarks)
      if row is not None:
        self.matched += 1
        self._offsets.append((row.landmarks - np.asarray(landmarks, np.float32)).mean(0))
        return float(row.scale), row.center.astype(np.float32)
      self.fallbacks.append(str(image_name))
    try:
      return box_rule(box)
    except ValueError as e:
      raise ValueError(f'{image_name}: {e}') from None

  def summary(self) -> dict:
    """What happened, for the dataset's metadata (JSON-serialisable)."""
    out = {'rule': self.name}
    if self.table is not None:
      out['metadata_file'] = os.path.basename(self.table.source)
      out['matched'] = self.matched
      out['box_rule_fallbacks'] = len(self.fallbacks)
      if self._offsets:
        # A consistent non-zero offset means the metadata uses another pixel convention.
        out['metadata_minus_raw_median_offset'] = [
            round(float(v), 4) for v in np.median(np.stack(self._offsets), axis=0)]
    return out

  def check(self) -> None:
    """Raises when a metadata file matched no face at all: it belongs to another dataset."""
    if self.table is not None and self.matched == 0 and self.fallbacks:
      raise ValueError(
          f'{self.table.source}: none of the {len(self.fallbacks)} faces of this split matched a '
          f'row of the metadata file (by image name and landmarks); it seems to belong to another '
          f'dataset or split. Remove it to use the box rule instead.')


def rule_for_split(manual_dir, split: str, num_points: int,
                   skip: Callable[[AnnotationError], None] | None = None) -> CropRule:
  """The CropRule of `split`: official when `<manual_dir>/<split>.tsv` exists, else the box rule.
  skip: as for read_metadata_tsv (a skipped row's face falls back to the box rule)."""
  path = pathlib.Path(manual_dir) / f'{split}.tsv'
  if path.is_file():
    return CropRule(CropTable.from_tsv(path, num_points, skip=skip))
  return CropRule(None)
