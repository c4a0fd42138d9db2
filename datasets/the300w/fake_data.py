"""Builds a tiny 300W-style manual folder from real photos with .pts files, for tests.

Every 300W folder (afw, helen/{trainset,testset}, lfpw/{trainset,testset}, ibug) gets one or two
of the given photos with their .pts files, under the names and image formats 300W uses there
(LFPW images are PNG, the others JPEG).
"""

from __future__ import annotations

import pathlib
import shutil

import cv2

# folder -> [(source stem, target stem)]: two faces in AFW, one elsewhere.
PLACEMENT = {
    'afw': [('breakingbad', '1051618982_1'), ('einstein', '111076519_1')],
    'helen/trainset': [('einstein', '100032540_1')],
    'lfpw/trainset': [('takeo', 'image_0001')],
    'helen/testset': [('breakingbad', '2968560214_1')],
    'lfpw/testset': [('takeo', 'image_0001')],
    'ibug': [('einstein', 'image_003_1')],
}


def _source_image(real_faces: pathlib.Path, stem: str) -> pathlib.Path:
  matches = [p for p in sorted(real_faces.glob(f'{stem}.*')) if p.suffix != '.pts']
  if not matches:
    raise FileNotFoundError(f'{real_faces}: no image named {stem}.*')
  return matches[0]


def write(root, real_faces) -> dict[str, list[dict]]:
  """Writes the folder; returns {split: [{'image_name', 'pts', 'source'}]} in record order."""
  root, real_faces = pathlib.Path(root), pathlib.Path(real_faces)
  written = {}
  for folder, faces in PLACEMENT.items():
    (root / folder).mkdir(parents=True, exist_ok=True)
    for source_stem, stem in faces:
      source = _source_image(real_faces, source_stem)
      suffix = '.png' if folder.startswith('lfpw') else '.jpg'
      target = root / folder / f'{stem}{suffix}'
      if source.suffix.lower() == suffix:
        shutil.copyfile(source, target)
      else:
        cv2.imwrite(str(target), cv2.imread(str(source), cv2.IMREAD_UNCHANGED))
      shutil.copyfile(real_faces / f'{source_stem}.pts', target.with_suffix('.pts'))
      written[f'{folder}/{target.name}'] = {'source': source, 'pts': target.with_suffix('.pts')}
  order = {'train': ('afw', 'helen/trainset', 'lfpw/trainset'),
           'test': ('helen/testset', 'lfpw/testset', 'ibug')}
  return {split: [dict(image_name=name, **written[name]) for folder in folders
                  for name in sorted(n for n in written if n.rsplit('/', 1)[0] == folder)]
          for split, folders in order.items()}
