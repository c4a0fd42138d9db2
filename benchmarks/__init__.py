"""Benchmark sections for scripts/benchmark.py; each module has `run(args) -> list[dict]`."""

import statistics
import time


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
