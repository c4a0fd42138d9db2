"""Shared parts of the face-landmark builders: the record contract, image checks, error messages.

Every builder (WFLW, 300W, COFW, and the synthetic faces with the same contract) yields records with:
  'image'       encoded JPEG / PNG bytes, RGB, 3 channels (greyscale sources converted);
  'landmarks'   float32 (N, 2), 0-based pixel (x, y);
  'box'         float32 (4,) x_min, y_min, x_max, y_max;
  'scale'       float32, crop scale (face side / 200 px), see star_jax/data/crop.py;
  'center'      float32 (2,) crop centre (center_w, center_h);
  'attributes'  int32 (K,) 0/1 flags in the order of the layout's `attributes`;
  'image_name'  text, the image's path relative to the dataset root;
plus dataset extras. Records are stored in array_record files (readable by `tfds.data_source`
without TensorFlow) in the order of their integer keys, i.e. the order of the raw annotations.
"""

from __future__ import annotations

import io
import pathlib
from typing import Any, Callable

from absl import logging
import cv2
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from star_jax import layouts
from star_jax.data import crop
from star_jax.data import annotations
from star_jax.data.annotations import AnnotationError

# The STAR README sends to ADNet's metadata: links in the "Resources" table of this page.
STAR_METADATA_URL = 'https://github.com/huangyangyu/ADNet'

_JPEG_MAGIC = b'\xff\xd8\xff'
_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'
_EXIF_ORIENTATION = 0x0112


def face_features(layout: layouts.Layout, extra: dict[str, Any] | None = None):
  """The FeaturesDict of the record contract for `layout`, plus `extra` features."""
  features = {
      'image': tfds.features.Image(shape=(None, None, 3), dtype=np.uint8),
      'landmarks': tfds.features.Tensor(shape=(layout.num_points, 2), dtype=np.float32),
      'box': tfds.features.Tensor(shape=(4,), dtype=np.float32),
      'scale': tfds.features.Scalar(dtype=np.float32),
      'center': tfds.features.Tensor(shape=(2,), dtype=np.float32),
      'attributes': tfds.features.Tensor(shape=(len(layout.attributes),), dtype=np.int32),
      'image_name': tfds.features.Text(),
  }
  features.update(extra or {})
  return tfds.features.FeaturesDict(features)


def face_record(*, image: bytes, landmarks, box, scale, center, attributes, image_name: str,
                **extra) -> dict[str, Any]:
  """A record of the contract, with every array cast to its stored dtype."""
  record = {
      'image': image,
      'landmarks': np.asarray(landmarks, np.float32),
      'box': np.asarray(box, np.float32).reshape(4),
      'scale': np.float32(scale),
      'center': np.asarray(center, np.float32).reshape(2),
      'attributes': np.asarray(attributes, np.int32),
      'image_name': image_name,
  }
  record.update(extra)
  return record


def _png_is_rgb8(data: bytes) -> bool:
  # IHDR is the first chunk: bit depth at byte 24, colour type at byte 25 (2 = truecolour RGB).
  return len(data) > 25 and data[24] == 8 and data[25] == 2


def _exif_rotated(image: Image.Image) -> bool:
  try:
    return image.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1)
  except Exception:  # pylint: disable=broad-except
    return False  # unreadable EXIF: OpenCV ignores it too


def encode_rgb(rgb: np.ndarray) -> bytes:
  """PNG bytes of an (H, W, 3) uint8 RGB array (lossless)."""
  ok, buffer = cv2.imencode('.png', np.ascontiguousarray(rgb[..., ::-1]))
  if not ok:
    raise ValueError(f'could not encode an image of shape {rgb.shape} as PNG')
  return buffer.tobytes()


def record_image(data: bytes, source: str) -> bytes:
  """Checks an image file's bytes and returns what the record stores: RGB JPEG or PNG bytes.

  The image is decoded as the official loader does (OpenCV `IMREAD_COLOR`: 8 bit, 3 channels, EXIF
  orientation applied; PIL for what OpenCV cannot read, like GIF). Files that TFDS's reader decodes
  to the same pixels (8-bit colour JPEG or RGB PNG without an EXIF rotation) are kept as they are;
  anything else (greyscale, alpha, 16 bit, CMYK, rotated, other formats) is stored as a lossless
  RGB PNG of the decoded pixels.

  Args:
    data: the file's bytes.
    source: where they come from, for messages.

  Raises:
    ValueError: naming `source`, when the bytes are not a readable image.
  """
  bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
  if bgr is None:
    try:
      with Image.open(io.BytesIO(data)) as image:
        rgb = np.asarray(image.convert('RGB'))
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f'{source}: cannot decode the image (corrupt or not an image file): {e}') from e
    return encode_rgb(rgb)
  try:
    with Image.open(io.BytesIO(data)) as image:
      keep = (not _exif_rotated(image)) and (
          (data.startswith(_JPEG_MAGIC) and image.format == 'JPEG' and image.mode == 'RGB') or
          (data.startswith(_PNG_MAGIC) and _png_is_rgb8(data)))
  except Exception:  # pylint: disable=broad-except
    keep = False  # OpenCV reads it, PIL does not: re-encode what OpenCV decoded
  return data if keep else encode_rgb(bgr[..., ::-1])


def read_pts(path, num_points: int, layout_name: str = '') -> np.ndarray:
  """Reads an iBUG / menpo .pts file: (num_points, 2) float32 landmarks, converted to 0-based pixels.

  The format: header lines 'key: value' ('version: 1', 'n_points: N'), '{', N lines 'x y', '}';
  blank lines anywhere, nothing else after '}'. Coordinates are plain finite decimals. iBUG
  coordinates are 1-based (MATLAB convention), so 1 is subtracted.

  Args:
    path: the file.
    num_points: the points the layout expects.
    layout_name: the layout's name, for messages.

  Raises:
    AnnotationError (a ValueError) naming the file and line, for a malformed file or a point count
    other than num_points.
  """
  path = pathlib.Path(path)
  note = f' (the {layout_name} layout)' if layout_name else ''
  points = []
  state = 'header'  # -> 'points' at '{' -> 'done' at '}'
  open_line = last_line = 0
  for line_no, line in enumerate(annotations.text_lines(path.read_bytes(), str(path)), start=1):
    line = line.strip()
    if not line:
      continue
    where, last_line = f'{path}:{line_no}', line_no
    if state == 'header' and line == '{':
      state, open_line = 'points', line_no
    elif state == 'header':
      key, colon, value = line.partition(':')
      if not colon:
        raise AnnotationError(where, f"expected a header line 'key: value' or '{{', got {line[:60]!r}")
      if key.strip() == 'n_points' and value.strip() != str(num_points):
        raise AnnotationError(where, f'n_points is {value.strip()[:20]}, expected {num_points}{note}')
    elif state == 'points' and line == '}':
      if len(points) != num_points:
        raise AnnotationError(where, f'expected {num_points} points{note} between {{ (line {open_line}) and }}, '
                                     f'got {len(points)}')
      state = 'done'
    elif state == 'points':
      values = line.split()
      if len(values) != 2:
        raise AnnotationError(where, f'expected a point "x y", got {line[:60]!r}')
      points.append(annotations.numbers(values, where, 'point coordinates'))
    else:
      raise AnnotationError(where, f"unexpected line {line[:60]!r} after the point list's closing }}")
  if not last_line:
    raise AnnotationError(str(path), 'the file is empty')
  if state == 'header':
    raise AnnotationError(f'{path}:{last_line}', "the file ends with no point list (the points go between "
                                                 "lines '{' and '}')")
  if state == 'points':
    raise AnnotationError(f'{path}:{last_line}', f"the file ends, but the point list opened at line {open_line} "
                                                 "is not closed by a line '}'")
  return np.array(points, np.float32) - 1.0


def missing_files_message(dataset: str, manual_dir, missing: list[str], instructions: str,
                          problem: str = 'incomplete manual download folder') -> str:
  """An error text listing what is missing from `manual_dir`, followed by the download steps."""
  lines = [f'{dataset}: {problem} {manual_dir}. Missing:']
  lines += [f'  - {m}' for m in missing]
  lines += ['How to get them:', instructions.strip('\n')]
  return '\n'.join(lines)


class FaceLandmarkBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the manual-download face-landmark builders (not registered itself).

  Subclasses set LAYOUT, HOMEPAGE, MANUAL_DOWNLOAD_INSTRUCTIONS and EXTRA_FEATURES, and implement
  `_split_generators` / `_generate_examples` with the helpers below. Files are written as
  array_record unless the caller asks otherwise, so `tfds.data_source` reads them without TensorFlow.

  A malformed annotation or unreadable image stops the build with an AnnotationError naming the file
  and line, unless the builder is made with `skip_bad_examples=True`: then such examples are left
  out, logged, and listed per split in the dataset's metadata ('skipped': count and messages).
  """

  # At most this many messages per split are kept in the metadata (the count is always exact).
  MAX_SKIPPED_LISTED = 1000

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  LAYOUT: layouts.Layout
  HOMEPAGE = ''
  EXTRA_FEATURES: dict[str, Any] = {}

  def __init__(self, *, file_format=None, skip_bad_examples: bool = False, **kwargs):
    self.skip_bad_examples = bool(skip_bad_examples)
    self._skipped: dict[str, list[str]] = {}
    super().__init__(file_format=file_format or 'array_record', **kwargs)

  def _skipper(self, split: str) -> Callable[[AnnotationError], None] | None:
    """None when bad examples stop the build; else the function that records one of `split`."""
    if not self.skip_bad_examples:
      return None
    skipped = self._skipped.setdefault(split, [])

    def skip(error: Exception) -> None:
      skipped.append(str(error))
      logging.warning('%s %s: skipping a bad example: %s', self.name, split, error)
    return skip

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=face_features(self.LAYOUT, dict(self.EXTRA_FEATURES)),
        homepage=self.HOMEPAGE,
        # Keep the order of the raw annotations (integer keys): record i of the test split is the
        # i-th face of the official list. Training shuffles in the input pipeline.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(layout=self.LAYOUT.name),
    )

  def _checked_manual_dir(self, dl_manager, required: list[str]) -> pathlib.Path:
    """The manual folder, or an error listing `required` when it is missing or empty."""
    try:
      return pathlib.Path(dl_manager.manual_dir)
    except AssertionError:
      path = getattr(dl_manager, '_manual_dir', None)
      raise FileNotFoundError(missing_files_message(
          self.name, path, required, self.MANUAL_DOWNLOAD_INSTRUCTIONS,
          problem='missing or empty manual download folder')) from None

  def _crop_rule(self, manual_dir: pathlib.Path, split: str) -> crop.CropRule:
    rule = crop.rule_for_split(manual_dir, split, self.LAYOUT.num_points, skip=self._skipper(split))
    logging.info('%s %s: crop rule %s', self.name, split, rule.name)
    return rule

  def _finish_split(self, split: str, rule: crop.CropRule, count: int, detail: str = '') -> None:
    """Records the crop rule of a generated split in the metadata and logs the counts."""
    rule.check()
    summary = rule.summary()
    self.info.metadata.setdefault('crop_rule', {})[split] = rule.name
    self.info.metadata.setdefault('crop', {})[split] = summary
    logging.info('%s %s: %d faces%s; crop %s', self.name, split, count, detail, summary)
    if self.skip_bad_examples:
      skipped = self._skipped.get(split, [])
      self.info.metadata.setdefault('skipped', {})[split] = {
          'count': len(skipped), 'examples': skipped[:self.MAX_SKIPPED_LISTED]}
      if skipped:
        logging.warning('%s %s: skipped %d bad examples (listed in the dataset metadata), e.g. %s', self.name,
                        split, len(skipped), skipped[:3])
    if rule.fallbacks:
      logging.warning('%s %s: %d faces not in %s got the box rule, e.g. %s', self.name, split,
                      len(rule.fallbacks), rule.table.source, rule.fallbacks[:5])
