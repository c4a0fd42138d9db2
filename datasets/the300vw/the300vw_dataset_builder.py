"""300VW: 114 videos with 68 landmarks on every frame (Shen et al., ICCV-W 2015), in the benchmark's split.

Train = the 50 training videos; test = three categories of videos (Chrysos et al. 2015, Shen et al.
2015): 1, well lit (31 videos); 2, mild unconstrained (19); 3, challenging (14). One record per
annotated frame, read from the video with OpenCV, keyed in the order (video, frame).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Iterator

from absl import logging
import cv2
import numpy as np
import tensorflow_datasets as tfds

from star_jax import layouts
from star_jax.data import crop
from star_jax_datasets import common

HOMEPAGE = 'https://ibug.doc.ic.ac.uk/resources/300-VW/'
NUM_POINTS = 68
DATASET_DIR = '300VW_Dataset_2015_12_14'
VIDEO_FILE = 'vid.avi'
ANNOTATION_DIR = 'annot'
# Optional, in the manual folder: {"<split>": [video ids], ...} replacing the lists below.
SPLITS_FILE = '300vw_splits.json'

# The benchmark's split (Shen et al., "The First Facial Landmark Tracking in-the-Wild Challenge:
# Benchmark and Results", ICCV-W 2015; categories as in Chrysos et al., "Offline Deformable Face
# Tracking in Arbitrary Videos", ICCV-W 2015). Written from the 300VW definition; they agree with the
# lists in the 300VW evaluation code of OpenFace (Baltrusaitis et al.) and of SBR (Dong et al., CVPR
# 2018). Check them against the readme of your copy of the dataset; a 300vw_splits.json in the manual
# folder overrides any of them.
TRAIN_VIDEOS = (
    '001', '002', '003', '004', '007', '009', '010', '011', '013', '015', '016', '017', '018', '019', '020',
    '022', '025', '027', '028', '029', '031', '033', '034', '035', '037', '039', '041', '043', '044', '046',
    '047', '048', '049', '053', '057', '059', '112', '113', '115', '119', '120', '123', '138', '143', '144',
    '160', '204', '205', '223', '225',
)
CATEGORY_VIDEOS = {
    # Category 1: well-lit, laboratory-like conditions.
    1: ('114', '124', '125', '126', '150', '158', '401', '402', '505', '506', '507', '508', '509', '510', '511',
        '514', '515', '518', '519', '520', '521', '522', '524', '525', '537', '538', '540', '541', '546', '547',
        '548'),
    # Category 2: mild unconstrained conditions (illumination, dark rooms, overexposure).
    2: ('203', '208', '211', '212', '213', '214', '218', '224', '403', '404', '405', '406', '407', '408', '409',
        '412', '550', '551', '553'),
    # Category 3: challenging, completely unconstrained (illumination, occlusions, make-up, expression, head pose).
    3: ('410', '411', '516', '517', '526', '528', '529', '530', '531', '533', '557', '558', '559', '562'),
}
SPLITS = {'train': TRAIN_VIDEOS, **{f'test_category{k}': v for k, v in CATEGORY_VIDEOS.items()}}
# The three test splits, read together; records carry their category in `attributes`.
TEST_SPLIT = '+'.join(f'test_category{k}' for k in CATEGORY_VIDEOS)

# Records hold a square window of the frame around the face, not the whole frame: this many crop sides
# wide (the crop is `scale` x 200 px), enough for the training augmentation's shift, scale and rotation
# at three sigma, and about a tenth of the storage of whole frames (~220,000 of them).
WINDOW_CROP_SIDES = 2.5
JPEG_QUALITY = 95


def video_id(value) -> str:
  """A video folder name: ints and digit strings as 3 digits ('1' -> '001'), other strings as they are."""
  text = str(value).strip()
  return f'{int(text):03d}' if text.isdigit() else text


def read_splits_file(path: pathlib.Path) -> dict[str, tuple[str, ...]]:
  """The split lists of a 300vw_splits.json, {split: video ids}; only the splits it names.

  Raises:
    ValueError: naming the file (and the line, for JSON syntax), for anything malformed.
  """
  try:
    data = json.loads(path.read_text(encoding='utf-8'))
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}:{e.lineno}: not valid JSON: {e.msg}') from None
  if not isinstance(data, dict):
    raise ValueError(f'{path}: expected {{"<split>": [video ids]}} with splits {sorted(SPLITS)}')
  unknown = sorted(set(data) - set(SPLITS))
  if unknown:
    raise ValueError(f'{path}: unknown split(s) {unknown}; the splits are {sorted(SPLITS)}')
  out = {}
  for split, ids in data.items():
    if not isinstance(ids, list) or not ids:
      raise ValueError(f'{path}: "{split}" must be a non-empty list of video ids, got {ids!r}')
    out[split] = tuple(video_id(v) for v in ids)
  return out


def split_videos(manual_dir: pathlib.Path) -> tuple[dict[str, tuple[str, ...]], str]:
  """{split: video ids}: the benchmark's, with the splits a 300vw_splits.json names replaced; and the
  lists' source, for the metadata.

  Raises:
    ValueError: for a video in two splits.
  """
  splits = dict(SPLITS)
  source = 'the 300VW benchmark (built in)'
  path = manual_dir / SPLITS_FILE
  if path.is_file():
    override = read_splits_file(path)
    splits.update(override)
    source = f'{path.name}: {sorted(override)}; the rest built in'
  seen: dict[str, str] = {}
  for split, ids in splits.items():
    for vid in ids:
      if vid in seen and seen[vid] != split:
        raise ValueError(f'video {vid} is in both {seen[vid]} and {split} ({source})')
      seen[vid] = split
  return splits, source


def read_annotations(video_dir: pathlib.Path) -> dict[int, pathlib.Path]:
  """{frame number (1-based): .pts path} of one video.

  Raises:
    ValueError: for a .pts file whose name is not a frame number.
  """
  out = {}
  for path in sorted((video_dir / ANNOTATION_DIR).glob('*.pts')):
    if not path.stem.isdigit() or int(path.stem) < 1:
      raise ValueError(f'{path}: the name of a 300VW annotation is its frame number (1-based, e.g. 000001.pts)')
    out[int(path.stem)] = path
  return out


def video_frames(path: pathlib.Path, wanted: set[int]) -> Iterator[tuple[int, np.ndarray | None]]:
  """(frame number, BGR frame) for every frame of the video in order, 1-based; the frame is None for
  frames not in `wanted` (skipped without decoding). Ends when OpenCV reads no more frames.

  Raises:
    ValueError: when OpenCV cannot open the video.
  """
  capture = cv2.VideoCapture(str(path))
  if not capture.isOpened():
    raise ValueError(f'{path}: OpenCV cannot open this video (corrupt, or no decoder for its codec)')
  try:
    number = 0
    while True:
      number += 1
      if number in wanted:
        ok, frame = capture.read()
      else:
        ok, frame = capture.grab(), None
      if not ok:
        return
      yield number, frame
  finally:
    capture.release()


def frame_count_property(path: pathlib.Path) -> int:
  """The frame count the video's container claims (CAP_PROP_FRAME_COUNT; may be wrong)."""
  capture = cv2.VideoCapture(str(path))
  try:
    return int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
  finally:
    capture.release()


def face_window(center, scale: float, width: int, height: int) -> tuple[int, int, int, int]:
  """(x0, y0, x1, y1): the square of WINDOW_CROP_SIDES crop sides around `center`, within the frame
  (the whole frame when the face lies outside it)."""
  half = WINDOW_CROP_SIDES * scale * crop.FACE_SIDE_PX / 2
  cx, cy = float(center[0]), float(center[1])
  x0, y0 = max(math.floor(cx - half), 0), max(math.floor(cy - half), 0)
  x1, y1 = min(math.ceil(cx + half), width), min(math.ceil(cy + half), height)
  if x1 <= x0 or y1 <= y0:
    return 0, 0, width, height
  return x0, y0, x1, y1


class Builder(common.FaceLandmarkBuilder):
  """300VW with the record contract of star_jax (see star_jax_datasets/common.py).

  Extra features: 'video' (its folder name), 'frame' (1-based frame number), 'frame_offset' (2,)
  float32: the window's top-left corner in the frame (add it to a record's coordinates for frame
  pixels). `attributes` = (category1, category2, category3) flags, zeros on train.
  """

  LAYOUT = layouts.W300VW
  HOMEPAGE = HOMEPAGE
  EXTRA_FEATURES = {
      'video': tfds.features.Text(),
      'frame': tfds.features.Scalar(dtype=np.int32),
      'frame_offset': tfds.features.Tensor(shape=(2,), dtype=np.float32),
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = f"""
  1. Download 300VW (300VW_Dataset_2015_12_14.zip) from {HOMEPAGE} and extract it: one folder per video
     (001/, 002/, ...), each with {VIDEO_FILE} and {ANNOTATION_DIR}/<frame>.pts (68 points, 1-based pixels).
  2. --manual_dir is that {DATASET_DIR}/ folder (or the folder holding it).
  3. Optional: {SPLITS_FILE} in it, {{"train": [...], "test_category1": [...], ...}}, to replace the built-in
     video lists of any split (e.g. after checking them against the dataset's readme).
  4. Optional, for an official crop: ADNet / STAR-style metadata <split>.tsv (train.tsv, test_category1.tsv, ...,
     or one test.tsv for the three categories) in the same folder, naming frames <video>/<frame:06d>.<ext>
     under any prefix (others are matched by their landmarks alone, slowly); without them the crop comes
     from the landmarks' box by the STAR authors' rule.
  5. Build: python -m star_jax.data.build --dataset the300vw --manual_dir <that folder>
     (reads every frame of the 114 videos: about an hour on a few cores).
  """

  def _root(self, dl_manager) -> pathlib.Path:
    manual_dir = self._checked_manual_dir(dl_manager, [f'{DATASET_DIR}/ (the extracted videos), from {HOMEPAGE}'])
    return manual_dir / DATASET_DIR if (manual_dir / DATASET_DIR).is_dir() else manual_dir

  def _split_generators(self, dl_manager):
    root = self._root(dl_manager)
    splits, source = split_videos(root)
    missing = []
    for ids in splits.values():
      for vid in ids:
        if not (root / vid / VIDEO_FILE).is_file():
          missing.append(f'{vid}/{VIDEO_FILE}')
        if not (root / vid / ANNOTATION_DIR).is_dir():
          missing.append(f'{vid}/{ANNOTATION_DIR}/ (the .pts files)')
    if missing:
      if len(missing) >= 2 * sum(len(ids) for ids in splits.values()):
        missing = [f'every video folder ({sum(len(v) for v in splits.values())} of them, e.g. '
                   f'{next(iter(splits.values()))[0]}/): is this the {DATASET_DIR} folder?']
      raise FileNotFoundError(common.missing_files_message(self.name, root, missing,
                                                           self.MANUAL_DOWNLOAD_INSTRUCTIONS))
    listed = {vid for ids in splits.values() for vid in ids}
    extra = sorted(p.name for p in root.iterdir() if (p / VIDEO_FILE).is_file() and p.name not in listed)
    if extra:
      logging.warning('the300vw: %d video folder(s) in no split are not used: %s', len(extra), extra)
    self.info.metadata.update(split_source=source, videos={k: list(v) for k, v in splits.items()},
                              window_crop_sides=WINDOW_CROP_SIDES, jpeg_quality=JPEG_QUALITY)
    return {split: self._generate_examples(root, split, ids) for split, ids in splits.items()}

  def _crop_rule(self, manual_dir: pathlib.Path, split: str) -> crop.CropRule:
    # One test.tsv for the three categories serves each of them (its faces are matched per frame).
    if split.startswith('test_') and not (manual_dir / f'{split}.tsv').is_file() and (manual_dir / 'test.tsv').is_file():
      rule = crop.CropRule(crop.CropTable.from_tsv(manual_dir / 'test.tsv', NUM_POINTS))
      logging.info('the300vw %s: crop rule %s (test.tsv)', split, rule.name)
      return rule
    return super()._crop_rule(manual_dir, split)

  def _attributes(self, split: str) -> np.ndarray:
    flags = np.zeros(len(self.LAYOUT.attributes), np.int32)
    if split.startswith('test_category'):
      flags[self.LAYOUT.attributes.index(split[len('test_'):])] = 1
    return flags

  def _generate_examples(self, root: pathlib.Path, split: str, videos):
    rule = self._crop_rule(root, split)
    attributes = self._attributes(split)
    index = 0
    checks = self.info.metadata.setdefault('frame_check', {})
    for vid in videos:
      video_path = root / vid / VIDEO_FILE
      annotations = read_annotations(root / vid)
      if not annotations:
        raise FileNotFoundError(f'{root / vid / ANNOTATION_DIR}: no .pts files')
      decoded = 0
      for number, frame in video_frames(video_path, set(annotations)):
        decoded = number
        if frame is None:
          continue
        landmarks = common.read_pts(annotations[number], NUM_POINTS, self.LAYOUT.name)
        box = crop.landmarks_box(landmarks)
        image_name = f'{vid}/{number:06d}.jpg'
        scale, center = rule(image_name, landmarks, box)
        x0, y0, x1, y1 = face_window(center, scale, frame.shape[1], frame.shape[0])
        ok, jpeg = cv2.imencode('.jpg', np.ascontiguousarray(frame[y0:y1, x0:x1]),
                                [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        if not ok:
          raise ValueError(f'{video_path} frame {number}: cannot encode the face window as JPEG')
        offset = np.array([x0, y0], np.float32)
        # Keyed by video and frame (TFDS checks they are unique); records keep the order they are read in.
        yield f'{vid}/{number:06d}', common.face_record(
            image=jpeg.tobytes(), landmarks=landmarks - offset, box=box - np.tile(offset, 2), scale=scale,
            center=np.asarray(center, np.float32) - offset, attributes=attributes, image_name=image_name,
            video=vid, frame=np.int32(number), frame_offset=offset)
        index += 1
      check = self._check_frames(video_path, decoded, annotations)
      if check:
        checks[vid] = check
    self._finish_split(split, rule, index, f' ({len(videos)} videos)')

  def _check_frames(self, video_path: pathlib.Path, decoded: int, annotations: dict[int, pathlib.Path]) -> dict:
    """Compares the frames OpenCV read with the annotations; says so (and returns what differs) when
    they disagree."""
    claimed = frame_count_property(video_path)
    no_frame = sorted(n for n in annotations if n > decoded)
    unannotated = decoded - sum(1 for n in annotations if n <= decoded)
    if not no_frame and not unannotated and claimed == decoded:
      return {}
    check = {'frames_read': decoded, 'frame_count_property': claimed, 'annotations': len(annotations),
             'annotations_without_frame': len(no_frame), 'frames_without_annotation': unannotated}
    problems = []
    if no_frame:
      problems.append(f'{len(no_frame)} annotation(s) beyond the last frame (frames {no_frame[0]}..'
                      f'{no_frame[-1]}) are skipped')
    if unannotated:
      problems.append(f'{unannotated} frame(s) have no annotation')
    if claimed != decoded:
      problems.append(f'the container claims {claimed} frames')
    logging.warning('the300vw: %s: OpenCV read %d frames, %d annotations: %s', video_path, decoded,
                    len(annotations), '; '.join(problems))
    return check
