"""Draws the loss curves of `scripts/benchmark.py fidelity` (ours and the official trainer, 200 steps).

  python scripts/fidelity_plot.py --json fidelity.json --output docs/fidelity_200steps.png

Reads the rows the fidelity section wrote (each run's per-step training loss is in its final-loss row's
'curve'); draws the 20-step running means, and below them each run's ratio to the official run's.
"""

from __future__ import annotations

import json
import pathlib
import sys

from absl import flags
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from star_jax import cli  # noqa: E402  pylint: disable=wrong-import-position

SMOOTH = 20
STYLE = {'official': ('black', '-'), 'official_threads': ('grey', '--'), 'official_order': ('grey', ':'),
         'ours': ('tab:blue', '-'), 'ours_official': ('tab:orange', '--')}


def curves(rows: list[dict]) -> dict[str, np.ndarray]:
  """{run: per-step losses} from the fidelity section's rows."""
  out = {}
  for row in rows:
    if row.get('section') == 'fidelity' and 'curve' in row:
      out[row['name'].split(':')[0]] = np.asarray(row['curve'], np.float64)
  return out


def _plot(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  flags.DEFINE_string('json', None, "the benchmark's JSON output", flag_values=command.fv)
  flags.DEFINE_string('output', None, 'the PNG to write', flag_values=command.fv)
  if command.parse():
    raise flags.Error('no positional arguments are taken')
  command.require('json', 'output')
  path = pathlib.Path(command.fv.json)
  if not path.is_file():
    raise cli.UserError(f'--json {path} is not a file')
  runs = curves(json.loads(path.read_text())['rows'])
  if 'official' not in runs:
    raise cli.UserError(f'{path}: no fidelity rows with loss curves (run scripts/benchmark.py fidelity)')
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  smooth = lambda c: np.convolve(c, np.ones(SMOOTH) / SMOOTH, mode='valid')
  fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, gridspec_kw={'height_ratios': (2, 1)})
  steps = np.arange(SMOOTH, len(runs['official']) + 1)
  reference = smooth(runs['official'])
  for name, curve in runs.items():
    colour, line = STYLE.get(name, ('tab:green', '-'))
    top.plot(steps, smooth(curve), color=colour, linestyle=line, label=name)
    bottom.plot(steps, smooth(curve) / reference - 1, color=colour, linestyle=line)
  top.set_ylabel(f'training loss ({SMOOTH}-step mean)')
  top.legend()
  top.set_title('float32, 200 steps from the same weights on the same batches')
  bottom.set_ylabel('relative to official')
  bottom.set_xlabel('step')
  bottom.axhline(0, color='black', linewidth=0.5)
  fig.tight_layout()
  fig.savefig(command.fv.output, dpi=100)
  print(f'wrote {command.fv.output}')
  return 0


def main(argv=None) -> int:
  return cli.guarded(_plot, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
