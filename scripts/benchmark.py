"""Speed benchmarks of star_jax, one section per part of the system.

  python scripts/benchmark.py loss|model|data|train|eval|all [--json OUT.json] [--official PATH]

Prints a table on stdout and writes the rows as JSON. Runs on the default JAX backend (the GPU when
one is present). `--official PATH` points at a checkout of the official PyTorch code
(github ZhenglinZhou/STAR) to time it side by side; that needs PyTorch installed, star_jax does not.
Each section lives in `star_jax/benchmarks/<section>.py` and returns a list of row dicts:
{'section', 'name', 'value', 'unit', 'notes'}.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys

SECTIONS = ('loss', 'model', 'data', 'train', 'eval')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('section', choices=SECTIONS + ('all',))
  parser.add_argument('--json', default='benchmark.json', help='where to write the rows (JSON)')
  parser.add_argument('--official', default='', help='checkout of the official PyTorch STAR code')
  parser.add_argument('--repeats', type=int, default=None,
                      help='timed repetitions, the median is reported (default: 10, or 3 for the '
                           'full-network sections on a CPU, where one call takes seconds)')
  args = parser.parse_args(argv)
  from star_jax import benchmarks  # pylint: disable=import-outside-toplevel
  try:
    benchmarks.check_repeats(args.repeats)   # before any section starts its work
  except ValueError as e:
    parser.error(str(e))

  import jax  # after argument parsing, so --help is fast

  from star_jax import cpu_tuning  # pylint: disable=import-outside-toplevel
  device = (f'{jax.devices()[0].device_kind} x{jax.device_count()} ({platform.machine()}, {jax.default_backend()}; '
            f'star_jax CPU tuning {cpu_tuning.status()})')
  rows = []
  for section in (SECTIONS if args.section == 'all' else (args.section,)):
    module = importlib.import_module(f'star_jax.benchmarks.{section}')
    for row in module.run(args):
      row.setdefault('section', section)
      row.setdefault('notes', '')
      rows.append(row)
      print(f"{row['section']:6s} {row['name']:55s} {row['value']:12.4g} {row['unit']:10s} {row['notes']}",
            flush=True)
  with open(args.json, 'w') as f:
    json.dump({'device': device, 'python': sys.version.split()[0], 'jax': jax.__version__, 'rows': rows}, f,
              indent=1)
  print(f'device: {device}; rows written to {args.json}')


if __name__ == '__main__':
  from star_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  cpu_tuning.reexec_with_malloc_tuning()   # as the trainer runs (see star_jax/cpu_tuning.py)
  main()
