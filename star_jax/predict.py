"""Landmarks on your own photos.

  python -m star_jax.predict --checkpoint DIR photo.jpg more/photos/ --output OUT
      [--box x1,y1,x2,y2] [--faces largest|all] [--show-ambiguity] [--batch_size 8] [--norefine]

For every image: find the faces (OpenCV's Haar cascade, offline; or the face box given by --box),
crop each as the official demo does (a square of side 1.05 x the shorter box side around the box
centre, mapped onto the network input), predict, and map the landmarks back to image pixels. Writes
OUT/<name>_landmarks.jpg (the photo with boxes and landmarks, and with --show-ambiguity each point's
predicted covariance as a 1-sigma ellipse) and OUT/<name>.json (boxes, crops, landmarks (x, y) in
0-based image pixels, and the 2x2 covariances in image pixels^2 with --show-ambiguity).

Refinement (on by default): the official demo crops by the bounding box of 68 landmarks found by
dlib, not by a detector box, which is looser and sits higher on the face. So after a first pass on
the detector's (or --box's) crop we crop again by the bounding box of our own predicted landmarks,
with the demo's rule, and predict once more. --norefine keeps the first pass.

The checkpoint is any star_jax checkpoint directory (trained here, or converted from the official
PyTorch release with `python -m star_jax.convert_pytorch`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
from typing import Callable, Sequence

import cv2
import numpy as np

from star_jax import face_detect
from star_jax import plots
from star_jax.data import transforms

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.pbm', '.tif', '.tiff', '.webp')

# A refined box is kept only if its shorter side is within this factor of the first crop's face size;
# otherwise (a model that has not learned faces yet, a face the model got badly wrong) the first
# pass stands.
_REFINE_MAX_RATIO = 2.5


# ---- Pure geometry ------------------------------------------------------------------------------

def covariances_to_image(cov_normalized: np.ndarray, matrix: np.ndarray, image_size: int) -> np.ndarray:
  """Maps (b, N, 2, 2) covariances of normalised landmarks to original image pixels^2.

  Normalised -> crop px is `transforms.denormalize`, linear with slope image_size / 2 (the official
  tester's align_corners=False mapping); crop px -> image px is the inverse of the (b, 3, 3) crop
  `matrix` (a similarity, so affine). With J the 2x2 Jacobian of the whole map: cov_px = J cov J^T.
  """
  inv = np.linalg.inv(np.asarray(matrix, np.float64))
  jac = inv[:, :2, :2] * (image_size / 2.0)                                   # (b, 2, 2)
  cov = np.asarray(cov_normalized, np.float64)
  return np.einsum('bij,bnjk,blk->bnil', jac, cov, jac).astype(np.float32)


def refined_crop(landmarks_px: np.ndarray, previous_scale: float):
  """The demo's crop (scale, center) from the bounding box of predicted landmarks (N, 2), or None when
  that box is degenerate or implausibly far in size from the previous crop (scale ratio beyond 2.5)."""
  if not np.all(np.isfinite(landmarks_px)):
    return None
  box = face_detect.landmark_box(landmarks_px)
  try:
    scale, center = face_detect.crop_params(box)
  except ValueError:
    return None
  ratio = scale / previous_scale
  if not 1.0 / _REFINE_MAX_RATIO <= ratio <= _REFINE_MAX_RATIO:
    return None
  return scale, center


# ---- The model ----------------------------------------------------------------------------------

def resolve_checkpoint_dir(path: str) -> pathlib.Path:
  """A checkpoint directory, also when given a training workdir (whose checkpoints are in
  `<workdir>/checkpoints`, see star_jax.trainer)."""
  p = pathlib.Path(path)
  has_steps = p.is_dir() and any(q.is_dir() and q.name.isdigit() for q in p.iterdir())
  if not has_steps and (p / 'checkpoints').is_dir():
    return p / 'checkpoints'
  return p


def make_predict_fn(model, with_covariance: bool) -> Callable[[np.ndarray], dict]:
  """A jit-compiled `fn(images uint8 (B, S, S, 3) RGB) -> dict of numpy arrays`.

  'landmarks' (B, N, 2): the last stack's landmarks in [-1, 1]; with `with_covariance` also
  'covariances' (B, N, 2, 2): the weighted covariance of each normalised fusion heatmap in the same
  normalised frame (STAR's loss uses exactly this covariance: its principal axes are the directions
  of the point's semantic ambiguity).
  """
  import jax  # pylint: disable=g-import-not-at-top  (after argument parsing: --help stays fast)
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from star_jax import losses  # pylint: disable=g-import-not-at-top
  from star_jax import models  # pylint: disable=g-import-not-at-top

  graphdef, state = nnx.split(model)

  @jax.jit
  def forward(state, images):
    net = nnx.merge(graphdef, state)
    last = net(models.preprocess(images))[-1]
    out = {'landmarks': last['landmarks']}
    if with_covariance:
      _, out['covariances'] = losses.heatmap_moments(last['fusion_heatmaps'])
    return out

  def predict(images: np.ndarray) -> dict:
    return {k: np.asarray(v) for k, v in forward(state, images).items()}

  return predict


def run_batched(predict_fn, crops: np.ndarray, batch_size: int) -> dict:
  """Runs `predict_fn` over (M, S, S, 3) crops in batches of exactly `batch_size` (the last one padded,
  so there is one compilation); returns the outputs concatenated over the M crops."""
  outs = []
  for start in range(0, len(crops), batch_size):
    chunk = crops[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
    out = predict_fn(chunk)
    outs.append({k: v[:batch_size - pad] for k, v in out.items()})
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


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


# ---- One chunk of images ------------------------------------------------------------------------

@dataclasses.dataclass
class FaceResult:
  face: face_detect.Face
  box_source: str                   # 'detector' or 'user'
  scale: float = 0.0
  center: tuple[float, float] = (0.0, 0.0)
  refined: bool = False
  landmarks: np.ndarray | None = None    # (N, 2) image px
  covariances: np.ndarray | None = None  # (N, 2, 2) image px^2


def predict_faces(image_list: Sequence[np.ndarray], faces_list: Sequence[list[FaceResult]], predict_fn,
                  image_size: int, batch_size: int, refine: bool) -> None:
  """Fills every FaceResult (crop, landmarks, covariances) of the given images, in place."""
  jobs = [(i, r) for i, results in enumerate(faces_list) for r in results]
  if not jobs:
    return
  for i, r in jobs:
    r.scale, r.center = face_detect.crop_params(r.face.box)

  def run(selected):
    matrices = np.stack([transforms.crop_matrix(r.scale, r.center, image_size) for _, r in selected])
    crops = np.stack([transforms.warp(image_list[i], m, image_size) for (i, _), m in zip(selected, matrices)])
    out = run_batched(predict_fn, crops, batch_size)
    landmarks = transforms.map_back(out['landmarks'], matrices, image_size)
    covs = (covariances_to_image(out['covariances'], matrices, image_size)
            if 'covariances' in out else [None] * len(selected))
    for (_, r), lm, cov in zip(selected, landmarks, covs):
      r.landmarks, r.covariances = lm, cov

  run(jobs)
  if refine:
    again = []
    for i, r in jobs:
      crop = refined_crop(r.landmarks, r.scale)
      if crop is not None:
        r.scale, r.center, r.refined = crop[0], crop[1], True
        again.append((i, r))
    if again:
      run(again)


def face_json(r: FaceResult) -> dict:
  """One face of the JSON output: boxes and crop in image px, landmarks (N, 2), covariances (N, 2, 2)."""
  out = {
      'box': [round(float(v), 2) for v in r.face.box],
      'box_source': r.box_source,
      'detector_score': None if r.face.score is None else round(float(r.face.score), 4),
      'crop': {'scale': float(r.scale), 'center': [float(r.center[0]), float(r.center[1])],
               'refined': bool(r.refined)},
      'landmarks': np.round(r.landmarks.astype(np.float64), 3).tolist(),
  }
  if r.covariances is not None:
    out['covariances'] = np.round(r.covariances.astype(np.float64), 4).tolist()
  return out


def draw(image: np.ndarray, results: Sequence[FaceResult], show_ambiguity: bool) -> np.ndarray:
  """The output picture: `image` (RGB) with each face's box, ellipses (optional) and landmarks."""
  out = image
  for r in results:
    out = plots.draw_box(out, r.face.box)
    if show_ambiguity and r.covariances is not None:
      out = plots.draw_ellipses(out, r.landmarks, r.covariances)
    out = plots.draw_landmarks(out, r.landmarks)
  return out


# ---- Command line -------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog='python -m star_jax.predict', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('inputs', nargs='+', help='image files and/or folders of images')
  parser.add_argument('--checkpoint', required=True,
                      help='star_jax checkpoint directory (or a training workdir holding checkpoints/)')
  parser.add_argument('--output', required=True, help='folder for the pictures and JSON files')
  parser.add_argument('--box', default=None,
                      help='face box x1,y1,x2,y2 in image pixels, used for every image instead of detection')
  parser.add_argument('--faces', choices=('largest', 'all'), default='largest',
                      help='detected faces to process per image (default: the largest)')
  parser.add_argument('--show-ambiguity', '--show_ambiguity', dest='show_ambiguity', action='store_true',
                      help='draw and write each point\'s predicted covariance (its semantic ambiguity)')
  parser.add_argument('--batch_size', '--batch-size', dest='batch_size', type=int, default=8,
                      help='faces per forward pass')
  parser.add_argument('--refine', action=argparse.BooleanOptionalAction, default=True,
                      help='second pass cropped by the predicted landmarks, as the official demo crops '
                           '(default on; --no-refine keeps the first pass)')
  parser.add_argument('--norefine', dest='refine', action='store_false', help=argparse.SUPPRESS)
  parser.add_argument('--step', type=int, default=None, help='checkpoint step (default: the latest)')
  parser.add_argument('--use_ema', action=argparse.BooleanOptionalAction, default=True,
                      help='use the EMA weights when the checkpoint has them (default on)')
  parser.add_argument('--nouse_ema', dest='use_ema', action='store_false', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.batch_size < 1:
    parser.error('--batch_size must be at least 1')
  if args.box is not None:
    try:
      args.box = face_detect.parse_box(args.box)
    except ValueError as e:
      parser.error(str(e))
  return args


def main(argv=None) -> int:
  """Returns the exit status: 0 when at least one image was written, 1 when none was."""
  args = parse_args(argv)
  import tqdm  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  # Orbax logs harmless warnings about read-only restores; keep the command's output readable.
  logging.set_verbosity(logging.ERROR)

  from star_jax import checkpointing  # pylint: disable=g-import-not-at-top

  def warn(message: str):
    tqdm.tqdm.write(f'warning: {message}', file=sys.stderr)

  if not os.path.isdir(args.checkpoint):
    sys.exit(f'error: checkpoint directory {args.checkpoint!r} does not exist')
  try:
    model, config = checkpointing.load_model(resolve_checkpoint_dir(args.checkpoint), step=args.step,
                                             use_ema=args.use_ema)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: cannot load the checkpoint {args.checkpoint!r}: {e}')
  image_size = int(config.data.image_size)
  predict_fn = make_predict_fn(model, with_covariance=args.show_ambiguity)
  detector = None if args.box is not None else face_detect.HaarFaceDetector()

  paths = collect_images(args.inputs, warn)
  if not paths:
    sys.exit('error: no images to process')
  out_dir = pathlib.Path(args.output)
  out_dir.mkdir(parents=True, exist_ok=True)
  stems = output_stems(paths)
  written, faces_written, skipped = 0, 0, []

  bar = tqdm.tqdm(total=len(paths), desc='predict', unit='image', disable=None)
  chunk = max(args.batch_size, 1)
  for start in range(0, len(paths), chunk):
    items = []  # (path, stem, image, [FaceResult])
    for path, stem in zip(paths[start:start + chunk], stems[start:start + chunk]):
      image = read_image(path)
      if image is None:
        warn(f'{path}: cannot read this file as an image (corrupt or unsupported format): skipped')
        skipped.append((str(path), 'unreadable'))
        bar.update(1)
        continue
      if args.box is not None:
        results = [FaceResult(face_detect.Face(args.box), 'user')]
      else:
        results = [FaceResult(f, 'detector') for f in face_detect.select(detector.detect(image), args.faces)]
      if not results:
        warn(f'{path}: no face found: skipped (give the face with --box x1,y1,x2,y2)')
        skipped.append((str(path), 'no face'))
        bar.update(1)
        continue
      items.append((path, stem, image, results))
    predict_faces([it[2] for it in items], [it[3] for it in items], predict_fn, image_size, args.batch_size,
                  args.refine)
    for path, stem, image, results in items:
      h, w = image.shape[:2]
      record = {'image': str(path), 'width': w, 'height': h, 'checkpoint': str(args.checkpoint),
                'layout': str(config.layout), 'num_points': int(results[0].landmarks.shape[0]),
                'coordinates': '0-based image pixels (x, y)',
                'faces': [face_json(r) for r in results]}
      (out_dir / f'{stem}.json').write_text(json.dumps(record, indent=1))
      picture = draw(image, results, args.show_ambiguity)
      cv2.imwrite(str(out_dir / f'{stem}_landmarks.jpg'), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR),
                  [cv2.IMWRITE_JPEG_QUALITY, 92])
      written += 1
      faces_written += len(results)
      bar.update(1)
  bar.close()
  print(f'{written} image(s), {faces_written} face(s) written to {out_dir}'
        + (f'; {len(skipped)} skipped: ' + ', '.join(f'{p} ({why})' for p, why in skipped) if skipped else ''))
  return 0 if written else 1


if __name__ == '__main__':
  sys.exit(main())
