"""docs/synthetic_on_real.jpg: a model trained on the synthetic faces, on a synthetic test face and on
real photos, with the photos' own annotation beside its prediction.

  python scripts/synthetic_on_real.py --checkpoint runs/synthetic [--output docs/synthetic_on_real.jpg]

Green: the model's 98 points (detector box in red, refined crop); white: the photo's 68 annotated points
(tests/testdata/real_faces_full). The NME in each title is over the 68 points (the model's points taken by
the 98 -> 68 map of the synthetic faces, star_jax/data/synthetic/subsets.py), normalised by the
distance between the outer eye corners; on the synthetic face, over its 98 exact points.
"""

from __future__ import annotations

import pathlib
import sys

from absl import flags
import cv2
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from star_jax import cli  # pylint: disable=wrong-import-position

PHOTOS = ('einstein.jpg', 'breakingbad.jpg')


def _panel(image, title, height=360):
  image = cv2.resize(image, (int(image.shape[1] * height / image.shape[0]), height), interpolation=cv2.INTER_AREA)
  bar = np.full((34, image.shape[1], 3), 255, np.uint8)
  cv2.putText(bar, title, (8, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1, cv2.LINE_AA)
  return np.concatenate([bar, image])


def _main(argv):
  command = cli.Command(__doc__, argv)
  flags.DEFINE_string('checkpoint', None, 'a configs/synthetic.py training workdir', flag_values=command.fv)
  flags.DEFINE_string('output', str(REPO / 'docs' / 'synthetic_on_real.jpg'), 'picture to write',
                      flag_values=command.fv)
  command.parse()
  command.require('checkpoint')
  import star_jax  # pylint: disable=import-outside-toplevel
  from benchmarks.video import read_pts  # pylint: disable=import-outside-toplevel
  from star_jax import drawing  # pylint: disable=import-outside-toplevel
  from star_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  from star_jax.data.synthetic.subsets import WFLW_TO_300W  # pylint: disable=import-outside-toplevel

  landmarker = star_jax.FaceLandmarker.from_checkpoint(command.fv.checkpoint, faces='largest')
  sample = synthetic.generate(0, 'test', 0)
  (face,) = landmarker(sample.image)
  truth = sample.clean_landmarks
  nme = np.linalg.norm(face.landmarks - truth, axis=1).mean() / np.linalg.norm(truth[60] - truth[72])
  panels = [_panel(landmarker.draw(sample.image, [face], show_ambiguity=False),
                   f'synthetic face: NME {100 * nme:.1f} %')]
  for name in PHOTOS:
    path = REPO / 'tests' / 'testdata' / 'real_faces_full' / name
    truth = read_pts(path.with_suffix('.pts'))
    (face,) = landmarker(path)
    nme = np.linalg.norm(face.landmarks[WFLW_TO_300W] - truth, axis=1).mean() / np.linalg.norm(truth[36] - truth[45])
    picture = drawing.draw_landmarks(landmarker.draw(path, [face], show_ambiguity=False), truth, color=(255, 255, 255))
    x1, y1, x2, y2 = face.box
    side = 1.6 * max(x2 - x1, y2 - y1)
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    top, left = int(max(cy - side / 2, 0)), int(max(cx - side / 2, 0))
    crop = picture[top:int(cy + side / 2), left:int(cx + side / 2)]
    panels.append(_panel(crop, f'{path.stem}: NME {100 * nme:.1f} %'))
  sheet = np.concatenate(panels, axis=1)
  cv2.imwrite(command.fv.output, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
  print(f'written {command.fv.output}')
  return 0


if __name__ == '__main__':
  sys.exit(cli.guarded(_main, None, __doc__))
