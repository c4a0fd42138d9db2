"""Writes tiny COFW .mat files in the real raw formats, for tests.

`write` makes MATLAB v7.3 files as MATLAB does: HDF5 with a 512-byte MATLAB header, arrays stored
column-major (so HDF5 sees their axes reversed), the image cell array as HDF5 object references
into '#refs#'. `version='v5'` writes an older-format file with scipy instead.
"""

from __future__ import annotations

import pathlib

import h5py
import numpy as np
import scipy.io

from star_jax_datasets.cofw import cofw_dataset_builder as cofw

_HEADER = b'MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2024 HDF5 schema 1.00 .'


def make_faces(count: int, seed: int = 0) -> list[dict]:
  """Faces with non-square images, colour and grey, in MATLAB conventions (1-based points)."""
  rng = np.random.default_rng(seed)
  faces = []
  for i in range(count):
    height, width = (30, 44) if i % 2 == 0 else (46, 34)
    shape = (height, width, 3) if i % 3 != 1 else (height, width)
    image = rng.integers(0, 256, size=shape, dtype=np.uint8)
    points = rng.uniform([3, 3], [width - 3, height - 3], size=(cofw.NUM_POINTS, 2))  # 1-based
    occluded = rng.random(cofw.NUM_POINTS) < (0.3 if i % 2 == 0 else 0.0)
    phis = np.concatenate([points[:, 0], points[:, 1], occluded.astype(np.float64)])
    x, y = points.min(0) - 2
    w, h = points.max(0) + 2 - [x, y]
    faces.append({'image': image, 'phis': phis, 'box': np.array([x, y, w, h])})
  return faces


def write(root, *, num_train: int = 3, num_test: int = 2, version: str = 'v7.3') -> dict:
  """Writes both .mat files into `root`; returns {split: faces} (see make_faces)."""
  root = pathlib.Path(root)
  root.mkdir(parents=True, exist_ok=True)
  expected = {'train': make_faces(num_train, seed=1), 'test': make_faces(num_test, seed=2)}
  for split, faces in expected.items():
    path = root / cofw.MAT_FILES[split]
    if version == 'v7.3':
      write_v73(path, split, faces)
    else:
      image_var, phis_var, boxes_var = cofw.VARIABLES[split]
      cells = np.empty((len(faces), 1), dtype=object)
      for i, face in enumerate(faces):
        cells[i, 0] = face['image']
      scipy.io.savemat(path, {image_var: cells,
                              phis_var: np.stack([f['phis'] for f in faces]),
                              boxes_var: np.stack([f['box'] for f in faces])})
  return expected


def write_v73(path, split: str, faces: list[dict]) -> None:
  image_var, phis_var, boxes_var = cofw.VARIABLES[split]
  with h5py.File(path, 'w', userblock_size=512) as f:
    refs_group = f.create_group('#refs#')
    refs = np.empty((1, len(faces)), dtype=h5py.ref_dtype)   # MATLAB (N, 1) cell, reversed
    for i, face in enumerate(faces):
      image = face['image']
      stored = image.T if image.ndim == 2 else np.transpose(image, (2, 1, 0))  # column-major
      data = refs_group.create_dataset(f'im{i}', data=stored)
      data.attrs['MATLAB_class'] = np.bytes_('uint8')
      refs[0, i] = data.ref
    cells = f.create_dataset(image_var, data=refs)
    cells.attrs['MATLAB_class'] = np.bytes_('cell')
    for name, rows in ((phis_var, [fc['phis'] for fc in faces]), (boxes_var, [fc['box'] for fc in faces])):
      data = f.create_dataset(name, data=np.stack(rows).T)   # (N, K) stored as (K, N)
      data.attrs['MATLAB_class'] = np.bytes_('double')
  with open(path, 'r+b') as f:
    f.write(_HEADER.ljust(128, b' ')[:116] + b'\x00' * 8 + b'\x00\x02IM')
