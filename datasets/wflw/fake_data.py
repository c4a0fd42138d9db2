"""Writes a tiny WFLW manual folder in the real raw formats, for tests.

Images are small random JPEGs under WFLW_images/<event>/; the list files have one face per line
(196 coordinates, box, six flags, image path), one image holding two faces. `tar=True` writes the
two tarballs of the official release instead of the extracted folders (images in reverse order).
"""

from __future__ import annotations

import io
import pathlib
import tarfile

import cv2
import numpy as np

from star_jax_datasets.wflw import wflw_dataset_builder as wflw


def _face(rng, width, height):
  """(98, 2) landmarks inside the image, their box, six 0/1 flags."""
  landmarks = rng.uniform([2, 2], [width - 3, height - 3], size=(wflw.NUM_POINTS, 2))
  landmarks = np.round(landmarks, 6).astype(np.float32)
  box = np.concatenate([landmarks.min(0) - 1, landmarks.max(0) + 1]).round().astype(np.float32)
  return landmarks, box, rng.integers(0, 2, size=wflw.NUM_ATTRIBUTES).astype(np.int32)


def line_of(landmarks, box, attributes, path) -> str:
  """One list-file line, formatted as the WFLW release does."""
  numbers = [f'{v:.6f}' for v in np.asarray(landmarks).reshape(-1)]
  numbers += [str(int(v)) for v in box] + [str(int(v)) for v in attributes]
  return ' '.join(numbers + [path])


def write(root, *, num_train: int = 3, num_test: int = 2, tar: bool = False, seed: int = 0):
  """Writes the folder; returns {split: [face dicts in list order]} with the expected values.

  Each face dict has 'landmarks' (98, 2), 'box' (4,), 'attributes' (6,), 'path' (relative to
  WFLW_images/) and 'rgb' (H, W, 3) uint8: the image as OpenCV decodes the written JPEG.
  """
  root = pathlib.Path(root)
  rng = np.random.default_rng(seed)
  images = {}       # path -> JPEG bytes
  expected = {}
  for split, count in (('train', num_train), ('test', num_test)):
    faces = []
    for i in range(count):
      path = f'{i}--Event/{i}_Event_{split}_{i}.jpg'
      if i == 1:
        path = faces[0]['path']   # a second face in the first image
      if path not in images:
        height, width = int(rng.integers(40, 60)), int(rng.integers(50, 80))
        pixels = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
        images[path] = cv2.imencode('.jpg', pixels)[1].tobytes()
      rgb = cv2.imdecode(np.frombuffer(images[path], np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
      landmarks, box, attributes = _face(rng, rgb.shape[1], rgb.shape[0])
      faces.append({'landmarks': landmarks, 'box': box, 'attributes': attributes, 'path': path,
                    'rgb': rgb})
    expected[split] = faces
  lists = {split: '\n'.join(line_of(f['landmarks'], f['box'], f['attributes'], f['path'])
                            for f in faces) + '\n'
           for split, faces in expected.items()}
  list_dir = f'WFLW_annotations/{wflw.LIST_DIR}'
  if tar:
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / wflw.IMAGES_TAR, 'w:gz') as t:
      for path, data in reversed(images.items()):   # not in list order: records still are
        add_to_tar(t, f'{wflw.IMAGES_DIR}/{path}', data)
    with tarfile.open(root / wflw.ANNOTATIONS_TAR, 'w:gz') as t:
      for split, text in lists.items():
        add_to_tar(t, f'{list_dir}/{wflw.LIST_FILES[split]}', text.encode())
  else:
    for path, data in images.items():
      file = root / wflw.IMAGES_DIR / path
      file.parent.mkdir(parents=True, exist_ok=True)
      file.write_bytes(data)
    (root / list_dir).mkdir(parents=True, exist_ok=True)
    for split, text in lists.items():
      (root / list_dir / wflw.LIST_FILES[split]).write_text(text)
  return expected


def add_to_tar(t: tarfile.TarFile, name: str, data: bytes) -> None:
  """Adds a file member `name` with `data` to an open tarball."""
  info = tarfile.TarInfo(name)
  info.size = len(data)
  t.addfile(info, io.BytesIO(data))
