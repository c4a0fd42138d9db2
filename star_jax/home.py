"""star_jax's cache folder: the released models (star_jax/pretrained.py) and JAX's persistent
compilation cache.

The folder is $STAR_JAX_HOME, by default `star_jax` in the user's cache folder ($XDG_CACHE_HOME, else
~/.cache). Nothing is created until something is stored there.

The compilation cache: every `predict` process would otherwise compile the network again (3-4 s on a
CPU for the full WFLW network). `enable_compilation_cache` points JAX's persistent cache at
<home>/jax_cache, so that a second run of the same network and batch shape loads the compiled
program instead. It is called by the readers that run a checkpoint (FaceLandmarker.from_checkpoint,
hence predict, the demo and the Python API); it leaves a cache that the user configured alone
(JAX_COMPILATION_CACHE_DIR or jax.config), and STAR_JAX_COMPILATION_CACHE=0 turns it off.
"""

from __future__ import annotations

import os
import pathlib

HOME_ENV = 'STAR_JAX_HOME'
COMPILATION_CACHE_ENV = 'STAR_JAX_COMPILATION_CACHE'
_OFF = ('0', 'false', 'no', 'off')


def home() -> pathlib.Path:
  """The cache folder: $STAR_JAX_HOME, else $XDG_CACHE_HOME/star_jax, else ~/.cache/star_jax."""
  if os.environ.get(HOME_ENV):
    return pathlib.Path(os.environ[HOME_ENV]).expanduser()
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return pathlib.Path(base) / 'star_jax'


def enable_compilation_cache() -> pathlib.Path | None:
  """Points JAX's persistent compilation cache at <home>/jax_cache, unless one is configured already
  or $STAR_JAX_COMPILATION_CACHE is 0 / false / off. Returns the cache folder in use (None when off).

  Changes the process's JAX configuration (the cache applies to every later compilation); JAX only
  caches programs that take over a second to compile (jax_persistent_cache_min_compile_time_secs).
  """
  import jax  # lazy: JAX-free ONNX path (the cache is JAX's; an ONNX run never calls this)

  if os.environ.get(COMPILATION_CACHE_ENV, '1').strip().lower() in _OFF:
    return None
  configured = jax.config.jax_compilation_cache_dir
  if configured:
    return pathlib.Path(configured)
  folder = home() / 'jax_cache'
  try:
    folder.mkdir(parents=True, exist_ok=True)
  except OSError:
    return None  # a read-only home: run without the cache, as before
  jax.config.update('jax_compilation_cache_dir', str(folder))
  return folder
