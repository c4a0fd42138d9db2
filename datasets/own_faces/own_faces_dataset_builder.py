"""own_faces: your own annotated photos, in any landmark layout, with no code to write.

The manual folder holds the photos and their annotations in one of these forms:
  - one `.pts` file beside each image (`photo.jpg` + `photo.pts`; the 300W / menpo format,
    1-based pixel coordinates), in any sub-folders;
  - one CSV (`,`) or TSV (tab) file, a face per row: the image path (relative to the folder), optionally
    the face box x_min, y_min, x_max, y_max, then x0, y0, x1, y1, ... (0-based pixels); an optional
    header row and '#' comment lines are skipped;
  - an ADNet / STAR metadata file (`train.tsv` style: image path, 5 points, N points, scale, center_w,
    center_h, tab-separated; what the official code trains on), whose crop is then used as it is.
The points are in the order of the layout (config.layout: a built-in name, or a layout file, see
star_jax/layouts.py). Train / test split: two folders or two list files of image paths (either one
alone: the rest is the other), else the folders `train/` and `test/` when both exist, else a seeded
random fraction of the images (faces of one image stay together).

Build (or let training build it: set data.manual_dir in configs/own.py):

  python -m star_jax.data.build --dataset own_faces --config mydata --manual_dir ~/faces --layout 300W
      [--annotations labels.csv] [--train train.txt --test test.txt | --test_fraction 0.1 --split_seed 0]

The build is `<data_dir>/own_faces/<config>/`; the options it was built with are in its metadata, and
a later build of the same name from a manual folder checks that they did not change.
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import re
from typing import Any, Mapping

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from star_jax import layouts
from star_jax.data import crop
from star_jax_datasets import common

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
SPLITS = ('train', 'test')
# Options of a build and their defaults (config.data.own in configs/own.py, flags of the build command).
OPTION_DEFAULTS = {'annotations': '', 'train': '', 'test': '', 'test_fraction': 0.1, 'split_seed': 0}
_CONFIG_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.-]*$')


@dataclasses.dataclass(eq=False)
class OwnFacesConfig(tfds.core.BuilderConfig):
  """One build of your own data (the name is its folder under <data_dir>/own_faces/).

  Attributes:
    layout: the layout, as `layouts.portable` writes it (a built-in name or a layout's JSON text).
    annotations: '' for .pts files beside the images; else a CSV / TSV file (relative to the manual
      folder, or absolute).
    train, test: '' or a folder (relative to the manual folder) or a text file listing image paths.
    test_fraction, split_seed: the random split used when no folder or list says otherwise.
  """
  layout: str = '300W'
  annotations: str = ''
  train: str = ''
  test: str = ''
  test_fraction: float = 0.1
  split_seed: int = 0

  def options(self) -> dict[str, Any]:
    """What decides the build's contents besides the raw files (JSON-serialisable)."""
    return {'layout': self.layout, **{k: getattr(self, k) for k in OPTION_DEFAULTS}}


@dataclasses.dataclass
class Face:
  """One annotated face: where it came from and its geometry (0-based pixels)."""
  image_path: pathlib.Path
  image_name: str
  landmarks: np.ndarray
  where: str                      # 'file' or 'file:line', for messages
  box: np.ndarray | None = None   # given by the annotation, else the landmarks' box is used
  scale: float | None = None      # given by an ADNet metadata file, else the box rule
  center: np.ndarray | None = None


def _image_beside(pts_path: pathlib.Path) -> pathlib.Path | None:
  for candidate in sorted(pts_path.parent.glob(pts_path.stem + '.*')):
    if candidate.suffix.lower() in IMAGE_SUFFIXES and candidate.is_file():
      return candidate
  return None


def _relative_name(path: pathlib.Path, root: pathlib.Path) -> str:
  try:
    return path.resolve().relative_to(root.resolve()).as_posix()
  except ValueError:
    return path.as_posix()  # an absolute path outside the folder: named as written


def _is_number(text: str) -> bool:
  try:
    float(text)
    return True
  except ValueError:
    return False


def read_pts_folder(root: pathlib.Path, layout: layouts.Layout) -> tuple[list[Face], list[str]]:
  """Every `.pts` file under `root` (sorted by path) with the image beside it; and the images that
  have no .pts file (relative names).

  Raises:
    FileNotFoundError: for a .pts file without an image beside it, or no .pts file at all.
    ValueError: naming the file and line, for a malformed .pts file or a point count other than the
      layout's.
  """
  pts_files = sorted(p for p in root.rglob('*.pts') if p.is_file())
  if not pts_files:
    raise FileNotFoundError(f'{root}: no .pts files (one beside each image), and no annotation file given '
                            '(data.own.annotations / --annotations) either')
  faces = []
  annotated = set()
  for pts_path in pts_files:
    image_path = _image_beside(pts_path)
    if image_path is None:
      raise FileNotFoundError(f'{pts_path}: no image beside it (looked for {pts_path.stem}.* with suffix '
                              f'{"/".join(IMAGE_SUFFIXES)})')
    annotated.add(image_path)
    faces.append(Face(image_path=image_path, image_name=_relative_name(image_path, root),
                      landmarks=common.read_pts(pts_path, layout.num_points, layout.name), where=str(pts_path)))
  unannotated = sorted(_relative_name(p, root) for p in root.rglob('*')
                       if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and p not in annotated)
  return faces, unannotated


def _delimiter(path: pathlib.Path, first_line: str) -> str:
  return '\t' if path.suffix.lower() == '.tsv' or '\t' in first_line else ','


def _data_lines(path: pathlib.Path) -> list[tuple[int, str]]:
  with open(path, encoding='utf-8-sig', newline='') as f:
    return [(i, line.rstrip('\r\n')) for i, line in enumerate(f, start=1)
            if line.strip() and not line.lstrip().startswith('#')]


def read_annotation_file(path: pathlib.Path, root: pathlib.Path, layout: layouts.Layout) -> tuple[list[Face], str]:
  """The faces of a CSV / TSV annotation file, in file order, and its format ('csv', 'tsv' or
  'adnet_tsv'). Image paths are relative to `root` (or absolute).

  Raises:
    ValueError: naming the file and line, for a malformed row or a point count other than the layout's.
    FileNotFoundError: naming the file and line, for an image that does not exist.
  """
  lines = _data_lines(path)
  if not lines:
    raise ValueError(f'{path}: no annotation rows')
  delimiter = _delimiter(path, lines[0][1])
  n = layout.num_points
  faces = []

  def image_of(text: str, where: str) -> tuple[pathlib.Path, str]:
    name = text.strip().replace('\\', '/')
    image_path = pathlib.Path(name) if pathlib.Path(name).is_absolute() else root / name
    if not image_path.is_file():
      raise FileNotFoundError(f'{where}: image {name!r} does not exist (paths are relative to {root})')
    return image_path, _relative_name(image_path, root)

  # ADNet / STAR metadata: tab-separated, the points as one comma-separated field.
  rows = [(i, next(csv.reader([line], delimiter=delimiter))) for i, line in lines]
  if delimiter == '\t' and any(len(fields) >= 6 and ',' in fields[1] and ',' in fields[2] for _, fields in rows[:2]):
    for row in crop.read_metadata_tsv(path, n):
      image_path, name = image_of(row.image_path, f'{path}:{row.line}')
      faces.append(Face(image_path=image_path, image_name=name, landmarks=row.landmarks, where=f'{path}:{row.line}',
                        scale=row.scale, center=row.center))
    return faces, 'adnet_tsv'

  for k, (line_no, fields) in enumerate(rows):
    where = f'{path}:{line_no}'
    values = [f.strip() for f in fields[1:]]
    if k == 0 and values and not _is_number(values[0]):
      continue  # a header row
    if len(values) not in (2 * n, 2 * n + 4):
      raise ValueError(f'{where}: expected the image path and {2 * n} coordinates ({n} points of the '
                       f'{layout.name} layout), optionally after the face box x_min, y_min, x_max, y_max '
                       f'({2 * n + 4} numbers); got {len(values)} numbers')
    try:
      numbers = np.array([float(v) for v in values], np.float64)
    except ValueError:
      bad = next(v for v in values if not _is_number(v))
      raise ValueError(f'{where}: {bad[:40]!r} is not a number') from None
    if not np.all(np.isfinite(numbers)):
      raise ValueError(f'{where}: coordinates must be finite')
    box = numbers[:4].astype(np.float32) if len(values) == 2 * n + 4 else None
    if box is not None and not (box[2] > box[0] and box[3] > box[1]):
      raise ValueError(f'{where}: the face box {box.tolist()} has no area (need x_min < x_max, y_min < y_max)')
    image_path, name = image_of(fields[0], where)
    faces.append(Face(image_path=image_path, image_name=name, where=where, box=box,
                      landmarks=numbers[-2 * n:].reshape(n, 2).astype(np.float32)))
  if not faces:
    raise ValueError(f'{path}: no annotation rows after the header')
  return faces, 'tsv' if delimiter == '\t' else 'csv'


def _read_list(path: pathlib.Path) -> list[tuple[int, str]]:
  return [(i, line.strip().replace('\\', '/')) for i, line in _data_lines(path)]


def _selector(value: str, root: pathlib.Path, faces: list[Face], what: str):
  """The set of image names that option `what` (a folder or a list file) selects."""
  path = pathlib.Path(value).expanduser()
  path = path if path.is_absolute() else root / path
  names = {f.image_name for f in faces}
  if path.is_dir():
    prefix = _relative_name(path, root).rstrip('/') + '/'
    selected = {name for name in names if name.startswith(prefix)}
    if not selected:
      raise ValueError(f'{what} folder {path}: no annotated image in it')
    return selected
  if path.is_file():
    selected = set()
    for line_no, name in _read_list(path):
      if name not in names:
        raise ValueError(f'{path}:{line_no}: no annotated face for image {name!r} (paths are relative to {root})')
      selected.add(name)
    if not selected:
      raise ValueError(f'{path}: the {what} list names no image')
    return selected
  raise FileNotFoundError(f'{what}: {value!r} is neither a folder nor a list file (looked for {path})')


def assign_splits(faces: list[Face], root: pathlib.Path, cfg: OwnFacesConfig) -> tuple[dict[str, set[str]], str]:
  """{'train', 'test'} -> image names, and how the split was made (for the metadata).

  Raises:
    ValueError: for an image in both splits, or an empty split.
  """
  names = sorted({f.image_name for f in faces})
  train, test = cfg.train, cfg.test
  if not train and not test and (root / 'train').is_dir() and (root / 'test').is_dir():
    train, test = 'train', 'test'
  if train or test:
    chosen = {split: _selector(value, root, faces, split) for split, value in (('train', train), ('test', test))
              if value}
    if 'train' not in chosen:
      chosen['train'] = set(names) - chosen['test']
    if 'test' not in chosen:
      chosen['test'] = set(names) - chosen['train']
    both = sorted(chosen['train'] & chosen['test'])
    if both:
      raise ValueError(f'{len(both)} image(s) are in both the train and the test split, e.g. {both[:5]}')
    unused = sorted(set(names) - chosen['train'] - chosen['test'])
    if unused:
      logging.warning('own_faces: %d annotated image(s) in neither split are not used, e.g. %s', len(unused),
                      unused[:5])
    how = f'given: train {train or "(the rest)"}, test {test or "(the rest)"}'
  else:
    fraction = float(cfg.test_fraction)
    if not 0 < fraction < 1:
      raise ValueError(f'test_fraction must be in (0, 1) when no train / test folders or lists are given, '
                       f'got {fraction}')
    if len(names) < 2:
      raise ValueError(f'{root}: {len(names)} annotated image(s); a train / test split needs at least 2')
    order = np.random.default_rng(int(cfg.split_seed)).permutation(len(names))
    num_test = min(max(int(round(fraction * len(names))), 1), len(names) - 1)
    test_names = {names[i] for i in order[:num_test]}
    chosen = {'train': set(names) - test_names, 'test': test_names}
    how = f'random: test_fraction {fraction:g}, split_seed {int(cfg.split_seed)}'
  for split in SPLITS:
    if not chosen[split]:
      raise ValueError(f'the {split} split is empty ({how})')
  return chosen, how


class Builder(common.FaceLandmarkBuilder):
  """Your own annotated photos with the record contract of star_jax (see star_jax_datasets/common.py).

  Records have `attributes` of length 0 (no per-subset flags). Make the builder with `config_from`.
  """

  BUILDER_CONFIGS = []
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  Put your photos in one folder (any sub-folders), with either
    - a .pts file beside each image (photo.jpg + photo.pts, the 300W / menpo format: 1-based x y per point), or
    - one CSV / TSV file: image path (relative to the folder), [x_min, y_min, x_max, y_max,] x0, y0, x1, y1, ...
      (0-based pixels; the box is optional), or an ADNet / STAR train.tsv-style metadata file;
  points in the order of your layout (config.layout: WFLW, 300W, COFW, or a layout file).
  Split: --train / --test folders or list files of image paths, or train/ and test/ sub-folders, or a random
  --test_fraction. Then:
    python -m star_jax.data.build --dataset own_faces --config NAME --manual_dir FOLDER --layout 300W
  (or train with configs/own.py and --config.data.manual_dir=FOLDER: it builds the dataset itself).
  """

  @classmethod
  def config_from(cls, name: str, *, layout, options: Mapping[str, Any] | None = None) -> OwnFacesConfig:
    """The build called `name` ('' = 'default') of layout `layout` (a name, layout file or Layout) with
    `options` (keys of OPTION_DEFAULTS; missing ones take their defaults)."""
    if layout is None or layout == '':
      raise ValueError('own_faces needs a layout: config.layout (or --layout), a built-in name '
                       f'({", ".join(sorted(layouts.LAYOUTS))}) or a layout file')
    options = dict(options or {})
    unknown = sorted(set(options) - set(OPTION_DEFAULTS))
    if unknown:
      raise ValueError(f'unknown own_faces option(s) {unknown}; the options are {sorted(OPTION_DEFAULTS)}')
    name = name or 'default'
    if not _CONFIG_NAME.match(name):
      raise ValueError(f'own_faces build name {name!r}: use letters, digits, "_", "-" and "." (it names a folder)')
    # Cast to the defaults' types: the stored options compare equal whether they came as '0.5' or 0.5.
    values = {k: type(default)(default if options.get(k) is None else options[k])
              for k, default in OPTION_DEFAULTS.items()}
    return OwnFacesConfig(name=name, layout=layouts.portable(layout), description='your own annotated photos',
                          **values)

  @property
  def LAYOUT(self) -> layouts.Layout:  # pylint: disable=invalid-name
    cfg = self.builder_config
    if cfg is None:
      raise ValueError('own_faces has no default build: make the builder with Builder.config_from(...) '
                       '(star_jax.data.build does)')
    # Your own data records no attribute flags, whatever the layout's.
    return dataclasses.replace(layouts.get_layout(cfg.layout), attributes=())

  def _info(self) -> tfds.core.DatasetInfo:
    layout = self.LAYOUT
    return self.dataset_info_from_configs(
        features=common.face_features(layout),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(layout=layout.name, num_points=layout.num_points,
                                        options=self.builder_config.options()),
    )

  def check_options(self, manual_dir: str = '') -> None:
    """Raises ValueError when this name was built in another layout or, when `manual_dir` is given (the
    raw files are meant to be what is read), with other options or from another folder: a stale
    build would be used silently."""
    metadata = self.info.metadata or {}
    built = dict(metadata.get('options') or {})
    if not built:
      return
    want = self.builder_config.options()
    if manual_dir:
      built['manual_dir'] = metadata.get('manual_dir')
      want['manual_dir'] = str(pathlib.Path(manual_dir).expanduser().resolve())
    else:
      built, want = {'layout': built.get('layout')}, {'layout': want['layout']}
    if built == want:
      return
    changed = {k: (built.get(k), v) for k, v in want.items() if built.get(k) != v}
    detail = '; '.join(f'{k}: built with {b!r}, now {w!r}' for k, (b, w) in changed.items())
    raise ValueError(f'own_faces build {self.builder_config.name!r} in {self.data_dir} was made with other '
                     f'options ({detail}). Give it another name (data.config / --config) or delete that folder '
                     'to rebuild it.')

  def _split_generators(self, dl_manager):
    root = self._checked_manual_dir(dl_manager, ['your photos with their annotations'])
    layout = self.LAYOUT
    cfg = self.builder_config
    if cfg.annotations:
      path = pathlib.Path(cfg.annotations).expanduser()
      path = path if path.is_absolute() else root / path
      if not path.is_file():
        raise FileNotFoundError(f'annotation file {path} does not exist')
      faces, fmt = read_annotation_file(path, root, layout)
      unannotated = []
    else:
      (faces, unannotated), fmt = read_pts_folder(root, layout), 'pts'
    if unannotated:
      logging.warning('own_faces: %d image(s) without a .pts file are not used, e.g. %s', len(unannotated),
                      unannotated[:5])
    chosen, how = assign_splits(faces, root, cfg)
    self.info.metadata.update(annotation_format=fmt, split=how, images_without_annotation=len(unannotated),
                              manual_dir=str(root.resolve()))
    return {split: self._generate_examples(faces, chosen[split], split) for split in SPLITS}

  def _generate_examples(self, faces: list[Face], names: set[str], split: str):
    official = 0
    index = 0
    for face in faces:
      if face.image_name not in names:
        continue
      box = face.box if face.box is not None else crop.landmarks_box(face.landmarks)
      if face.scale is not None:
        scale, center = face.scale, face.center
        official += 1
      else:
        try:
          scale, center = crop.box_rule(box)
        except ValueError as e:
          raise ValueError(f'{face.where}: {e}') from None
      yield index, common.face_record(
          image=common.record_image(face.image_path.read_bytes(), str(face.image_path)),
          landmarks=face.landmarks, box=box, scale=scale, center=center, attributes=np.zeros(0, np.int32),
          image_name=face.image_name)
      index += 1
    self.info.metadata.setdefault('crop_rule', {})[split] = crop.OFFICIAL_TSV if official else crop.BOX_RULE
    logging.info('own_faces %s: %d faces (%d images)', split, index, len(names))
