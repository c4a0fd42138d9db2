"""A look at the synthetic faces: a contact sheet with their landmarks, and a timing.

  python -m star_jax.data.synthetic.preview --sheet /tmp/synthetic_sheet.png --num 16 [--time 100]
"""

from __future__ import annotations

import time

from absl import flags
import cv2

from star_jax import cli
from star_jax import drawing
from star_jax import layouts
from star_jax.data.synthetic.samples import encode_image
from star_jax.data.synthetic.samples import generate


def _preview(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_string('sheet', '/tmp/synthetic_sheet.png', 'contact sheet PNG to write', flag_values=fv)
  flags.DEFINE_integer('num', 16, 'faces on the sheet', lower_bound=1, flag_values=fv)
  flags.DEFINE_integer('start', 0, 'first sample index', lower_bound=0, flag_values=fv)
  flags.DEFINE_string('split', 'train', 'split to draw from', flag_values=fv)
  flags.DEFINE_enum('layout', 'WFLW', sorted(layouts.LAYOUTS), 'landmark layout', flag_values=fv)
  flags.DEFINE_float('ambiguity', 1.0, 'annotation ambiguity level of the train labels', flag_values=fv)
  flags.DEFINE_bool('points', True, 'draw the landmarks (coloured by face part)', flag_values=fv)
  flags.DEFINE_integer('time', 0, 'also time generating + encoding this many faces', flag_values=fv)
  command.parse()
  layout = layouts.get_layout(fv.layout)
  tiles = []
  for i in range(fv.start, fv.start + fv.num):
    s = generate(0, fv.split, i, layout.name, fv.ambiguity)
    tiles.append(drawing.draw_landmarks(s.image, s.landmarks, drawing.part_colors(layout), radius=1.5)
                 if fv.points else s.image)
  sheet = drawing.contact_sheet(tiles, min(4, len(tiles)))
  if not cv2.imwrite(fv.sheet, cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR)):
    raise cli.UserError(f'cannot write {fv.sheet}')
  print(f'wrote {fv.sheet}')
  if fv.time:
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(fv.time):
      encode_image(generate(0, 'train', i, layout.name, fv.ambiguity).image)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    print(f'{fv.time} faces (generate + JPEG encode): wall {dt:.2f} s '
          f'({1e3 * dt / fv.time:.2f} ms/face), CPU {dc:.2f} s ({1e3 * dc / fv.time:.2f} ms/face)')
  return 0


def main(argv=None) -> int:
  return cli.guarded(_preview, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
