"""Builds a tiny folder of "your own" annotated photos for tests, from real photos with .pts files.

Each photo (tests/testdata/real_faces: 68 points) is written twice: as it is, and shifted on a larger grey
canvas (its points moved with it), so that a handful of photos give a train / test split. Writers for
the same faces as .pts files, as a CSV / TSV annotation file, or as an ADNet-style metadata file.
"""

from __future__ import annotations

import csv
import pathlib

import cv2
import numpy as np

STEMS = ('breakingbad', 'einstein', 'takeo')
PAD = (17, 9)  # (left, top) of the shifted copies, in pixels


def _pts_points(path: pathlib.Path) -> np.ndarray:
  lines = [line.strip() for line in path.read_text().splitlines()]
  start, end = lines.index('{'), lines.index('}')
  return np.array([[float(v) for v in line.split()] for line in lines[start + 1:end]], np.float64)


def write_pts(path: pathlib.Path, points_0based: np.ndarray) -> None:
  """An iBUG .pts file of 0-based points (written 1-based, as the format is)."""
  body = '\n'.join(f'{x + 1:.3f} {y + 1:.3f}' for x, y in points_0based)
  path.write_text(f'version: 1\nn_points:  {len(points_0based)}\n{{\n{body}\n}}\n')


def faces(real_faces) -> list[dict]:
  """[{'name', 'image' (BGR), 'landmarks' (68, 2) 0-based}], in name order: each photo and its shifted copy."""
  real_faces = pathlib.Path(real_faces)
  out = []
  for stem in STEMS:
    source = next(p for p in sorted(real_faces.glob(f'{stem}.*')) if p.suffix != '.pts')
    image = cv2.imread(str(source), cv2.IMREAD_COLOR)
    points = _pts_points(real_faces / f'{stem}.pts') - 1
    h, w = image.shape[:2]
    canvas = np.full((h + 2 * PAD[1], w + 2 * PAD[0], 3), 128, np.uint8)
    canvas[PAD[1]:PAD[1] + h, PAD[0]:PAD[0] + w] = image
    out.append({'name': f'{stem}.png', 'image': image, 'landmarks': points})
    out.append({'name': f'{stem}_shifted.png', 'image': canvas, 'landmarks': points + PAD})
  return sorted(out, key=lambda f: f['name'])


def write_images(root, real_faces, folder: str = '', pts: bool = True, subset=None) -> list[dict]:
  """Writes the photos (PNG) under root/folder, each with its .pts file when `pts`; returns the faces
  with their 'image_name' (relative to root). `subset`: only faces whose name is in it."""
  root = pathlib.Path(root)
  (root / folder).mkdir(parents=True, exist_ok=True)
  written = []
  for face in faces(real_faces):
    if subset is not None and face['name'] not in subset:
      continue
    path = root / folder / face['name']
    cv2.imwrite(str(path), face['image'])
    if pts:
      write_pts(path.with_suffix('.pts'), face['landmarks'])
    written.append(dict(face, image_name=path.relative_to(root).as_posix()))
  return written


def write_csv(path, written: list[dict], *, box: bool = True, header: bool = True, delimiter: str = ',',
              points=None) -> None:
  """An annotation file of `written` faces: image path, [box,] x0, y0, ... (0-based); `points`: only
  these point indices, in this order."""
  with open(path, 'w', newline='') as f:
    out = csv.writer(f, delimiter=delimiter)
    for k, face in enumerate(written):
      landmarks = face['landmarks'] if points is None else face['landmarks'][list(points)]
      if header and k == 0:
        out.writerow(['image'] + (['x_min', 'y_min', 'x_max', 'y_max'] if box else []) +
                     [f'{c}{i}' for i in range(len(landmarks)) for c in 'xy'])
      values = []
      if box:
        values += [*(landmarks.min(0) - 5), *(landmarks.max(0) + 5)]
      values += landmarks.reshape(-1).tolist()
      out.writerow([face['image_name']] + [f'{v:.3f}' for v in values])


def write_adnet_tsv(path, written: list[dict], scale: float = 0.5) -> None:
  """An ADNet / STAR metadata file: image path, 5 points, the points, scale, center_w, center_h."""
  lines = []
  for face in written:
    landmarks = face['landmarks']
    five = landmarks[[36, 45, 30, 48, 54]]
    center = landmarks.mean(0)
    lines.append('\t'.join([face['image_name'], ','.join(f'{v:.3f}' for v in five.reshape(-1)),
                            ','.join(f'{v:.3f}' for v in landmarks.reshape(-1)), f'{scale}',
                            f'{center[0]:.3f}', f'{center[1]:.3f}']))
  pathlib.Path(path).write_text('\n'.join(lines) + '\n')
