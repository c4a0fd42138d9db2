"""Speed benchmarks of star_jax, one section per part of the system.

  python scripts/benchmark.py loss|model|data|train|eval|export|video|all [--json OUT.json] [--official PATH] [--repeats N]

Prints a table on stdout and writes the rows as JSON. Runs on the default JAX backend (the GPU when
one is present). `--official PATH` points at a checkout of the official PyTorch code
(github ZhenglinZhou/STAR) to time it side by side; that needs PyTorch installed, star_jax does not.
Each section lives in `benchmarks/<section>.py` (a folder of the repository, not of the installed
library) and returns a list of row dicts: {'section', 'name', 'value', 'unit', 'notes'}; the official
code is loaded by `benchmarks/official.py`.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import platform
import sys

from absl import flags

# The benchmarks package is a folder of the checkout, beside this script's folder.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from star_jax import cli  # pylint: disable=wrong-import-position

SECTIONS = ('loss', 'model', 'data', 'train', 'eval', 'export', 'video')


def _benchmark(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_string('json', 'benchmark.json', 'where to write the rows (JSON)', flag_values=fv)
  flags.DEFINE_string('official', '', 'checkout of the official PyTorch STAR code', flag_values=fv)
  flags.DEFINE_integer('repeats', None, 'timed repetitions, the median is reported (default: 10, or 3 for '
                       'the full-network sections on a CPU, where one call takes seconds)', flag_values=fv)
  rest = command.parse()
  if len(rest) != 1 or rest[0] not in SECTIONS + ('all',):
    raise flags.Error(f'give one section: {", ".join(SECTIONS)} or all')
  import benchmarks  # pylint: disable=import-outside-toplevel
  try:
    benchmarks.check_repeats(fv.repeats)   # before any section starts its work
  except ValueError as e:
    raise flags.Error(str(e)) from None

  import jax  # pylint: disable=import-outside-toplevel  (after argument parsing, so --help is fast)

  from star_jax import cpu_tuning  # pylint: disable=import-outside-toplevel
  device = (f'{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.machine()}, {jax.default_backend()}; '
            f'star_jax CPU tuning {cpu_tuning.status()})')
  rows = []
  for section in (SECTIONS if rest[0] == 'all' else (rest[0],)):
    module = importlib.import_module(f'benchmarks.{section}')
    for row in module.run(fv):
      row.setdefault('section', section)
      row.setdefault('notes', '')
      rows.append(row)
      print(f"{row['section']:6s} {row['name']:55s} {row['value']:12.4g} {row['unit']:10s} {row['notes']}",
            flush=True)
  with open(fv.json, 'w') as f:
    json.dump({'device': device, 'python': sys.version.split()[0], 'jax': jax.__version__, 'rows': rows}, f,
              indent=1)
  print(f'device: {device}; rows written to {fv.json}')
  return 0


def main(argv=None) -> int:
  return cli.guarded(_benchmark, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)   # with the CPU tuning, as the trainer runs (see star_jax/cpu_tuning.py)
