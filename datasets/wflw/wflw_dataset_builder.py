"""WFLW: 10,000 faces with 98 landmarks and six attribute flags (Wu et al., CVPR 2018)."""

from __future__ import annotations

import collections
import pathlib
import tarfile
from typing import Callable

import numpy as np

from star_jax import layouts
from star_jax.data import annotations
from star_jax.data.annotations import AnnotationError
from star_jax_datasets import common

HOMEPAGE = 'https://wywu.github.io/projects/LAB/WFLW.html'
NUM_POINTS = 98
NUM_ATTRIBUTES = 6
# A line: 196 coordinates, the box, six flags, the image path.
NUM_FIELDS = 2 * NUM_POINTS + 4 + NUM_ATTRIBUTES + 1

IMAGES_TAR = 'WFLW_images.tar.gz'
IMAGES_DIR = 'WFLW_images'
ANNOTATIONS_TAR = 'WFLW_annotations.tar.gz'
LIST_DIR = 'list_98pt_rect_attr_train_test'
LIST_FILES = {'train': 'list_98pt_rect_attr_train.txt', 'test': 'list_98pt_rect_attr_test.txt'}

_REQUIRED = [
    f'{IMAGES_TAR} (or its extracted folder {IMAGES_DIR}/), from {HOMEPAGE}',
    f'{ANNOTATIONS_TAR} (or its extracted {LIST_DIR}/{LIST_FILES["train"]} and '
    f'{LIST_FILES["test"]}, directly or under WFLW_annotations/), from {HOMEPAGE}',
]

Face = collections.namedtuple('Face', 'index line landmarks box attributes path')


def parse_line(line: str, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
  """Parses one line of a WFLW list file.

  Args:
    line: 196 coordinates (x0 y0 x1 y1 ...), x_min y_min x_max y_max, six 0/1 flags (pose,
      expression, illumination, make-up, occlusion, blur), the image path; space-separated.
    where: 'file:line', for messages.

  Returns:
    landmarks (98, 2) float32, box (4,) float32, attributes (6,) int32, image path.

  Raises:
    AnnotationError (a ValueError) naming `where`: a wrong field count, a field that is not a finite
    number, a flag other than 0 / 1.
  """
  fields = line.split()
  if len(fields) != NUM_FIELDS:
    raise AnnotationError(where, f'expected {NUM_FIELDS} space-separated fields (196 coordinates, 4 box '
                                 f'values, 6 flags, image path), got {len(fields)}')
  numbers = annotations.numbers(fields[:2 * NUM_POINTS + 4], where, 'coordinates and box values').astype(np.float32)
  flags = fields[2 * NUM_POINTS + 4:-1]
  if any(f not in ('0', '1') for f in flags):
    raise AnnotationError(where, f'the six attribute flags must be 0 or 1, got {flags}')
  attributes = np.array([int(f) for f in flags], np.int32)
  landmarks = numbers[:2 * NUM_POINTS].reshape(NUM_POINTS, 2)
  box = numbers[2 * NUM_POINTS:]
  return landmarks, box, attributes, fields[-1].replace('\\', '/')


def parse_list(text: str | bytes, source: str,
               skip: Callable[[AnnotationError], None] | None = None) -> list[Face]:
  """All faces of a list file (its text or bytes), in file order; `source` names the file in messages.

  skip: None to raise on the first malformed line; else called with each line's AnnotationError, and
  the line is left out.
  """
  faces = []
  for line_no, line in enumerate(annotations.text_lines(text, source), start=1):
    if not line.strip():
      continue
    try:
      landmarks, box, attributes, path = parse_line(line, f'{source}:{line_no}')
    except AnnotationError as e:
      if skip is None:
        raise
      skip(e)
      continue
    faces.append(Face(len(faces), line_no, landmarks, box, attributes, path))
  if not faces:
    raise AnnotationError(source, 'the list file has no faces')
  return faces


def _find_lists(manual_dir: pathlib.Path) -> dict[str, tuple[str, str]] | None:
  """{split: (source name, bytes)} of the two list files, extracted or in the annotations tarball."""
  for folder in (manual_dir / 'WFLW_annotations' / LIST_DIR, manual_dir / LIST_DIR):
    paths = {split: folder / name for split, name in LIST_FILES.items()}
    if all(p.is_file() for p in paths.values()):
      return {split: (str(p), p.read_bytes()) for split, p in paths.items()}
  tar_path = manual_dir / ANNOTATIONS_TAR
  if not tar_path.is_file():
    return None
  found = {}
  try:
    with tarfile.open(tar_path) as tar:
      for member in tar:
        for split, name in LIST_FILES.items():
          if member.isfile() and member.name.endswith(f'{LIST_DIR}/{name}'):
            found[split] = (f'{tar_path}:{member.name}', tar.extractfile(member).read())
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(f'{tar_path}: cannot read the tarball ({e})') from e
  if len(found) != len(LIST_FILES):
    raise FileNotFoundError(f'{tar_path}: has no {LIST_DIR}/{LIST_FILES["train"]} and '
                            f'{LIST_DIR}/{LIST_FILES["test"]}; is it the WFLW annotations tarball?')
  return found


def _relative_to_images(name: str) -> str:
  """A tar member name as the list files write image paths (relative to WFLW_images/)."""
  while name.startswith('./'):
    name = name[2:]
  prefix = IMAGES_DIR + '/'
  return name[len(prefix):] if name.startswith(prefix) else name


class Builder(common.FaceLandmarkBuilder):
  """WFLW with the record contract of star_jax (see star_jax_datasets/common.py)."""

  LAYOUT = layouts.WFLW
  HOMEPAGE = HOMEPAGE
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  1. Download `{IMAGES_TAR}` (WIDER Face images) and `{ANNOTATIONS_TAR}` (98-point annotations)
     from {HOMEPAGE}.
  2. Put both in the manual folder, as they are or extracted: `{IMAGES_DIR}/` and
     `WFLW_annotations/{LIST_DIR}/{LIST_FILES['train']}` (and the test list).
  3. Optional, for the crop behind the published STAR numbers: download ADNet's WFLW metadata
     `train.tsv` and `test.tsv` (the STAR README's pick; links in the "Resources" table of
     {common.STAR_METADATA_URL}) into the same folder.
     Without them the crop comes from the WFLW face boxes by the STAR authors' rule.
  4. Build: python -m star_jax.data.build --dataset wflw --manual_dir <that folder>
  """

  def _split_generators(self, dl_manager):
    manual_dir = self._checked_manual_dir(dl_manager, _REQUIRED)
    lists = _find_lists(manual_dir)
    images_dir, images_tar = manual_dir / IMAGES_DIR, manual_dir / IMAGES_TAR
    missing = []
    if not (images_dir.is_dir() or images_tar.is_file()):
      missing.append(_REQUIRED[0])
    if lists is None:
      missing.append(_REQUIRED[1])
    if missing:
      raise FileNotFoundError(common.missing_files_message(
          self.name, manual_dir, missing, self.MANUAL_DOWNLOAD_INSTRUCTIONS))
    faces = {split: parse_list(data, source, skip=self._skipper(split)) for split, (source, data) in lists.items()}
    images = images_dir if images_dir.is_dir() else images_tar
    return {split: self._generate_examples(manual_dir, split, faces[split], images, lists[split][0])
            for split in LIST_FILES}

  def _generate_examples(self, manual_dir, split, faces, images, list_source):
    rule = self._crop_rule(manual_dir, split)
    skip = self._skipper(split)
    by_image = collections.defaultdict(list)
    for face in faces:
      by_image[face.path].append(face)
    reader = _read_folder if pathlib.Path(images).is_dir() else _read_tar
    count = 0
    for path, data, source in reader(images, by_image, list_source, strict=skip is None):
      try:
        if isinstance(data, Exception):
          raise data
        image = common.record_image(data, source)
      except (ValueError, OSError) as e:
        # Every face of the image goes, each named by its list line.
        errors = [AnnotationError(f'{list_source}:{face.line}', f'image {path}: {e}') for face in by_image[path]]
        if skip is None:
          raise errors[0] from None
        for error in errors:
          skip(error)
        continue
      for face in by_image[path]:
        try:
          scale, center = rule(path, face.landmarks, face.box)
        except ValueError as e:
          error = AnnotationError(f'{list_source}:{face.line}', str(e))
          if skip is None:
            raise error from None
          skip(error)
          continue
        count += 1
        yield face.index, common.face_record(
            image=image, landmarks=face.landmarks, box=face.box, scale=scale, center=center,
            attributes=face.attributes, image_name=f'{IMAGES_DIR}/{path}')
    self._finish_split(split, rule, count, f' in {len(by_image)} images')


def _read_folder(folder: pathlib.Path, by_image, list_source, strict: bool = True):
  """(path, bytes or the error reading them, source name) for each image of `by_image`, read from
  the extracted folder. A missing image raises when `strict`, else comes as a FileNotFoundError."""
  for path, faces in by_image.items():
    file = folder / path
    if not file.is_file():
      if strict:
        raise FileNotFoundError(f'{list_source}:{faces[0].line}: image {path} not found in {folder}')
      yield path, FileNotFoundError(f'not found in {folder}'), str(file)
      continue
    try:
      yield path, file.read_bytes(), str(file)
    except OSError as e:
      yield path, e, str(file)


def _read_tar(tar_path: pathlib.Path, by_image, list_source, strict: bool = True):
  """The same, streaming once through the images tarball (no extraction to disk)."""
  seen = set()
  try:
    with tarfile.open(tar_path, mode='r|*') as tar:
      for member in tar:
        path = _relative_to_images(member.name)
        if member.isfile() and path in by_image and path not in seen:
          seen.add(path)
          yield path, tar.extractfile(member).read(), f'{tar_path}:{member.name}'
  except (tarfile.TarError, OSError, EOFError) as e:
    raise ValueError(f'{tar_path}: cannot read the tarball ({e})') from e
  missing = [p for p in by_image if p not in seen]
  if missing and strict:
    first = by_image[missing[0]][0]
    raise FileNotFoundError(
        f'{list_source}:{first.line}: image {missing[0]} not found in {tar_path} under '
        f'{IMAGES_DIR}/ ({len(missing)} images of the list are missing, e.g. {missing[:5]})')
  for path in missing:
    yield path, FileNotFoundError(f'not found in {tar_path} under {IMAGES_DIR}/'), str(tar_path)
