"""Landmarks on your own photos.

  python -m star_jax.predict --checkpoint DIR photo.jpg more/photos/ --output OUT
      [--box x1,y1,x2,y2] [--faces largest|all] [--show_ambiguity] [--batch_size 8] [--norefine]

For every image: find the faces (OpenCV's Haar cascade, offline; or the face box given by --box),
crop each as the official demo does (a square of side 1.05 x the shorter box side around the box
centre, mapped onto the network input), predict, and map the landmarks back to image pixels. Writes
OUT/<name>_landmarks.jpg (the photo with boxes and landmarks, and with --show_ambiguity each point's
predicted covariance as a 1-sigma ellipse) and OUT/<name>.json (boxes, crops, landmarks (x, y) in
0-based image pixels, and the 2x2 covariances in image pixels^2 with --show_ambiguity).

Refinement (on by default): the official demo crops by the bounding box of 68 landmarks found by
dlib, not by a detector box, which is looser and sits higher on the face. So after a first pass on
the detector's (or --box's) crop we crop again by the bounding box of our own predicted landmarks,
with the demo's rule, and predict once more. --norefine keeps the first pass.

The checkpoint is any star_jax checkpoint directory or training workdir (trained here, or converted
from the official PyTorch release with `python -m star_jax.convert_pytorch`).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Callable, Sequence

from absl import flags
import cv2
import numpy as np

from star_jax import cli
from star_jax.inference import face_detect
from star_jax.inference import predictor

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.pbm', '.tif', '.tiff', '.webp')


# ---- Files --------------------------------------------------------------------------------------

def collect_images(inputs: Sequence[str], warn: Callable[[str], None]) -> list[pathlib.Path]:
  """Image files named by `inputs`: files as given, folders' image files (not recursive), sorted."""
  paths = []
  for item in inputs:
    p = pathlib.Path(item)
    if p.is_dir():
      found = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
      if not found:
        warn(f'{p}: no image files ({", ".join(IMAGE_EXTENSIONS)}) in this folder')
      paths.extend(found)
    elif p.is_file():
      paths.append(p)
    else:
      warn(f'{p}: no such file or folder: skipped')
  return paths


def read_image(path: pathlib.Path) -> np.ndarray | None:
  """uint8 (H, W, 3) RGB (grey images are converted to 3 channels), or None if unreadable."""
  data = np.fromfile(str(path), np.uint8) if path.is_file() else None
  image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
  if image is None:
    return None
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def output_stems(paths: Sequence[pathlib.Path]) -> list[str]:
  """Unique output names: the file stem, with _2, _3... for repeated stems (same name, other folder)."""
  seen: dict[str, int] = {}
  stems = []
  for p in paths:
    n = seen.get(p.stem, 0) + 1
    seen[p.stem] = n
    stems.append(p.stem if n == 1 else f'{p.stem}_{n}')
  return stems


# ---- Command line -------------------------------------------------------------------------------

def _flags(argv):
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_string('checkpoint', None, 'star_jax checkpoint directory (or a training workdir holding '
                      'checkpoints/)', flag_values=fv)
  flags.DEFINE_string('output', None, 'folder for the pictures and JSON files', flag_values=fv)
  flags.DEFINE_string('box', None, 'face box x1,y1,x2,y2 in image pixels, used for every image instead of '
                      'detection', flag_values=fv)
  flags.DEFINE_enum('faces', 'largest', ['largest', 'all'], 'detected faces to process per image',
                    flag_values=fv)
  flags.DEFINE_bool('show_ambiguity', False, "draw and write each point's predicted covariance (its "
                    'semantic ambiguity)', flag_values=fv)
  flags.DEFINE_integer('batch_size', 8, 'faces per forward pass', lower_bound=1, flag_values=fv)
  flags.DEFINE_bool('refine', True, 'second pass cropped by the predicted landmarks, as the official demo '
                    'crops (--norefine keeps the first pass)', flag_values=fv)
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)', flag_values=fv)
  flags.DEFINE_bool('use_ema', True, 'use the EMA weights when the checkpoint has them', flag_values=fv)
  inputs = command.parse()
  command.require('checkpoint', 'output')
  if not inputs:
    raise flags.Error('give at least one image file or folder')
  box = None
  if fv.box is not None:
    try:
      box = face_detect.parse_box(fv.box)
    except ValueError as e:
      raise flags.Error(str(e)) from None
  return fv, inputs, box


def _predict(argv: list[str]) -> int:
  """Returns the exit status: 0 when at least one image was written, 1 when none was."""
  fv, inputs, box = _flags(argv)
  import tqdm  # pylint: disable=import-outside-toplevel

  from star_jax.training import checkpoints  # pylint: disable=import-outside-toplevel

  cli.setup_logging('error')  # Orbax logs harmless warnings about read-only restores

  def warn(message: str):
    tqdm.tqdm.write(f'warning: {message}', file=sys.stderr)

  if not os.path.exists(fv.checkpoint):
    raise cli.UserError(f'checkpoint directory {fv.checkpoint!r} does not exist')
  try:
    loaded = checkpoints.load_model(fv.checkpoint, step=fv.step, weights=None if fv.use_ema else 'model')
  except (FileNotFoundError, ValueError) as e:
    raise cli.UserError(f'cannot load the checkpoint {fv.checkpoint!r}: {e}') from None
  config = loaded.config
  image_size = int(config.data.image_size)
  predict_fn = predictor.network_fn(loaded.model, with_covariance=fv.show_ambiguity,
                                    decode=config.model.get('decode', 'landmarks'))
  detector = None if box is not None else face_detect.HaarFaceDetector()

  paths = collect_images(inputs, warn)
  if not paths:
    raise cli.UserError('no images to process')
  out_dir = pathlib.Path(fv.output)
  out_dir.mkdir(parents=True, exist_ok=True)
  stems = output_stems(paths)
  written, faces_written, skipped = 0, 0, []

  bar = tqdm.tqdm(total=len(paths), desc='predict', unit='image', disable=None)
  chunk = fv.batch_size
  for start in range(0, len(paths), chunk):
    items = []  # (path, stem, image, [FaceResult])
    for path, stem in zip(paths[start:start + chunk], stems[start:start + chunk]):
      image = read_image(path)
      if image is None:
        warn(f'{path}: cannot read this file as an image (corrupt or unsupported format): skipped')
        skipped.append((str(path), 'unreadable'))
        bar.update(1)
        continue
      if box is not None:
        results = [predictor.FaceResult(face_detect.Face(box), 'user')]
      else:
        results = [predictor.FaceResult(f, 'detector')
                   for f in face_detect.select(detector.detect(image), fv.faces)]
      if not results:
        warn(f'{path}: no face found: skipped (give the face with --box x1,y1,x2,y2)')
        skipped.append((str(path), 'no face'))
        bar.update(1)
        continue
      items.append((path, stem, image, results))
    predictor.predict_faces([it[2] for it in items], [it[3] for it in items], predict_fn, image_size,
                            fv.batch_size, fv.refine)
    for path, stem, image, results in items:
      h, w = image.shape[:2]
      record = {'image': str(path), 'width': w, 'height': h, 'checkpoint': str(fv.checkpoint),
                'step': loaded.step, 'weights': loaded.weights,
                'layout': str(config.layout), 'num_points': int(results[0].landmarks.shape[0]),
                'coordinates': '0-based image pixels (x, y)',
                'faces': [predictor.face_json(r) for r in results]}
      (out_dir / f'{stem}.json').write_text(json.dumps(record, indent=1))
      picture = predictor.draw(image, results, fv.show_ambiguity)
      cv2.imwrite(str(out_dir / f'{stem}_landmarks.jpg'), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR),
                  [cv2.IMWRITE_JPEG_QUALITY, 92])
      written += 1
      faces_written += len(results)
      bar.update(1)
  bar.close()
  print(f'{written} image(s), {faces_written} face(s) written to {out_dir}'
        + (f'; {len(skipped)} skipped: ' + ', '.join(f'{p} ({why})' for p, why in skipped) if skipped else ''))
  return 0 if written else 1


def main(argv=None) -> int:
  return cli.guarded(_predict, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
