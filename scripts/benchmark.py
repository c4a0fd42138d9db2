"""Speed benchmarks of star_jax, one section per part of the system.

  python scripts/benchmark.py loss|model|data|train|eval|export|video|infer|fidelity|all [--json OUT.json]
      [--official PATH] [--official_python PYTHON] [--repeats N] [--batch B] [--dtypes float32,bfloat16] [--small]
      [--workers 0,8,15] [--official_device auto|cpu|cuda]

Prints a table on stdout and writes the rows as JSON. Runs on the default JAX backend (the GPU when
one is present). `--official PATH` points at a checkout of the official PyTorch code
(github ZhenglinZhou/STAR) to time it side by side; that needs PyTorch installed, star_jax does not.
`--batch`, `--dtypes` and `--small` (a small network, for dry runs on a CPU) choose what the model and
train sections time; `--workers` the Grain worker processes the data section tries; `--official_device`
where the official PyTorch code runs (auto: on the GPU when ours does). scripts/device_check.sh runs the
GPU set (docs/gpu.md). Each section lives in `benchmarks/<section>.py` (a folder of the repository, not of the installed
library) and returns a list of row dicts: {'section', 'name', 'value', 'unit', 'notes'}; the official
code is loaded by `benchmarks/official.py`. `fidelity` is not about speed: it trains the small synthetic
network for 200 steps with the official trainer and with ours (both float32) and compares the loss curves
and test NME with the official trainer's own run-to-run difference (docs/fidelity.md). Sections that run
the official code in a child process (train, infer, fidelity) start it with `--official_python` (default:
this interpreter), which needs PyTorch and numpy, not JAX.
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

SECTIONS = ('loss', 'model', 'data', 'train', 'eval', 'export', 'video', 'infer', 'fidelity')


def _benchmark(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_string('json', 'benchmark.json', 'where to write the rows (JSON)', flag_values=fv)
  flags.DEFINE_string('official', '', 'checkout of the official PyTorch STAR code', flag_values=fv)
  flags.DEFINE_string('official_python', '', 'Python interpreter with PyTorch for the official code\'s child '
                      'process (train, infer, fidelity; default: this one)', flag_values=fv)
  flags.DEFINE_integer('repeats', None, 'timed repetitions, the median is reported (default: 10, or 3 for '
                       'the full-network sections on a CPU, where one call takes seconds)', flag_values=fv)
  flags.DEFINE_integer('batch', None, 'batch size of the model and train sections (default: 8 on a CPU, 32 on '
                       'an accelerator)', flag_values=fv)
  flags.DEFINE_string('dtypes', '', 'compute dtypes of the model and train sections, comma-separated (default: '
                      'float32 on a CPU, float32,bfloat16 on an accelerator)', flag_values=fv)
  flags.DEFINE_bool('small', False, 'model, train and infer sections: a small network instead of the full WFLW '
                    'one, for dry runs and smoke tests (model, train: 64 px, 4 stacks, 32 channels; infer: 256 '
                    'px, 4 stacks, 16 channels)', flag_values=fv)
  flags.DEFINE_string('workers', '', 'data section: also time the Grain pipeline with these numbers of worker '
                      'processes (config.data.num_workers), comma-separated, e.g. 0,8,15', flag_values=fv)
  flags.DEFINE_string('official_device', 'auto', "torch device of the official training step: 'auto' (the GPU "
                      "when our step runs on one), 'cpu' or 'cuda'", flag_values=fv)
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

  def write():   # after every row, so that a run stopped part-way keeps what it measured
    with open(fv.json, 'w') as f:
      json.dump({'device': device, 'python': sys.version.split()[0], 'jax': jax.__version__,
                 'backend': jax.default_backend(), 'cpu_tuning': cpu_tuning.status(), 'rows': rows}, f, indent=1)

  for section in (SECTIONS if rest[0] == 'all' else (rest[0],)):
    module = importlib.import_module(f'benchmarks.{section}')
    for row in module.run(fv):
      row.setdefault('section', section)
      row.setdefault('notes', '')
      rows.append(row)
      print(f"{row['section']:6s} {row['name']:55s} {row['value']:12.4g} {row['unit']:10s} {row['notes']}",
            flush=True)
      write()
  write()
  print(f'device: {device}; rows written to {fv.json}')
  return 0


def main(argv=None) -> int:
  return cli.guarded(_benchmark, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)   # with the CPU tuning, as the trainer runs (see star_jax/cpu_tuning.py)
