"""COFW: 1,852 faces with 29 landmarks and occlusion flags (Burgos-Artizzu et al., ICCV 2013).

The colour release is two MATLAB files: `COFW_train_color.mat` (1,345 faces: IsTr, phisTr, bboxesTr)
and `COFW_test_color.mat` (507 faces: IsT, phisT, bboxesT). Each phis row holds 29 x, 29 y and 29
occlusion flags; boxes are x, y, w, h; images are uint8, greyscale or RGB.
"""

from __future__ import annotations

import contextlib
import pathlib
from typing import Callable, Iterator

import h5py
import numpy as np
import scipy.io
import tensorflow_datasets as tfds

from star_jax import layouts
from star_jax.data.annotations import AnnotationError
from star_jax_datasets import common

HOMEPAGE = 'https://data.caltech.edu/records/20099'
NUM_POINTS = 29
MAT_FILES = {'train': 'COFW_train_color.mat', 'test': 'COFW_test_color.mat'}
VARIABLES = {'train': ('IsTr', 'phisTr', 'bboxesTr'), 'test': ('IsT', 'phisT', 'bboxesT')}


def _rows(array: np.ndarray, width: int, where: str, count: int | None = None) -> np.ndarray:
  array = np.asarray(array, np.float64)
  if array.ndim != 2 or array.shape[1] != width or (count is not None and array.shape[0] != count):
    expected = f'({count if count is not None else "N"}, {width})'
    raise ValueError(f'{where}: expected a MATLAB array of shape {expected}, got {array.shape}')
  return array


@contextlib.contextmanager
def open_mat(path: pathlib.Path, split: str):
  """Opens a COFW .mat file; yields (number of faces, image getter, phis (N, 87), boxes (N, 4)).

  MATLAB v7.3 files are HDF5 (read with h5py): MATLAB arrays are column-major, so h5py sees every
  array with its axes reversed; phis / boxes are transposed back, an (H, W) image comes as (W, H)
  and an (H, W, 3) one as (3, W, H); the image cell array holds HDF5 object references. Older
  MATLAB files (v5 / v7) are read with scipy, which keeps MATLAB's axis order.
  """
  image_var, phis_var, boxes_var = VARIABLES[split]
  if h5py.is_hdf5(path):
    with h5py.File(path, 'r') as f:
      missing = [v for v in VARIABLES[split] if v not in f]
      if missing:
        raise ValueError(f'{path}: missing MATLAB variables {missing}; is it the COFW {split} file '
                         f'{MAT_FILES[split]}?')
      refs = f[image_var][()].reshape(-1)
      phis = _rows(f[phis_var][()].T, 3 * NUM_POINTS, f'{path}:{phis_var}', len(refs))
      boxes = _rows(f[boxes_var][()].T, 4, f'{path}:{boxes_var}', len(refs))

      def image(i):
        array = f[refs[i]][()]
        return array.T if array.ndim == 2 else np.transpose(array, (2, 1, 0))

      yield len(refs), image, phis, boxes
    return
  try:
    mat = scipy.io.loadmat(path, variable_names=VARIABLES[split])
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'{path}: not a readable MATLAB file ({e})') from e
  missing = [v for v in VARIABLES[split] if v not in mat]
  if missing:
    raise ValueError(f'{path}: missing MATLAB variables {missing}; is it the COFW {split} file '
                     f'{MAT_FILES[split]}?')
  cells = mat[image_var].reshape(-1)
  phis = _rows(mat[phis_var], 3 * NUM_POINTS, f'{path}:{phis_var}', len(cells))
  boxes = _rows(mat[boxes_var], 4, f'{path}:{boxes_var}', len(cells))
  yield len(cells), lambda i: np.asarray(cells[i]), phis, boxes


def to_rgb(array: np.ndarray, where: str) -> np.ndarray:
  """(H, W, 3) uint8 RGB from a COFW image: (H, W) grey or (H, W, 3) RGB (MATLAB order)."""
  if array.dtype != np.uint8:
    raise ValueError(f'{where}: expected a uint8 image, got {array.dtype}')
  if array.ndim == 2:
    return np.repeat(array[..., None], 3, axis=-1)
  if array.ndim == 3 and array.shape[-1] == 3:
    return array
  raise ValueError(f'{where}: expected an (H, W) or (H, W, 3) image, got shape {array.shape}')


def _fits(points: np.ndarray, width: int, height: int) -> bool:
  # Generous margins: occluded points may lie a little outside the picture.
  return bool(np.all((points[:, 0] > -0.25 * width) & (points[:, 0] < 1.25 * width) &
                     (points[:, 1] > -0.25 * height) & (points[:, 1] < 1.25 * height)))


def check_orientation(landmarks: np.ndarray, image: np.ndarray, where: str) -> None:
  """Raises when the landmarks only fit the image with its axes swapped (a transposition bug)."""
  height, width = image.shape[:2]
  if height != width and not _fits(landmarks, width, height) and _fits(landmarks, height, width):
    raise ValueError(f'{where}: the landmarks fit the image only with width and height swapped '
                     f'(image {height}x{width}): the image was read transposed')


def face_fields(phis: np.ndarray, box: np.ndarray, image: np.ndarray, *, where: str,
                where_phis: str, where_box: str) -> dict:
  """One face's fields in the record conventions, from its MATLAB values, checked.

  Args:
    phis: (87,) 29 x, 29 y (1-based pixels), 29 occlusion flags (0 or 1).
    box: (4,) x, y, w, h (1-based pixels).
    image: the face's image array, (H, W) grey or (H, W, 3) RGB, uint8.
    where, where_phis, where_box: 'file:variable[row]' of the image, phis and box, for messages.

  Returns:
    {'rgb': (H, W, 3) uint8, 'landmarks': (29, 2) float32 0-based, 'occluded': (29,) bool,
     'box': (4,) float32 x_min, y_min, x_max, y_max 0-based}.

  Raises:
    AnnotationError naming the variable and row: non-finite values, flags other than 0 / 1, a box
    without area, an image that is not uint8 (H, W[, 3]), landmarks that only fit a transposed image.
  """
  phis = np.asarray(phis, np.float64).reshape(-1)
  box = np.asarray(box, np.float64).reshape(-1)
  if not np.all(np.isfinite(phis)):
    raise AnnotationError(where_phis, f'landmarks and occlusion flags must be finite (NaN or inf at '
                                      f'columns {np.flatnonzero(~np.isfinite(phis))[:10].tolist()})')
  flags = phis[2 * NUM_POINTS:]
  if not np.all((flags == 0) | (flags == 1)):
    raise AnnotationError(where_phis, f'occlusion flags must be 0 or 1, got {sorted(set(flags.tolist()))[:10]}')
  x, y, w, h = box
  if not (np.all(np.isfinite(box)) and w > 0 and h > 0):
    raise AnnotationError(where_box, f'the face box x, y, w, h must be finite with w, h > 0, got {box.tolist()}')
  with np.errstate(over='ignore'):  # a value beyond float32 becomes inf, refused just below
    landmarks = (np.stack([phis[:NUM_POINTS], phis[NUM_POINTS:2 * NUM_POINTS]], -1) - 1.0).astype(np.float32)
    out_box = np.array([x - 1, y - 1, x - 1 + w, y - 1 + h], np.float32)
  if not np.all(np.isfinite(landmarks)):
    raise AnnotationError(where_phis, 'a coordinate overflows float32')
  if not np.all(np.isfinite(out_box)):
    raise AnnotationError(where_box, 'a coordinate overflows float32')
  try:
    rgb = to_rgb(np.asarray(image), where)
    check_orientation(landmarks, rgb, where)
  except ValueError as e:
    raise AnnotationError(where, str(e).removeprefix(f'{where}: ')) from None
  return {'rgb': rgb, 'landmarks': landmarks, 'occluded': flags != 0, 'box': out_box}


def faces(path: pathlib.Path, split: str,
          skip: Callable[[AnnotationError], None] | None = None) -> Iterator[tuple[int, dict]]:
  """(index, fields) of each face in a COFW .mat file, converted to the record conventions (see
  `face_fields`).

  Landmarks and boxes are MATLAB 1-based pixel coordinates: 1 is subtracted from x and y. (The
  ADNet / STAR metadata of COFW could not be inspected here; the builder measures its offset from
  these 0-based points and records it in the dataset metadata, see star_jax/data/crop.py.)

  skip: None to raise on the first bad face; else called with each one's AnnotationError, and the
  face is left out. (A file without the COFW variables is an error either way.)
  """
  image_var, phis_var, boxes_var = VARIABLES[split]
  with open_mat(path, split) as (count, image, phis, boxes):
    if not count:
      raise ValueError(f'{path}:{image_var}: no faces')
    for i in range(count):
      try:
        fields = face_fields(phis[i], boxes[i], image(i), where=f'{path}:{image_var}[{i}]',
                             where_phis=f'{path}:{phis_var}[{i}]', where_box=f'{path}:{boxes_var}[{i}]')
      except AnnotationError as e:
        if skip is None:
          raise
        skip(e)
        continue
      yield i, fields


class Builder(common.FaceLandmarkBuilder):
  """COFW (colour) with the record contract of star_jax, plus 'occluded' (29,) bool per point."""

  LAYOUT = layouts.COFW
  HOMEPAGE = HOMEPAGE
  EXTRA_FEATURES = {
      'occluded': tfds.features.Tensor(shape=(NUM_POINTS,), dtype=np.bool_),
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  1. Download the colour COFW release (`COFW_color.zip`) from {HOMEPAGE}
     (also linked from http://www.vision.caltech.edu/xpburgos/ICCV13/).
  2. Put `{MAT_FILES['train']}` and `{MAT_FILES['test']}` in the manual folder.
  3. Optional, for the crop behind the published STAR numbers: download ADNet's COFW metadata
     `train.tsv` and `test.tsv` (the STAR README's pick; links in the "Resources" table of
     {common.STAR_METADATA_URL}) into the same folder.
     Without them the crop comes from the COFW face boxes by the STAR authors' rule.
  4. Build: python -m star_jax.data.build --dataset cofw --manual_dir <that folder>
  """

  def _split_generators(self, dl_manager):
    required = {split: f'{name}, from {HOMEPAGE}' for split, name in MAT_FILES.items()}
    manual_dir = self._checked_manual_dir(dl_manager, list(required.values()))
    missing = [required[split] for split, name in MAT_FILES.items()
               if not (manual_dir / name).is_file()]
    if missing:
      raise FileNotFoundError(common.missing_files_message(
          self.name, manual_dir, missing, self.MANUAL_DOWNLOAD_INSTRUCTIONS))
    return {split: self._generate_examples(manual_dir, split) for split in MAT_FILES}

  def _generate_examples(self, manual_dir: pathlib.Path, split: str):
    rule = self._crop_rule(manual_dir, split)
    name = MAT_FILES[split]
    count = 0
    for index, face in faces(manual_dir / name, split, skip=self._skipper(split)):
      # The .mat files name no images: the name is the file and the face's 0-based index.
      image_name = f'{name}/{index:04d}'
      scale, center = rule(image_name, face['landmarks'], face['box'])
      yield index, common.face_record(
          image=common.encode_rgb(face['rgb']), landmarks=face['landmarks'], box=face['box'],
          scale=scale, center=center, attributes=[int(face['occluded'].any())],
          image_name=image_name, occluded=face['occluded'])
      count += 1
    self._finish_split(split, rule, count)
