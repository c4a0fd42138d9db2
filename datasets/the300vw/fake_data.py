"""Builds a tiny 300VW-style manual folder for tests: short MJPG videos made from real photos.

Each video shows one of the given photos (tests/testdata/real_faces) on a black frame, moving a few pixels
per frame; `annot/<frame:06d>.pts` holds its 68 points moved with it (1-based, as 300VW's). A
300vw_splits.json names the videos of each split, since the tiny folder lacks the real ones.
"""

from __future__ import annotations

import json
import pathlib

import cv2
import numpy as np

FRAME_SIZE = (320, 272)  # (width, height); even, as video encoders like
# video id -> (split, source photo stem, number of frames)
VIDEOS = {
    '001': ('train', 'breakingbad', 3),
    '002': ('train', 'takeo', 2),
    '114': ('test_category1', 'einstein', 3),
    '203': ('test_category2', 'takeo', 3),
    '410': ('test_category3', 'breakingbad', 2),
}


def _pts_points(path: pathlib.Path) -> np.ndarray:
  lines = [line.strip() for line in path.read_text().splitlines()]
  start, end = lines.index('{'), lines.index('}')
  return np.array([[float(v) for v in line.split()] for line in lines[start + 1:end]], np.float64)


def write_pts(path: pathlib.Path, points_1based: np.ndarray) -> None:
  body = '\n'.join(f'{x:.3f} {y:.3f}' for x, y in points_1based)
  path.write_text(f'version: 1\nn_points:  {len(points_1based)}\n{{\n{body}\n}}\n')


def offset(frame: int) -> tuple[int, int]:
  """Where the photo's top-left corner is in frame `frame` (1-based): it drifts right and down."""
  return 10 + 4 * (frame - 1), 6 + 3 * (frame - 1)


def write(root, real_faces, videos=None) -> dict[str, dict]:
  """Writes the folder under `root`; returns {video: {'split', 'frames' (count), 'landmarks' (frames, 68, 2)
  0-based frame pixels}}."""
  root, real_faces = pathlib.Path(root), pathlib.Path(real_faces)
  videos = VIDEOS if videos is None else videos
  out = {}
  for vid, (split, stem, num_frames) in videos.items():
    photo = next(p for p in sorted(real_faces.glob(f'{stem}.*')) if p.suffix != '.pts')
    image = cv2.imread(str(photo), cv2.IMREAD_COLOR)
    points = _pts_points(real_faces / f'{stem}.pts')             # 1-based
    (root / vid / 'annot').mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(root / vid / 'vid.avi'), cv2.VideoWriter_fourcc(*'MJPG'), 25, FRAME_SIZE)
    if not writer.isOpened():
      raise RuntimeError('OpenCV cannot write MJPG .avi videos here')
    landmarks = []
    for frame in range(1, num_frames + 1):
      dx, dy = offset(frame)
      canvas = np.zeros((FRAME_SIZE[1], FRAME_SIZE[0], 3), np.uint8)
      h, w = image.shape[:2]
      h, w = min(h, FRAME_SIZE[1] - dy), min(w, FRAME_SIZE[0] - dx)
      canvas[dy:dy + h, dx:dx + w] = image[:h, :w]
      writer.write(canvas)
      moved = points + (dx, dy)
      write_pts(root / vid / 'annot' / f'{frame:06d}.pts', moved)
      landmarks.append(moved - 1)
    writer.release()
    out[vid] = {'split': split, 'frames': num_frames, 'landmarks': np.stack(landmarks).astype(np.float32)}
  splits: dict[str, list[str]] = {}
  for vid, info in out.items():
    splits.setdefault(info['split'], []).append(vid)
  (root / '300vw_splits.json').write_text(json.dumps(splits, indent=1))
  return out
