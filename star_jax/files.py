"""Files written safely, for the trainer's workdir and the dataset builds alike: whole or not at all,
and one writer per directory.

- `atomic_write_text` / `atomic_write_bytes` (temp file, fsync, rename) for whole files and `AppendFile`
  for line or record logs (each append is one `write`; a failed one is cut back off, so the file always
  ends with a complete line).
- `Lock`: `<directory>/lock` names the process that writes the directory (process id, host, start
  time, command). A second writer stops at once (`BusyError`); the lock of a process that is gone is
  taken over with a warning. Held with `fcntl.flock` as well where the filesystem has it, so that the
  kernel, not a guess from the process id, says whether the holder is alive.
"""

from __future__ import annotations

import datetime
import errno
import json
import os
import pathlib
import socket
import sys

from absl import logging

try:
  import fcntl
except ImportError:  # not POSIX: the process-id check alone decides
  fcntl = None

LOCK_FILE = 'lock'


class BusyError(Exception):
  """Another live process holds the directory's lock; the message names it and says what to do."""


# ================================================================================================
# Whole files and appended lines
# ================================================================================================

def _fsync_dir(directory: pathlib.Path) -> None:
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return  # some filesystems cannot open directories; the rename itself is still atomic
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def atomic_write_bytes(path, data: bytes) -> None:
  """Writes `path` so that it holds either its old content or all of `data`, never a part.

  The data goes to a temporary file beside it, is flushed to disk, and replaces `path` by a rename.
  Raises OSError (ENOSPC, ...) with the temporary file removed and `path` untouched.
  """
  path = pathlib.Path(path)
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')
  try:
    with open(tmp, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      tmp.unlink()
    except OSError:
      pass
    raise
  _fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
  """`atomic_write_bytes` of UTF-8 text."""
  atomic_write_bytes(path, text.encode('utf-8'))


class AppendFile:
  """An append-only file written in whole units: each `append` is one `write` call, and a write that
  fails or comes up short (disk full) is cut back off, so readers never see half a line or record.

  line_based: the units are text lines; a torn last line left by an earlier crash is cut off (with a
  warning) when the file is opened, so that the file stays valid JSON lines.
  """

  def __init__(self, path, *, line_based: bool = True):
    self.path = pathlib.Path(path)
    self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    if line_based:
      self._cut_torn_line()

  def _cut_torn_line(self) -> None:
    size = os.fstat(self._fd).st_size
    if not size:
      return
    with open(self.path, 'rb') as f:
      # The last newline is near the end: read backwards in blocks until it is found.
      end = size
      while end > 0:
        start = max(0, end - 65536)
        f.seek(start)
        block = f.read(end - start)
        if end == size and block.endswith(b'\n'):
          return
        cut = block.rfind(b'\n')
        if cut >= 0:
          keep = start + cut + 1
          break
        end = start
      else:
        keep = 0
    logging.warning('%s: cutting off a torn last line (%d bytes) left by an interrupted write',
                    self.path, size - keep)
    os.ftruncate(self._fd, keep)

  def append(self, data: bytes) -> None:
    """Appends `data` whole. Raises OSError (the file then ends where it ended before)."""
    size = os.lseek(self._fd, 0, os.SEEK_END)
    try:
      written = os.write(self._fd, data)
      if written != len(data):  # a short write on a regular file: the disk is full
        raise OSError(errno.ENOSPC, f'{os.strerror(errno.ENOSPC)} (wrote {written} of {len(data)} bytes)',
                      str(self.path))
    except OSError:
      try:
        os.ftruncate(self._fd, size)
      except OSError:
        pass
      raise

  def append_line(self, line: str) -> None:
    """Appends one text line (a newline is added)."""
    self.append((line + '\n').encode('utf-8'))

  def close(self) -> None:
    if self._fd is not None:
      os.close(self._fd)
      self._fd = None


def append_json_line(path, record: dict) -> None:
  """Appends one JSON line to `path` (see AppendFile)."""
  f = AppendFile(path)
  try:
    f.append_line(json.dumps(record))
  finally:
    f.close()


# ================================================================================================
# The lock
# ================================================================================================

def _now() -> str:
  return datetime.datetime.now().isoformat(timespec='seconds')


def _alive(pid: int) -> bool:
  """Whether a process with this id exists on this host."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # exists, owned by someone else
  except OSError:
    return True
  return True


def _describe(holder: dict) -> str:
  return (f"process {holder.get('pid', '?')} on host {holder.get('host', '?')}, started "
          f"{holder.get('started', '?')} ({holder.get('command', '?')})")


class Lock:
  """The one-writer lock of a directory (see module doc). `Lock.acquire(directory)`, then `release()`;
  or `with Lock.acquire(directory):`.

  A second process that finds the lock held by a live process raises BusyError naming it. A lock
  left by a process that no longer runs on this host (killed, machine crash) is taken over with a
  warning. A lock held from another host cannot be checked from here: it is refused, and the message
  says to delete the file if that run is gone.
  """

  def __init__(self, path: pathlib.Path, fd: int, info: dict):
    self.path = path
    self._fd = fd
    self.info = info

  @classmethod
  def acquire(cls, directory, *, name: str = LOCK_FILE, what: str = 'workdir') -> 'Lock':
    """Takes `<directory>/<name>`; `what` names the directory in messages ('workdir', 'dataset')."""
    path = pathlib.Path(directory) / name
    me = {'pid': os.getpid(), 'host': socket.gethostname(), 'started': _now(),
          'command': ' '.join(sys.argv)[:500]}
    for _ in range(10):  # retried only when the file is swapped under us (see below)
      fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        flocked = cls._flock(fd, path, what)
        # The previous holder may have deleted the file between our open and our flock: then we hold
        # a lock on a file nobody else will see. Start again on the current file.
        if flocked and os.fstat(fd).st_ino != os.stat(path).st_ino:
          os.close(fd)
          continue
      except FileNotFoundError:
        os.close(fd)
        continue
      except BaseException:
        os.close(fd)
        raise
      try:
        holder = cls._read(fd)
        if holder and holder.get('pid') != me['pid']:
          cls._judge(holder, flocked, path, what)
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + '\n').encode(), 0)
        os.fsync(fd)
      except BaseException:
        os.close(fd)
        raise
      return cls(path, fd, me)
    raise BusyError(f'{path}: the lock file keeps being replaced by another process; is another run '
                           f'starting on this {what}?')

  @staticmethod
  def _flock(fd: int, path: pathlib.Path, what: str) -> bool:
    """True when the kernel lock is ours; False where the filesystem has none (then the pid decides)."""
    if fcntl is None:
      return False
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      return True
    except BlockingIOError:
      holder = Lock._read(fd)
      who = _describe(holder) if holder else 'another process'
      raise BusyError(f'this {what} is in use by {who} ({path}); wait for it to finish or stop it, '
                             f'or use another {what}') from None
    except OSError:
      return False  # e.g. ENOLCK / EINVAL on filesystems without flock

  @staticmethod
  def _read(fd: int) -> dict:
    try:
      text = os.pread(fd, 65536, 0).decode('utf-8', 'replace')
      holder = json.loads(text) if text.strip() else {}
      return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
      return {}

  @staticmethod
  def _judge(holder: dict, flocked: bool, path: pathlib.Path, what: str) -> None:
    """Raises unless the lock `holder` left is stale; warns when taking a stale one over."""
    same_host = holder.get('host') == socket.gethostname()
    pid = holder.get('pid')
    if same_host and isinstance(pid, int) and (flocked or not _alive(pid)):
      # With the kernel lock ours, its holder is gone (even if the pid now names another process).
      logging.warning('%s: taking over the stale lock of %s: that process is no longer running', path,
                      _describe(holder))
      return
    if not same_host:
      raise BusyError(
          f'this {what} is locked by {_describe(holder)} ({path}), another host, so it cannot be checked '
          f'from here. If that run is gone, delete {path} and start again.')
    raise BusyError(f'this {what} is in use by {_describe(holder)} ({path}); wait for it to finish '
                           f'or stop it, or use another {what}')

  def release(self) -> None:
    """Deletes the lock file and drops the lock (a clean exit leaves no lock behind)."""
    if self._fd is None:
      return
    try:
      self.path.unlink()
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None

  def __enter__(self) -> 'Lock':
    return self

  def __exit__(self, *exc) -> None:
    self.release()
