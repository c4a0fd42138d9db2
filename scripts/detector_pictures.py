"""The face detector on the annotated photos: pictures for docs/ and a results table.

  python scripts/detector_pictures.py [--detector blazeface|haar] [--output docs] [--repeats 5]

For each photo of tests/testdata/real_faces_full: runs the detector (star_jax.inference.face_detect) `--repeats`
times after one warm-up run and keeps the median time, then writes `<output>/detector_<name>.jpg`
(the photo, resized to 450-800 px, with each detected box in red labelled rank:score, and the annotation's
68-landmark box in green) and prints a markdown table: the boxes and scores, whether the first face
(best score) and the largest face (what `predict --faces largest` takes) are the annotated one
(box centre inside the landmark box, box side 0.7-2x the landmark box side), and the time.
"""

from __future__ import annotations

import pathlib
import statistics
import time

from absl import flags
import cv2
import numpy as np

from star_jax import cli
from star_jax.data import annotations
from star_jax.data import crop as crop_lib
from star_jax.inference import face_detect

REPO = pathlib.Path(__file__).resolve().parent.parent
PHOTOS = REPO / 'tests' / 'testdata' / 'real_faces_full'
NAMES = ('einstein.jpg', 'breakingbad.jpg', 'takeo.png')
MAX_SIDE = 800
MIN_SIDE = 450  # small photos are enlarged so that the boxes and labels stay readable


def read_pts(path: pathlib.Path) -> np.ndarray:
  """A 68-point iBUG .pts file (1-based) -> (68, 2) float32 0-based pixels (the datasets' reader)."""
  return annotations.read_pts(path, 68)


def is_annotated(box, truth) -> bool:
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  side = lambda b: max(b[2] - b[0], b[3] - b[1])
  inside = truth[0] <= cx <= truth[2] and truth[1] <= cy <= truth[3]
  return bool(inside and 0.7 <= side(box) / side(truth) <= 2.0)


def picture(image_rgb: np.ndarray, faces, truth) -> np.ndarray:
  """BGR picture, its longer side between MIN_SIDE and MAX_SIDE px: detections in red with rank:score,
  the landmark box in green."""
  s = min(1.0, MAX_SIDE / max(image_rgb.shape[:2]))
  s = max(s, MIN_SIDE / max(image_rgb.shape[:2]))
  out = cv2.resize(cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), None, fx=s, fy=s, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)
  px = lambda v: int(round(v * s))
  cv2.rectangle(out, (px(truth[0]), px(truth[1])), (px(truth[2]), px(truth[3])), (0, 200, 0), 1, cv2.LINE_AA)
  thick = max(1, round(max(out.shape[:2]) / 400))
  font = 0.4 * thick
  for rank, f in enumerate(faces, 1):
    x1, y1, x2, y2 = (px(v) for v in f.box)
    cv2.rectangle(out, (x1, y1), (x2, y2), (0, 0, 255), thick, cv2.LINE_AA)
    label = f'{rank}:{f.score:.2f}' if f.score is not None else str(rank)
    (tw, th), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, font, thick)
    ty = y1 - 3 if y1 - th - 6 >= 0 else y2 + th + 3
    cv2.rectangle(out, (x1, ty - th - 3), (x1 + tw + 2, ty + 3), (0, 0, 255), -1)
    cv2.putText(out, label, (x1 + 1, ty), cv2.FONT_HERSHEY_SIMPLEX, font, (255, 255, 255), thick, cv2.LINE_AA)
  return out


def _pictures(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  flags.DEFINE_enum('detector', 'blazeface', list(face_detect.DETECTORS), 'face detector', flag_values=command.fv)
  flags.DEFINE_string('output', str(REPO / 'docs'), 'folder for the pictures', flag_values=command.fv)
  flags.DEFINE_integer('repeats', 5, 'timed runs per photo (the median is reported)', lower_bound=1,
                       flag_values=command.fv)
  command.parse()
  args = command.fv
  detector = face_detect.make_detector(args.detector)
  out_dir = pathlib.Path(args.output)
  out_dir.mkdir(parents=True, exist_ok=True)
  print(f'detector: {args.detector}; cv2 {cv2.__version__}, {cv2.getNumThreads()} threads\n')
  print('| photo | size | faces: box (x_min, y_min, x_max, y_max) score | first face annotated | '
        'largest face annotated | time |')
  print('| --- | --- | --- | --- | --- | --- |')
  for name in NAMES:
    image = cv2.cvtColor(cv2.imread(str(PHOTOS / name)), cv2.COLOR_BGR2RGB)
    truth = crop_lib.landmarks_box(read_pts(PHOTOS / (pathlib.Path(name).stem + '.pts')))
    faces = detector.detect(image)
    times = []
    for _ in range(max(args.repeats, 1)):
      start = time.perf_counter()
      detector.detect(image)
      times.append(time.perf_counter() - start)
    stem = pathlib.Path(name).stem
    cv2.imwrite(str(out_dir / f'detector_{stem}.jpg'), picture(image, faces, truth), [cv2.IMWRITE_JPEG_QUALITY, 85])
    listed = '<br>'.join(f'{i}: ({", ".join(f"{v:.0f}" for v in f.box)}) {f.score:.3f}'
                         for i, f in enumerate(faces, 1)) or 'none'
    first = 'yes' if faces and is_annotated(faces[0].box, truth) else 'no'
    largest = face_detect.select(faces, 'largest')
    big = 'yes' if largest and is_annotated(largest[0].box, truth) else 'no'
    h, w = image.shape[:2]
    print(f'| {name} | {w} x {h} | {listed} | {first} | {big} | {statistics.median(times):.2f} s |')
  return 0


def main(argv=None) -> int:
  return cli.guarded(_pictures, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
