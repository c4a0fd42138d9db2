"""Reading photos with bounded work: the size from the file's header before any pixel is decoded.

Every image file or upload that inference decodes (predict, the demo, the Python API, frames of a
video folder) goes through `read` or `decode`. They read the width and height from the header
(`header_size`: PNG, JPEG, GIF, BMP, WebP, TIFF, PBM/PGM/PPM; other formats through Pillow's lazy
`Image.open`, which also reads the header only) and refuse a file of more than `max_pixels` pixels
before decoding it: a 20000 x 20000 PNG of one colour is 1.2 MB on disk and 1.2 GB decoded. Files
whose size no header reader knows are decoded by OpenCV (bounded by its own limit, 2^30 pixels) and
checked after. (Pillow is not used for every format: its own decompression-bomb guard raises for
more than 179 million pixels, below our default limit, and changing it means changing a process-wide
setting; the header readers here are a few lines each and change nothing.)

DEFAULT_MAX_PIXELS, 200 million pixels: above every camera sensor sold (the largest, medium-format
backs, have 100-151 Mpx) and 16K panoramas (133 Mpx); such a photo decodes to at most 600 MB of RGB.
Errors are ValueErrors naming the file: `ImageError` (not an image OpenCV reads: corrupt, truncated,
another format) and its subclass `ImageTooLargeError`.

`reduced` makes the small copy that faces are detected on (the detector's work grows with the pixels;
the landmarks are still predicted on crops of the full-resolution image).
"""

from __future__ import annotations

import io
import os
import pathlib
import struct
import warnings

import cv2
import numpy as np

DEFAULT_MAX_PIXELS = 200_000_000
# The first bytes read for the header; a JPEG whose frame header (SOF) lies further on (after large
# EXIF or ICC blocks) is read whole.
_HEAD_BYTES = 1 << 16


class ImageError(ValueError):
  """A file or upload that cannot be read as an image (the message names it)."""


class ImageTooLargeError(ImageError):
  """An image with more pixels than the limit (read from its header, before decoding)."""


# ---- Headers ------------------------------------------------------------------------------------

_TIFF_MAGIC = (b'II*\x00', b'MM\x00*')
_JPEG_FRAMES = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(data: bytes):
  i = 2
  while i + 4 <= len(data):
    if data[i] != 0xFF:
      return None
    marker = data[i + 1]
    if marker == 0xFF:                         # fill byte
      i += 1
      continue
    if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
      i += 2
      continue
    if marker in (0xD9, 0xDA):                 # end of image, start of scan: no frame header before them
      return None
    if marker in _JPEG_FRAMES:
      if i + 9 > len(data):
        return None
      height, width = struct.unpack('>HH', data[i + 5:i + 9])
      return (width, height) if height else None  # height 0: given by a later DNL marker
    i += 2 + int.from_bytes(data[i + 2:i + 4], 'big')
  return None


def _tiff_size(read_at):
  """The size in a TIFF's first image directory; read_at(offset, n) returns n bytes of the file at
  offset (a directory may lie anywhere in the file, often after the pixels)."""
  order = '<' if read_at(0, 2) == b'II' else '>'
  try:
    (offset,) = struct.unpack(order + 'I', read_at(4, 4))
    (count,) = struct.unpack(order + 'H', read_at(offset, 2))
    entries = read_at(offset + 2, 12 * count)
    found = {}
    for k in range(count):
      entry = entries[12 * k:12 * k + 12]
      tag, kind = struct.unpack(order + 'HH', entry[:4])
      if tag in (256, 257) and kind in (3, 4):  # ImageWidth, ImageLength as SHORT or LONG
        found[tag] = struct.unpack(order + ('H' if kind == 3 else 'I'), entry[8:10 if kind == 3 else 12])[0]
  except struct.error:
    return None
  return (found[256], found[257]) if len(found) == 2 else None


def _pnm_size(data: bytes):
  tokens, i = [], 2
  while len(tokens) < 2 and i < len(data):
    c = data[i:i + 1]
    if c == b'#':
      end = data.find(b'\n', i)
      i = len(data) if end < 0 else end + 1
    elif c.isspace():
      i += 1
    else:
      j = i
      while j < len(data) and not data[j:j + 1].isspace() and data[j:j + 1] != b'#':
        j += 1
      if j == len(data):
        return None                            # the token may go on past what was read
      tokens.append(data[i:j])
      i = j
  if len(tokens) < 2 or not all(t.isdigit() for t in tokens):
    return None
  return int(tokens[0]), int(tokens[1])


def _webp_size(data: bytes):
  kind = data[12:16]
  if kind == b'VP8 ' and len(data) >= 30 and data[23:26] == b'\x9d\x01\x2a':
    width, height = struct.unpack('<HH', data[26:30])
    return width & 0x3FFF, height & 0x3FFF
  if kind == b'VP8L' and len(data) >= 25 and data[20] == 0x2F:
    bits = int.from_bytes(data[21:25], 'little')
    return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
  if kind == b'VP8X' and len(data) >= 30:
    return 1 + int.from_bytes(data[24:27], 'little'), 1 + int.from_bytes(data[27:30], 'little')
  return None


def header_size(data: bytes) -> tuple[int, int] | None:
  """(width, height) read from the first bytes of an image file, for PNG, JPEG, GIF, BMP, WebP, TIFF
  and PBM/PGM/PPM; None for another format or when `data` ends before the size (a JPEG's frame
  header may come after its metadata)."""
  if data[:8] == b'\x89PNG\r\n\x1a\n' and data[12:16] == b'IHDR' and len(data) >= 24:
    return struct.unpack('>II', data[16:24])
  if data[:2] == b'\xff\xd8':
    return _jpeg_size(data)
  if data[:6] in (b'GIF87a', b'GIF89a') and len(data) >= 10:
    return struct.unpack('<HH', data[6:10])
  if data[:2] == b'BM' and len(data) >= 26:
    (dib,) = struct.unpack('<I', data[14:18])
    if dib == 12:                              # OS/2 BITMAPCOREHEADER: 16-bit sizes
      return struct.unpack('<HH', data[18:22])
    width, height = struct.unpack('<ii', data[18:26])
    return abs(width), abs(height)             # a negative height is a top-down bitmap
  if data[:4] == b'RIFF' and data[8:12] == b'WEBP':
    return _webp_size(data)
  if data[:4] in _TIFF_MAGIC:
    return _tiff_size(lambda offset, n: data[offset:offset + n])
  if len(data) >= 3 and data[:1] == b'P' and data[1:2] in b'123456' and data[2:3].isspace():
    return _pnm_size(data)
  return None


def _pillow_size(data: bytes, name: str, max_pixels: int | None):
  """The size by Pillow's lazy open (header only), for formats `header_size` does not read."""
  try:
    from PIL import Image  # lazy: JAX-free ONNX path (Pillow is not in the JAX-free install)
  except ImportError:
    return None
  with warnings.catch_warnings():
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    try:
      with Image.open(io.BytesIO(data)) as image:
        return image.size
    except Image.DecompressionBombError:
      # Over twice Pillow's own limit; whether over ours too depends on ours.
      limit = 2 * (Image.MAX_IMAGE_PIXELS or 0)
      if max_pixels is not None and limit and max_pixels <= limit:
        raise ImageTooLargeError(f'{name}: more than {limit / 1e6:.0f} million pixels (the limit is '
                                 f'{max_pixels / 1e6:g} million; max_pixels / --max_pixels sets it)') from None
      return None
    except Exception:  # pylint: disable=broad-except  (a format Pillow does not know, or a broken one)
      return None


def check_size(size: tuple[int, int] | None, name: str, max_pixels: int | None) -> None:
  """Raises ImageTooLargeError when `size` (width, height) has more than `max_pixels` pixels."""
  if size is None or max_pixels is None:
    return
  width, height = int(size[0]), int(size[1])
  if width * height > max_pixels:
    raise ImageTooLargeError(
        f'{name}: {width} x {height} pixels ({width * height / 1e6:.0f} million) is more than the limit of '
        f'{max_pixels / 1e6:g} million (max_pixels / --max_pixels sets it)')


# ---- Decoding -----------------------------------------------------------------------------------

def _checked_decode(data: bytes, name: str, max_pixels: int | None, size) -> np.ndarray:
  if size is None:
    size = _pillow_size(data, name, max_pixels)
  check_size(size, name, max_pixels)
  try:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
  except cv2.error as e:  # e.g. more pixels than OpenCV's own limit (CV_IO_MAX_IMAGE_PIXELS)
    reason = ' '.join(str(e).split())[-200:]
    raise ImageError(f'{name}: OpenCV cannot decode this image ({reason})') from None
  if image is None:
    raise ImageError(f'{name}: cannot read this file as an image (corrupt or unsupported format)')
  check_size((image.shape[1], image.shape[0]), name, max_pixels)
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB, dst=image)  # in place: no second copy of a big photo


def decode(data: bytes, name: str = 'the image', max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Encoded image bytes -> uint8 (H, W, 3) RGB (grey and 16-bit images converted, EXIF orientation
  applied). Raises ImageTooLargeError over `max_pixels` (None: no limit), read from the header
  before decoding, and ImageError for what is not an image; both name `name`."""
  return _checked_decode(data, name, max_pixels, header_size(data))


def probe(path: os.PathLike | str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> tuple[int, int] | None:
  """The (width, height) of an image file from its header (None when the format's header is not read
  here); ImageTooLargeError over `max_pixels`. Reads a few KB (the whole file only for a JPEG whose
  frame header comes after large metadata)."""
  path = pathlib.Path(path)
  with open(path, 'rb') as f:
    head = f.read(_HEAD_BYTES)
    size = header_size(head)
    if size is None and head[:2] == b'\xff\xd8' and len(head) == _HEAD_BYTES:
      size = header_size(head + f.read())
    elif size is None and head[:4] in _TIFF_MAGIC:

      def read_at(offset: int, n: int) -> bytes:
        f.seek(offset)
        return f.read(n)

      size = _tiff_size(read_at)
  check_size(size, str(path), max_pixels)
  return size


def read(path: os.PathLike | str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """An image file as uint8 (H, W, 3) RGB, like `decode`; FileNotFoundError when it does not exist.
  A file refused by its header is not read further than the header."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'image {path} does not exist' if not path.exists() else f'{path} is not a file')
  try:
    size = probe(path, max_pixels)
    data = path.read_bytes()
  except OSError as e:
    raise ImageError(f'{path}: cannot read this file ({e.strerror or e})') from None
  return _checked_decode(data, str(path), max_pixels, size)


def reduced(image: np.ndarray, max_side: int | None) -> tuple[np.ndarray, float, float]:
  """`image` shrunk (INTER_AREA) so that its longer side is at most `max_side`: (copy, sx, sy) with
  sx, sy the factors from its pixels back to the image's (x_image = x_copy * sx); the image itself
  and 1.0, 1.0 when it is small enough already or max_side is None."""
  h, w = image.shape[:2]
  if max_side is None or max(h, w) <= max_side:
    return image, 1.0, 1.0
  s = max_side / max(h, w)
  rw, rh = max(1, round(w * s)), max(1, round(h * s))
  return cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA), w / rw, h / rh
