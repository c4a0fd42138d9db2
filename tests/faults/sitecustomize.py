"""Fault injection for the tests that run the real commands in subprocesses (tests/training/test_train_faults.py).

A subprocess started with this folder on PYTHONPATH imports this module at start-up (Python's
`sitecustomize` hook), before any star_jax code; it changes nothing unless one of these is set:

  STAR_JAX_FAULT_ENOSPC_OPEN=<glob>[@N]   the (N+1)-th opening for writing of a path matching the
                                          fnmatch <glob> (`*` matches '/' too) fails with ENOSPC
                                          (N = 0 when left out): a disk that fills up there.
  STAR_JAX_FAULT_ENOSPC_WRITE=<glob>[@N]  the (N+1)-th `os.write` to an open file whose path matches
                                          fails with ENOSPC, after writing half of its bytes.
  STAR_JAX_FAULT_HANG=<glob>              opening a matching path for writing creates the file named by
  STAR_JAX_FAULT_HANG_MARKER=<path>       STAR_JAX_FAULT_HANG_MARKER and then sleeps forever, for the
                                          test to kill the process there (kill -9 mid-write).

Only Python-level writes are seen (builtins.open, io.open, os.open, os.write): Orbax writes its
metadata files that way, TensorStore its array chunks in C++.
"""

import builtins
import errno
import fnmatch
import io
import os
import time


def _rule(name):
  value = os.environ.get(name)
  if not value:
    return None
  glob, _, count = value.rpartition('@') if '@' in value else (value, '', '0')
  return {'glob': glob, 'left': int(count)}


_OPEN = _rule('STAR_JAX_FAULT_ENOSPC_OPEN')
_WRITE = _rule('STAR_JAX_FAULT_ENOSPC_WRITE')
_HANG = os.environ.get('STAR_JAX_FAULT_HANG')
_MARKER = os.environ.get('STAR_JAX_FAULT_HANG_MARKER')


def _enospc(path):
  return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def _fires(rule, path) -> bool:
  if rule is None or not fnmatch.fnmatch(str(path), rule['glob']):
    return False
  if rule['left'] > 0:
    rule['left'] -= 1
    return False
  return True


def _opening_for_write(path, writing: bool):
  if not writing or not isinstance(path, (str, bytes, os.PathLike)):
    return
  path = os.fsdecode(os.fspath(path))
  if _HANG and fnmatch.fnmatch(path, _HANG):
    with builtins_open(_MARKER, 'w') as f:
      f.write(path)
    while True:
      time.sleep(60)
  if _fires(_OPEN, path):
    raise _enospc(path)


if _OPEN or _WRITE or _HANG:
  builtins_open, os_open, os_write = builtins.open, os.open, os.write

  def _open(file, mode='r', *args, **kwargs):
    _opening_for_write(file, any(c in mode for c in 'wax+'))
    return builtins_open(file, mode, *args, **kwargs)

  def _os_open(path, flags, *args, **kwargs):
    _opening_for_write(path, bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)))
    return os_open(path, flags, *args, **kwargs)

  builtins.open = io.open = _open
  os.open = _os_open

  if _WRITE:
    def _os_write(fd, data):
      try:
        path = os.readlink(f'/proc/self/fd/{fd}')
      except OSError:
        path = ''
      if _fires(_WRITE, path):
        os_write(fd, bytes(data)[:len(data) // 2])  # a torn write, as a filling disk leaves it
        raise _enospc(path)
      return os_write(fd, data)

    os.write = _os_write
