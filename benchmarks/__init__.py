"""Benchmark sections for scripts/benchmark.py; each module has `run(args) -> list[dict]`."""

import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = pathlib.Path(__file__).resolve().parents[1]


def median_time(fn, repeats: int, warmup: int = 1) -> float:
  """Median wall time of `fn()` in seconds; `fn` must block until its work is done."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


# The full-network sections take seconds per call on a CPU: fewer repetitions there by default.
DEFAULT_REPEATS = 10
DEFAULT_REPEATS_FULL_NETWORK_CPU = 3


def check_repeats(given) -> None:
  """Raises ValueError unless `--repeats` is unset (None) or at least 1."""
  if given is not None and int(given) < 1:
    raise ValueError(f'--repeats must be at least 1, got {given}')


def repeats(args, *, full_network: bool = False) -> int:
  """How many timed repetitions a section runs: `--repeats` when given (at least 1), else
  DEFAULT_REPEATS, or DEFAULT_REPEATS_FULL_NETWORK_CPU for a full-network section on a CPU."""
  given = getattr(args, 'repeats', None)
  check_repeats(given)
  if given is not None:
    return int(given)
  import jax  # pylint: disable=import-outside-toplevel
  if full_network and jax.default_backend() == 'cpu':
    return DEFAULT_REPEATS_FULL_NETWORK_CPU
  return DEFAULT_REPEATS


def child_environment() -> dict:
  """The environment of a child process running the official code: the caller's as it was before
  star_jax's CPU tuning (the official code runs as shipped), with this checkout on PYTHONPATH (for
  `python -m benchmarks.<section>`)."""
  from star_jax import cpu_tuning  # pylint: disable=import-outside-toplevel
  env = cpu_tuning.untuned_environment()
  env['PYTHONPATH'] = os.pathsep.join([str(_REPO)] + [p for p in [env.get('PYTHONPATH', '')] if p])
  return env


class WorkerProcess:
  """A child Python process of the benchmarks (the official code's side), driven by lines on its stdin
  and answering with lines 'WORD REST'; run with the caller's environment as it was before star_jax's CPU
  tuning (the official code runs as shipped) and this checkout on PYTHONPATH. Its stderr is kept for the
  error message when an answer is not the expected one."""

  def __init__(self, argv: list[str], python: str = '', cwd: str | None = None):
    self._stderr = tempfile.TemporaryFile(mode='w+')
    self._proc = subprocess.Popen([python or sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self._stderr, text=True, env=child_environment(), cwd=cwd)

  def _ask(self, line: str, expected: str = 'done') -> str:
    self._proc.stdin.write(line + '\n')
    self._proc.stdin.flush()
    return self._reply(expected)

  def _reply(self, expected: str) -> str:
    """The REST of the next line when its WORD is `expected`; else closes and raises with stderr's tail."""
    line = self._proc.stdout.readline().strip()
    if not line.startswith(expected + ' '):
      self._stderr.seek(0)
      tail = (line + ' ' + self._stderr.read()[-2000:]).strip()
      self.close()
      raise RuntimeError(f'official worker failed: {tail}')
    return line[len(expected) + 1:]

  def close(self):
    if self._proc.poll() is None:
      try:
        self._proc.stdin.write('quit\n')
        self._proc.stdin.flush()
        self._proc.wait(timeout=60)
      except (OSError, ValueError, subprocess.TimeoutExpired):
        self._proc.kill()
    self._stderr.close()
