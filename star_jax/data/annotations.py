"""Reading annotation files strictly: every problem is an `AnnotationError` naming the file and line.

The parsers of the raw annotation formats (WFLW list lines, iBUG .pts, COFW .mat rows, the ADNet /
STAR metadata TSV) share these helpers so that a damaged file can only give either an error that says
where, or exactly the values it holds: numbers are plain decimals (`1`, `-2.5`, `3e-4`) and finite;
Python's looser `float` (which reads 'nan', 'inf', '1_000' and non-ASCII digits) would let a damaged
value through as a silently wrong one.
"""

from __future__ import annotations

import re

import numpy as np

_NUMBER = re.compile(r'[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?', re.ASCII)


def _finite32(value: float) -> bool:
  with np.errstate(over='ignore'):  # 1e39 -> inf is the answer sought, not a problem
    return bool(np.isfinite(np.float32(value)))


class AnnotationError(ValueError):
  """A malformed annotation (or image) of a dataset's raw files.

  Attributes:
    where: 'file:line' (or 'file:variable[row]' for MATLAB files), the place it names first.
  """

  def __init__(self, where: str, message: str):
    super().__init__(f'{where}: {message}')
    self.where = where


def number(text: str, where: str, what: str) -> float:
  """A plain-decimal number, finite as a float32 (the records' type), or AnnotationError at `where`:
  '<what> must be finite numbers, got <text>'."""
  if not (_NUMBER.fullmatch(text) and _finite32(float(text))):
    raise AnnotationError(where, f'{what} must be finite numbers, got {text[:40]!r}')
  return float(text)


def numbers(texts, where: str, what: str) -> np.ndarray:
  """float64 array of `number`s."""
  return np.array([number(t, where, what) for t in texts], np.float64)


def is_number(text: str) -> bool:
  """Whether `text` is a plain-decimal number, finite as a float32."""
  return bool(_NUMBER.fullmatch(text)) and _finite32(float(text))


def text_lines(data: bytes | str, source: str) -> list[str]:
  """The lines of a text file ('\\n', '\\r\\n' or '\\r' endings; no other characters break lines).
  Bytes must be UTF-8: AnnotationError names the first line that is not."""
  if isinstance(data, bytes):
    try:
      data = data.decode('utf-8')
    except UnicodeDecodeError as e:
      line = data[:e.start].count(b'\n') + 1
      raise AnnotationError(f'{source}:{line}', f'not UTF-8 text (byte {data[e.start]:#04x})') from None
  # str.splitlines would also break at \x0b, \x1c, \x85, \u2028...: a stray one would shift every
  # later line number away from what an editor shows.
  return data.replace('\r\n', '\n').replace('\r', '\n').split('\n')
