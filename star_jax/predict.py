"""Landmarks on your own photos and videos.

  python -m star_jax.predict --checkpoint DIR photo.jpg more/photos/ --output OUT
      [--box x1,y1,x2,y2] [--faces largest|best|all] [--detector blazeface|haar] [--min_face_size 32]
      [--min_face_score 0.6] [--show_ambiguity] [--batch_size 8] [--norefine]
  python -m star_jax.predict --checkpoint DIR clip.mp4 --output OUT [--smooth] [--redetect_every 15]
  python -m star_jax.predict --checkpoint DIR frames/ --video [--fps 25] --output OUT [--smooth]
  python -m star_jax.predict --model model.onnx photo.jpg clip.mp4 --output OUT     (no JAX needed)

For every image: find the faces (offline: by default MediaPipe's BlazeFace CNN, shipped in the
package and run by OpenCV; `--detector haar` for OpenCV's Haar cascade) or take the face box given by
--box; keep the largest face (--faces largest, the default), the one with the best detector score
(best) or all of them (all); crop each as the official demo does (a square of side 1.05 x the shorter
box side around the box centre, mapped onto the network input), predict, and map the landmarks back
to image pixels. Writes OUT/<name>_landmarks.jpg (the photo with boxes and landmarks, and with
--show_ambiguity each point's predicted covariance as a 1-sigma ellipse) and OUT/<name>.json (boxes,
detector scores, crops, landmarks (x, y) in 0-based image pixels, and the 2x2 covariances in image
pixels^2 with --show_ambiguity).

Refinement (on by default): the official demo crops by the bounding box of 68 landmarks found by
dlib, not by a detector box, which is looser and sits higher on the face. So after a first pass on
the detector's (or --box's) crop we crop again by the bounding box of our own predicted landmarks,
with the demo's rule, and predict once more. --norefine keeps the first pass.

Videos: a file with a video extension (.mp4, .avi, .mov, .mkv, .webm, ...: whatever OpenCV reads) is
a video; a folder is a folder of photos, unless --video is given: then each folder is the frames of one
video, in the natural order of the file names (frame2 before frame10), at --fps. Faces are detected on
the first frame and then tracked: each frame is cropped by the bounding box of the previous frame's
landmarks (one network pass per face); the detector runs again every --redetect_every frames, to
confirm the tracks and find new faces (--faces all), and at once when a track is lost (see
star_jax/inference/video.py). --smooth filters the landmarks over time (One Euro filters on the head's
pose and the face's shape). Writes OUT/<name>_landmarks.mp4 (the annotated video),
OUT/<name>_landmarks.csv (a row per face and frame: frame, time_s, track, box_source, detector_score,
box, x0, y0, x1, y1, ...) and OUT/<name>_landmarks.json (every frame's faces, the tracking summary and
the frames/s), and prints the frames/s.

The checkpoint is any star_jax checkpoint directory or training workdir (trained here, or converted
from the official PyTorch release with `python -m star_jax.convert_pytorch`), or an official .pkl
itself, converted in memory (--config says which config, by default the one of its number of points).
By default a workdir's best checkpoint by the official protocol runs, with the weights that won there
(--step best|latest|N and --weights model|ema choose; the JSON says which step and weights ran and
whether they are the best); a .pkl's `net`, what the official tester runs (--weights=ema: `net_ema`).
--model instead runs an ONNX file written by `python -m star_jax.export` in onnxruntime: the same
outputs, and this path imports no JAX, so an install of numpy, opencv-python-headless, absl-py, tqdm
and onnxruntime is enough (README, "Deploy").
The same is available in Python: star_jax.FaceLandmarker (star_jax/inference/landmarker.py).
"""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Callable, Sequence

from absl import flags
import cv2
import tqdm

from star_jax import cli
from star_jax.inference import face_detect
from star_jax.inference import landmarker as landmarker_lib
from star_jax.inference import video
# Part of this module's interface (the library's since the Python API).
from star_jax.inference.landmarker import IMAGE_EXTENSIONS, read_image  # noqa: F401


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
  flags.DEFINE_string('model', None, 'an ONNX file written by python -m star_jax.export, run in onnxruntime '
                      '(instead of --checkpoint; needs no JAX)', flag_values=fv)
  flags.DEFINE_string('output', None, 'folder for the pictures and JSON files', flag_values=fv)
  flags.DEFINE_string('box', None, 'face box x1,y1,x2,y2 in image pixels, used for every image instead of '
                      'detection', flag_values=fv)
  flags.DEFINE_enum('faces', 'largest', list(face_detect.FACE_MODES), 'detected faces to process per image: '
                    'the largest, the best-scored, or all', flag_values=fv)
  flags.DEFINE_enum('detector', 'blazeface', list(face_detect.DETECTORS), "face detector: blazeface (a CNN, "
                    "the default) or haar (OpenCV's frontal-face cascade, weaker)", flag_values=fv)
  flags.DEFINE_float('min_face_size', face_detect.DEFAULT_MIN_FACE_SIZE, 'smallest face side searched for, in '
                     'image pixels (larger is faster on big photos)', lower_bound=1e-6, flag_values=fv)
  flags.DEFINE_float('min_face_score', face_detect.DEFAULT_SCORE_THRESHOLD, 'least BlazeFace score of a face, '
                     '0-1 (lower finds more faces and more false ones)', lower_bound=0.0, upper_bound=1.0,
                     flag_values=fv)
  flags.DEFINE_bool('show_ambiguity', False, "draw and write each point's predicted covariance (its "
                    'semantic ambiguity)', flag_values=fv)
  flags.DEFINE_integer('batch_size', 8, 'faces per forward pass', lower_bound=1, flag_values=fv)
  flags.DEFINE_bool('refine', True, 'second pass cropped by the predicted landmarks, as the official demo '
                    'crops (--norefine keeps the first pass)', flag_values=fv)
  flags.DEFINE_string('step', None, "checkpoint step: 'best' (the default: the best by the official protocol, "
                      "the lower NME of the weights and their EMA at each evaluation), 'latest' or a number",
                      flag_values=fv)
  flags.DEFINE_enum('weights', None, ['model', 'ema'], "the weights (default: those that won the step's "
                    "evaluation; for an official .pkl its net, i.e. model; ema: its net_ema)", flag_values=fv)
  flags.DEFINE_string('config', None, 'for an official .pkl checkpoint only: wflw, 300w, cofw or a config file '
                      '(default: by its number of points, 98 wflw, 68 300w, 29 cofw)', flag_values=fv)
  flags.DEFINE_bool('video', False, 'treat every folder given as the frames of one video (in the natural '
                    'order of their names: frame2 before frame10) instead of a folder of photos', flag_values=fv)
  flags.DEFINE_float('fps', 25.0, 'frame rate of a folder of frames (a video file has its own)', lower_bound=1e-3,
                     flag_values=fv)
  flags.DEFINE_integer('redetect_every', 15, 'video: run the face detector every N frames to check the tracks '
                       'and find new faces (and at once whenever a track is lost)', lower_bound=1, flag_values=fv)
  flags.DEFINE_bool('smooth', False, 'video: smooth each landmark over time (a One Euro filter; the crops still '
                    'follow the raw landmarks)', flag_values=fv)
  flags.DEFINE_float('smooth_min_cutoff', 1.0, 'video --smooth: cutoff frequency (Hz) at rest; lower is '
                     'smoother and lags more', lower_bound=1e-6, flag_values=fv)
  flags.DEFINE_float('smooth_beta', 0.5, 'video --smooth: how fast the cutoff rises with speed (per face size '
                     'per second); higher lags less on fast motion', lower_bound=0.0, flag_values=fv)
  inputs = command.parse()
  if (fv.checkpoint is None) == (fv.model is None):
    raise flags.Error('give --checkpoint (a checkpoint) or --model (an exported ONNX file), one of them')
  command.require('output')
  if fv.model is not None:
    ignored = [f'--{n}' for n in ('step', 'weights', 'config') if fv[n].present]
    if ignored:
      raise flags.Error(f'{", ".join(ignored)}: for --checkpoint only; an ONNX model holds the weights it was '
                        'exported with')
  if not inputs:
    raise flags.Error('give at least one image file or folder')
  box = None
  if fv.box is not None:
    try:
      box = face_detect.parse_box(fv.box)
    except ValueError as e:
      raise flags.Error(str(e)) from None
  return fv, inputs, box


def load_landmarker(fv, box, **options):
  """The command's FaceLandmarker (star_jax.FaceLandmarker) from --checkpoint, --config, --step,
  --weights (or --model) and the detector flags; a cli.UserError for what the user can fix."""
  onnx = fv.model is not None or pathlib.Path(fv.checkpoint).suffix.lower() == '.onnx'
  if onnx:
    path = pathlib.Path(fv.model if fv.model is not None else fv.checkpoint)
    if not path.is_file():
      raise cli.UserError(f'ONNX model {str(path)!r} does not exist' if not path.exists() else
                          f'--model {str(path)!r} is a directory; give the .onnx file (a checkpoint directory '
                          'goes to --checkpoint)')
  else:
    path = pathlib.Path(fv.checkpoint)
    if not path.exists():
      raise cli.UserError(f'checkpoint directory {fv.checkpoint!r} does not exist')
  detector = None
  if box is None:
    try:
      detector = face_detect.make_detector(fv.detector, fv.min_face_size, fv.min_face_score)
    except (OSError, ValueError) as e:
      raise cli.UserError(f'cannot load the face detector: {e}') from None
  common = {'covariances': fv.show_ambiguity, 'detector': detector, 'faces': fv.faces, 'refine': fv.refine,
            'batch_size': fv.batch_size, **options}
  if onnx:
    try:
      return landmarker_lib.FaceLandmarker.from_onnx(path, **common)
    except (FileNotFoundError, ValueError, ImportError) as e:
      raise cli.UserError(f'cannot run the ONNX model: {e}') from None
  from star_jax.checkpoints import selection  # lazy: JAX-free ONNX path (the checkpoints need JAX)

  weights = fv.weights
  if path.is_dir():
    try:
      step = selection.parse_step(fv.step if fv.step is not None else 'best')
    except ValueError as e:
      raise cli.UserError(f'--step: {e}') from None
    kwargs = {'step': step, 'weights': weights}
    if fv.config:
      raise cli.UserError('--config is for an official .pkl checkpoint; a checkpoint directory carries its own')
  else:
    if fv.step is not None:
      raise cli.UserError('--step is for checkpoint directories; an official .pkl holds one network')
    kwargs = {'config': fv.config, 'weights': 'net_ema' if weights == 'ema' else 'net'}
  try:
    return landmarker_lib.FaceLandmarker.from_checkpoint(path, **common, **kwargs)
  except (FileNotFoundError, ValueError, KeyError) as e:
    raise cli.UserError(f'cannot load the checkpoint {fv.checkpoint!r}: {e}') from None


def _selection(landmarker) -> dict:
  """Which step and weights run, for the JSON files (a landmarker not made by from_checkpoint says less)."""
  return landmarker.selection or {'step': landmarker.step, 'weights': landmarker.weights}


def _predict(argv: list[str]) -> int:
  """Returns the exit status: 0 when at least one input was written, 1 when none was."""
  fv, inputs, box = _flags(argv)
  cli.setup_logging('error')  # Orbax logs harmless warnings about read-only restores

  def warn(message: str):
    tqdm.tqdm.write(f'warning: {message}', file=sys.stderr)

  videos, photo_inputs = video.split_inputs(inputs, fv.video)
  paths = collect_images(photo_inputs, warn) if photo_inputs else []
  if not paths and not videos:
    raise cli.UserError('no images to process')
  landmarker = load_landmarker(fv, box)
  out_dir = pathlib.Path(fv.output)
  out_dir.mkdir(parents=True, exist_ok=True)
  written = 0
  if paths:
    written += _predict_photos(fv, box, landmarker, paths, out_dir, warn)
  if videos:
    options = video.VideoOptions(faces=fv.faces, redetect_every=fv.redetect_every, smooth=fv.smooth,
                                 smooth_min_cutoff=fv.smooth_min_cutoff, smooth_beta=fv.smooth_beta, fps=fv.fps,
                                 show_ambiguity=fv.show_ambiguity, box=box)
    info = {'checkpoint': landmarker.checkpoint, **_selection(landmarker), 'layout': str(landmarker.layout),
            'detector': None if box is not None else fv.detector}
    for source, stem in zip(videos, output_stems([v.path for v in videos])):
      summary = video.process_video(source, landmarker, out_dir, options, stem, warn, info)
      if summary is None:
        continue
      written += 1
      print(f'{source.path}: {summary["num_frames"]} frames ({summary["frames_with_face"]} with a face) in '
            f'{summary["seconds"]:.1f} s, {summary["frames_per_second"]:.1f} frames/s'
            + (f' ({summary["frames_per_second_after_first"]:.1f} after the first, which compiles)'
               if summary['frames_per_second_after_first'] else '') + '; written '
            f'{", ".join(pathlib.Path(p).name for p in summary["outputs"].values())} to {out_dir}')
  return 0 if written else 1


def _predict_photos(fv, box, landmarker, paths, out_dir, warn) -> int:
  """Writes each photo's picture and JSON; returns the number of photos written."""
  stems = output_stems(paths)
  written, faces_written, skipped = 0, 0, []

  bar = tqdm.tqdm(total=len(paths), desc='predict', unit='image', disable=None)
  chunk = fv.batch_size
  for start in range(0, len(paths), chunk):
    items = []  # (path, stem, image, [Face])
    for path, stem in zip(paths[start:start + chunk], stems[start:start + chunk]):
      image = read_image(path)
      if image is None:
        warn(f'{path}: cannot read this file as an image (corrupt or unsupported format): skipped')
        skipped.append((str(path), 'unreadable'))
        bar.update(1)
        continue
      faces = [face_detect.Face(box)] if box is not None else landmarker.detect(image)
      if not faces:
        warn(f'{path}: no face found: skipped (give the face with --box x1,y1,x2,y2, or try a lower '
             '--min_face_size or --min_face_score)')
        skipped.append((str(path), 'no face'))
        bar.update(1)
        continue
      items.append((path, stem, image, faces))
    if not items:
      continue
    all_results = landmarker.predict([it[2] for it in items], [it[3] for it in items],
                                     box_source='user' if box is not None else 'detector')
    for (path, stem, image, _), results in zip(items, all_results):
      h, w = image.shape[:2]
      record = {'image': str(path), 'width': w, 'height': h, 'checkpoint': landmarker.checkpoint,
                **_selection(landmarker), 'layout': landmarker.layout,
                'num_points': int(results[0].landmarks.shape[0]),
                'detector': None if box is not None else fv.detector,
                'coordinates': '0-based image pixels (x, y)',
                'faces': [r.to_dict() for r in results]}
      (out_dir / f'{stem}.json').write_text(json.dumps(record, indent=1))
      picture = landmarker.draw(image, results, fv.show_ambiguity)
      cv2.imwrite(str(out_dir / f'{stem}_landmarks.jpg'), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR),
                  [cv2.IMWRITE_JPEG_QUALITY, 92])
      written += 1
      faces_written += len(results)
      bar.update(1)
  bar.close()
  print(f'{written} image(s), {faces_written} face(s) written to {out_dir}'
        + (f'; {len(skipped)} skipped: ' + ', '.join(f'{p} ({why})' for p, why in skipped) if skipped else ''))
  return written


def main(argv=None) -> int:
  return cli.guarded(_predict, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
