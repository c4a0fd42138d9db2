"""300W: 3,837 faces with 68 landmarks (Sagonas et al., ICCV-W 2013), in the usual split.

Train (3,148) = AFW + HELEN train + LFPW train; test (689) = the common subset (HELEN test + LFPW
test, 554) and the challenging subset (iBUG, 135).
"""

from __future__ import annotations

import pathlib

import numpy as np

from star_jax import layouts
from star_jax.data import crop
from star_jax.data.annotations import AnnotationError
from star_jax_datasets import common

HOMEPAGE = 'https://ibug.doc.ic.ac.uk/resources/300-W/'
NUM_POINTS = 68
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif')

# (folder, attributes (common, challenge)) per split, in record order.
FOLDERS = {
    'train': (('afw', (0, 0)), ('helen/trainset', (0, 0)), ('lfpw/trainset', (0, 0))),
    'test': (('helen/testset', (1, 0)), ('lfpw/testset', (1, 0)), ('ibug', (0, 1))),
}


def read_pts(path) -> np.ndarray:
  """Reads a 68-point iBUG .pts file: (68, 2) float32 landmarks, 0-based pixels (common.read_pts).

  Raises:
    AnnotationError (a ValueError) naming the file and line, for a malformed file.
  """
  return common.read_pts(path, NUM_POINTS)


def _image_of(pts_path: pathlib.Path) -> pathlib.Path | None:
  for suffix in IMAGE_SUFFIXES:
    for candidate in (pts_path.with_suffix(suffix), pts_path.with_suffix(suffix.upper())):
      if candidate.is_file():
        return candidate
  return None


class Builder(common.FaceLandmarkBuilder):
  """300W with the record contract of star_jax (see star_jax_datasets/common.py)."""

  LAYOUT = layouts.W300
  HOMEPAGE = HOMEPAGE
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  1. Download the 300W training images with their 68-point annotations (AFW, HELEN, LFPW, iBUG;
     each image beside its .pts file) from {HOMEPAGE}
     ("Download" / "Facial point annotations").
  2. Extract them into the manual folder as `afw/`, `helen/trainset/`, `helen/testset/`,
     `lfpw/trainset/`, `lfpw/testset/` and `ibug/`.
  3. Optional, for the crop behind the published STAR numbers: download ADNet's 300W metadata
     `train.tsv` and `test.tsv` (the STAR README's pick; links in the "Resources" table of
     {common.STAR_METADATA_URL}) into the same folder.
     Without them the crop comes from the landmarks' bounding box by the STAR authors' rule.
  4. Build: python -m star_jax.data.build --dataset the300w --manual_dir <that folder>
  """

  def _split_generators(self, dl_manager):
    required = {folder: f'{folder}/ (images with their .pts files), from {HOMEPAGE}'
                for folders in FOLDERS.values() for folder, _ in folders}
    manual_dir = self._checked_manual_dir(dl_manager, list(required.values()))
    missing = [text for folder, text in required.items() if not (manual_dir / folder).is_dir()]
    if missing:
      raise FileNotFoundError(common.missing_files_message(
          self.name, manual_dir, missing, self.MANUAL_DOWNLOAD_INSTRUCTIONS))
    return {split: self._generate_examples(manual_dir, split) for split in FOLDERS}

  def _generate_examples(self, manual_dir: pathlib.Path, split: str):
    rule = self._crop_rule(manual_dir, split)
    skip = self._skipper(split)
    index = 0
    counts = []
    for folder, attributes in FOLDERS[split]:
      pts_files = sorted((manual_dir / folder).glob('*.pts'))
      if not pts_files:
        raise FileNotFoundError(f'{manual_dir / folder}: no .pts files; each 300W image comes with '
                                f'one (see {HOMEPAGE})')
      counts.append(f'{folder} {len(pts_files)}')
      for pts_path in pts_files:
        try:
          record = self._record(manual_dir, pts_path, attributes, rule)
        except (AnnotationError, FileNotFoundError) as e:
          if skip is None:
            raise
          skip(e)
          continue
        yield index, record
        index += 1
    self._finish_split(split, rule, index, f' ({", ".join(counts)})')

  def _record(self, manual_dir: pathlib.Path, pts_path: pathlib.Path, attributes, rule) -> dict:
    """The record of one .pts file and its image; errors name the file (and line)."""
    image_path = _image_of(pts_path)
    if image_path is None:
      raise FileNotFoundError(f'{pts_path}: no image beside it (looked for '
                              f'{pts_path.stem} with suffix {"/".join(IMAGE_SUFFIXES)})')
    landmarks = read_pts(pts_path)
    # No face box comes with 300W: the landmarks' bounding box stands in for it.
    box = crop.landmarks_box(landmarks)
    image_name = image_path.relative_to(manual_dir).as_posix()
    try:
      scale, center = rule(image_name, landmarks, box)
      image = common.record_image(image_path.read_bytes(), str(image_path))
    except (ValueError, OSError) as e:
      raise AnnotationError(str(pts_path), f'{e}') from None
    return common.face_record(image=image, landmarks=landmarks, box=box, scale=scale, center=center,
                              attributes=attributes, image_name=image_name)
