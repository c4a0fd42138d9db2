"""Huge images for the tests of bounded work per image, written without holding their pixels.

`write_flat_png(path, width, height)` writes a valid PNG of one flat colour (20000 x 20000 pixels in
about 1.2 MB, as in a decompression bomb) in a fraction of a second and a few MB of memory: the image
rows are identical, so after a full flush the deflate stream of every block of rows is the same bytes,
and the zlib checksum of the whole is combined from that of one block (adler32 of a concatenation is
a function of the parts' checksums and lengths).
"""

from __future__ import annotations

import pathlib
import struct
import zlib

_ADLER_MOD = 65521


def _adler_combine(a: int, b: int, length_b: int) -> int:
  """adler32 of X + Y from adler32(X) = a, adler32(Y) = b and len(Y): with A = 1 + the byte sum and
  B = the sum of the running A's, A_xy = A_x + A_y - 1 and B_xy = B_x + B_y + len(Y) (A_x - 1)."""
  a1, b1 = a & 0xFFFF, a >> 16
  a2, b2 = b & 0xFFFF, b >> 16
  low = (a1 + a2 - 1) % _ADLER_MOD
  high = (b1 + b2 + length_b * (a1 - 1)) % _ADLER_MOD
  return (high << 16) | low


def _chunk(kind: bytes, data: bytes) -> bytes:
  return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_flat_png(path, width: int, height: int, colour=(90, 140, 200), rows_per_block: int = 64) -> pathlib.Path:
  """Writes an 8-bit RGB PNG of `width` x `height` pixels of one colour; returns the path."""
  row = b'\x00' + bytes(colour) * width            # filter type 0, then the pixels
  rows_per_block = max(1, min(rows_per_block, height))
  blocks, rest = divmod(height, rows_per_block)
  block = row * rows_per_block
  raw = zlib.compressobj(9, zlib.DEFLATED, -15)      # raw deflate: the zlib header and trailer are ours
  first = raw.compress(block) + raw.flush(zlib.Z_FULL_FLUSH)
  repeat = raw.compress(block) + raw.flush(zlib.Z_FULL_FLUSH)
  again = raw.compress(block) + raw.flush(zlib.Z_FULL_FLUSH)
  assert repeat == again, 'deflate did not settle into one block of bytes'
  tail = raw.compress(row * rest) + raw.flush(zlib.Z_FINISH)
  adler, block_adler = 1, zlib.adler32(block)
  for _ in range(blocks):
    adler = _adler_combine(adler, block_adler, len(block))
  if rest:
    adler = _adler_combine(adler, zlib.adler32(row * rest), len(row) * rest)
  header = bytes([0x78, 0xDA])                       # deflate, 32 KB window, level 9; (0x78DA) % 31 == 0
  path = pathlib.Path(path)
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n')
    f.write(_chunk(b'IHDR', struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)))
    f.write(_chunk(b'IDAT', header + first))
    body = repeat * 64
    for start in range(1, blocks, 64):
      n = min(64, blocks - start)
      f.write(_chunk(b'IDAT', body if n == 64 else repeat * n))
    f.write(_chunk(b'IDAT', tail + struct.pack('>I', adler)))
    f.write(_chunk(b'IEND', b''))
  return path
