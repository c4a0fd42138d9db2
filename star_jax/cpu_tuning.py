"""Process settings that make XLA:CPU training about 1.5x faster on x86 CPUs.

Nothing here happens on import: the entry points (train, evaluate, predict, the benchmark) call
`setup_process()` first thing in their `__main__` (through `star_jax.cli.run`), and library users may
call it themselves. It does nothing where JAX will run on an accelerator (`accelerator_expected`).

Two settings, both for XLA:CPU only (measurements: docs/benchmarks.md, "CPU tuning"):

1. An XLA flag (`xla_flags()`, added to XLA_FLAGS before JAX starts its backend). jaxlib 0.10 hands
   convolutions and matmuls to YNNPACK, whose convolution weight gradients are several times slower
   than XLA's own Eigen convolutions; with the flag YNNPACK keeps only the element-wise fusions. The
   flag is experimental, so it is only added for the jaxlib minor versions it was measured on
   (`_TESTED_JAXLIB`); elsewhere XLA's defaults stay.
2. Transparent huge pages for malloc (`reexec_with_malloc_tuning()`, glibc >= 2.35 on Linux). XLA:CPU
   allocates a fresh multi-GB scratch buffer for every step, and faulting it in 4 KiB pages costs
   seconds of kernel time per step. glibc reads this setting (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`)
   only at process start, so the process re-executes itself once with the variable set.

Set STAR_JAX_CPU_TUNING=0 to turn both off (XLA's and glibc's defaults).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

_TESTED_JAXLIB = ('0.10.',)
_FLAGS = ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution,-individual_dot',)
_HUGETLB = 'glibc.malloc.hugetlb=1'
# The caller's GLIBC_TUNABLES before our re-exec (children that should not inherit ours use it).
ORIGINAL_TUNABLES_ENV = 'STAR_JAX_ORIGINAL_GLIBC_TUNABLES'


def enabled() -> bool:
  """STAR_JAX_CPU_TUNING: '1' (or unset) on, '0' off; anything else is an error, not a guess."""
  value = os.environ.get('STAR_JAX_CPU_TUNING', '1').strip()
  if value not in ('0', '1'):
    raise ValueError(f'environment variable STAR_JAX_CPU_TUNING must be 0 or 1, got {value!r}')
  return value == '1'


def _jaxlib_version() -> str:
  try:
    return importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    return ''


# JAX plugins that give it an accelerator backend (CUDA, ROCm, TPU): with one installed, JAX picks the
# accelerator by default.
_ACCELERATOR_PLUGINS = ('jax-cuda12-plugin', 'jax-cuda13-plugin', 'jax-rocm60-plugin', 'jax-rocm7-plugin',
                        'libtpu', 'libtpu-nightly')


def _installed(distribution: str) -> bool:
  try:
    importlib.metadata.version(distribution)
    return True
  except importlib.metadata.PackageNotFoundError:
    return False


def accelerator_expected() -> bool:
  """Whether JAX will run on an accelerator in this process, decided before JAX starts: JAX_PLATFORMS
  names one (cuda, gpu, rocm, tpu), or, with JAX_PLATFORMS unset, an accelerator plugin is installed.
  JAX_PLATFORMS=cpu means the CPU whatever is installed."""
  platforms = [p.strip().lower() for p in os.environ.get('JAX_PLATFORMS', '').split(',') if p.strip()]
  if platforms:
    return platforms[0] != 'cpu'
  return any(_installed(d) for d in _ACCELERATOR_PLUGINS)


def xla_flags() -> tuple[str, ...]:
  """The XLA:CPU flags we add for this jaxlib (none for untested versions or when disabled)."""
  if not enabled() or not _jaxlib_version().startswith(_TESTED_JAXLIB):
    return ()
  return _FLAGS


def apply_xla_flags():
  """Appends `xla_flags()` to XLA_FLAGS, keeping any the user set (theirs win: a flag named there
  is not added again). Only takes effect if JAX's CPU backend has not started yet."""
  current = os.environ.get('XLA_FLAGS', '')
  names = {f.split('=')[0] for f in current.split()}
  extra = [f for f in xla_flags() if f.split('=')[0] not in names]
  if extra:
    os.environ['XLA_FLAGS'] = ' '.join([current] + extra).strip()


def _glibc_supports_hugetlb() -> bool:
  if not sys.platform.startswith('linux'):
    return False
  lib, version = platform.libc_ver()
  try:
    return lib == 'glibc' and tuple(int(v) for v in version.split('.')[:2]) >= (2, 35)
  except ValueError:
    return False


def _huge_pages_requested() -> bool:
  return 'glibc.malloc.hugetlb' in os.environ.get('GLIBC_TUNABLES', '')


def status() -> str:
  """'on', 'partly on' (XLA flag only, or huge pages only) or 'off', for benchmark reports."""
  if accelerator_expected():
    return 'off'
  parts = (bool(xla_flags()), enabled() and _huge_pages_requested())
  return 'on' if all(parts) else 'partly on' if any(parts) else 'off'


def reexec_with_malloc_tuning():
  """Re-executes this process's command line once with glibc's malloc using transparent huge pages.

  Returns without doing anything when tuning is off, the setting is already there, or the C library
  is not glibc >= 2.35. Call it first thing in an entry point, before any work is done.
  """
  if not enabled() or _huge_pages_requested() or not _glibc_supports_hugetlb():
    return
  tunables = os.environ.get('GLIBC_TUNABLES', '')
  env = dict(os.environ)
  env[ORIGINAL_TUNABLES_ENV] = tunables
  env['GLIBC_TUNABLES'] = f'{tunables}:{_HUGETLB}' if tunables else _HUGETLB
  argv = list(getattr(sys, 'orig_argv', [])) or [sys.executable] + sys.argv
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable] + argv[1:], env)


def setup_process():
  """The CPU tuning of this process, for entry points to call first thing (before any JAX work):
  re-executes once with huge-page malloc, and adds the XLA:CPU flag. Does nothing when tuning is off
  (STAR_JAX_CPU_TUNING=0) or JAX will run on an accelerator (the settings are for XLA:CPU only).
  Raises ValueError for a bad STAR_JAX_CPU_TUNING value."""
  if not enabled() or accelerator_expected():
    return
  reexec_with_malloc_tuning()
  apply_xla_flags()


def untuned_environment() -> dict:
  """os.environ as the caller had it before `reexec_with_malloc_tuning` (for child processes that
  must run as shipped, e.g. the official PyTorch step in the benchmark)."""
  env = dict(os.environ)
  if ORIGINAL_TUNABLES_ENV in env:
    original = env.pop(ORIGINAL_TUNABLES_ENV)
    if original:
      env['GLIBC_TUNABLES'] = original
    else:
      env.pop('GLIBC_TUNABLES', None)
  return env
