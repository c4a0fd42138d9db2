"""star_jax: STAR loss facial landmark detection in JAX / Flax NNX.

Importing star_jax (or any of its modules) changes nothing in the process: the CPU tuning of the
command-line tools is an explicit call, `star_jax.cpu_tuning.setup_process()`.

The Python API is `star_jax.FaceLandmarker` (star_jax/inference/landmarker.py), imported on first
use so that `import star_jax` stays fast (no JAX, no OpenCV).
"""

import importlib

__version__ = '0.1.0'

# Public names imported lazily, on first attribute access: name -> module.
_LAZY = {'FaceLandmarker': 'star_jax.inference.landmarker'}

__all__ = ['FaceLandmarker', '__version__']


def __getattr__(name):
  if name in _LAZY:
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(set(globals()) | set(_LAZY))
