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
