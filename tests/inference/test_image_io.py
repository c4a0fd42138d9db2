"""Bounded reading of images (star_jax/inference/image_io.py): sizes from headers, refusal before
decoding, OpenCV's errors turned into ImageError, the reduced copy for detection."""

import io
import struct

import cv2
import numpy as np
import pytest
from PIL import Image

from bigimages import write_flat_png
from conftest import DATA
from star_jax.inference import image_io

PHOTO = DATA / 'real_faces_full' / 'breakingbad.jpg'


def _encoded(width=53, height=37):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (height, width, 3), np.uint8)
  out = {}
  for ext, params in (('png', []), ('jpg', []), ('bmp', []), ('webp', [cv2.IMWRITE_WEBP_QUALITY, 80]),
                      ('webp_lossless', [cv2.IMWRITE_WEBP_QUALITY, 101]), ('tiff', []), ('ppm', []),
                      ('pgm', []), ('pbm', [])):
    source = image[..., 0] if ext in ('pgm', 'pbm') else image
    ok, data = cv2.imencode('.' + ext.split('_')[0], source, params)
    assert ok
    out[f'cv2_{ext}'] = data.tobytes()
  for fmt in ('GIF', 'TIFF', 'WEBP', 'JPEG', 'BMP', 'PPM'):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, fmt)
    out[f'pil_{fmt}'] = buffer.getvalue()
  return out


def test_header_size_of_every_format_predict_reads():
  for name, data in _encoded(53, 37).items():
    assert image_io.header_size(data) == (53, 37), name
    # Cut before the size: unknown, not a wrong number (a PNM header fits in 9 bytes).
    cut = image_io.header_size(data[:9])
    assert cut is None or (name[-3:].lower() in ('ppm', 'pgm', 'pbm') and cut == (53, 37)), name
  assert image_io.header_size(b'not an image at all') is None
  # A comment in a PNM header, a BMP stored top-down (negative height).
  assert image_io.header_size(b'P6\n# made by hand\n640 480\n255\n') == (640, 480)
  bmp = bytearray(_encoded()['cv2_bmp'])
  bmp[22:26] = struct.pack('<i', -37)
  assert image_io.header_size(bytes(bmp)) == (53, 37)


def test_probe_reads_a_jpeg_frame_header_after_large_metadata_and_a_tiff_directory_at_the_end(tmp_path):
  jpeg = _encoded(640, 480)['cv2_jpg']
  # A 200 KB APP1 block (in 64 KB segments, the most one may hold) before the frame header.
  segments = b''.join(b'\xff\xe1' + struct.pack('>H', 65533) + bytes(65531) for _ in range(3))
  path = tmp_path / 'exif.jpg'
  path.write_bytes(jpeg[:2] + segments + jpeg[2:])
  assert image_io.header_size(path.read_bytes()[:1000]) is None
  assert image_io.probe(path) == (640, 480)
  assert image_io.read(path).shape == (480, 640, 3)
  tiff = tmp_path / 'big.tif'
  cv2.imwrite(str(tiff), np.zeros((300, 400, 3), np.uint8))     # OpenCV writes the directory after the pixels
  assert image_io.header_size(tiff.read_bytes()[:4096]) is None and image_io.probe(tiff) == (400, 300)


def test_a_huge_png_is_refused_from_its_header_without_decoding(tmp_path, monkeypatch):
  path = write_flat_png(tmp_path / 'huge.png', 20000, 20000)
  assert path.stat().st_size < 2_000_000
  assert image_io.probe(path, None) == (20000, 20000)

  def no_decoding(*args, **kwargs):
    raise AssertionError('decoded')

  monkeypatch.setattr(cv2, 'imdecode', no_decoding)
  with pytest.raises(image_io.ImageTooLargeError, match=r'huge\.png: 20000 x 20000 pixels \(400 million\) is more '
                     r'than the limit of 200 million'):
    image_io.read(path)
  with pytest.raises(image_io.ImageTooLargeError, match='upload.png: 20000 x 20000'):
    image_io.decode(path.read_bytes(), 'upload.png')
  with pytest.raises(image_io.ImageTooLargeError, match='limit of 1 million'):
    image_io.read(path, max_pixels=1_000_000)


def test_opencvs_own_limit_and_broken_files_are_image_errors(tmp_path):
  # 40000 x 40000 is past OpenCV's limit (2^30 pixels): with our limit off, OpenCV refuses it, and
  # that is an ImageError naming the file, not a cv2.error.
  path = write_flat_png(tmp_path / 'huger.png', 40000, 40000)
  with pytest.raises(image_io.ImageError, match=r'huger\.png: OpenCV cannot decode this image') as caught:
    image_io.read(path, max_pixels=None)
  assert not isinstance(caught.value, cv2.error)
  (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8\xff\xe0 truncated')
  with pytest.raises(image_io.ImageError, match=r'bad\.jpg: cannot read this file as an image'):
    image_io.read(tmp_path / 'bad.jpg')
  with pytest.raises(image_io.ImageError, match='cannot read'):
    image_io.decode(b'', 'empty upload')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    image_io.read(tmp_path / 'missing.png')
  assert issubclass(image_io.ImageTooLargeError, image_io.ImageError) and issubclass(image_io.ImageError, ValueError)


def test_formats_without_a_header_reader_are_sized_by_pillow():
  buffer = io.BytesIO()
  Image.fromarray(np.zeros((40, 60, 3), np.uint8)).save(buffer, 'JPEG2000')
  data = buffer.getvalue()
  assert image_io.header_size(data) is None
  with pytest.raises(image_io.ImageTooLargeError, match='60 x 40 pixels'):
    image_io.decode(data, 'photo.jp2', max_pixels=2000)


def test_decoding_gives_rgb_as_opencv_reads_it():
  data = PHOTO.read_bytes()
  image = image_io.decode(data, 'photo')
  bgr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  np.testing.assert_array_equal(image, bgr[..., ::-1])
  assert image.flags['C_CONTIGUOUS'] and image.dtype == np.uint8


def test_reduced_copy_and_its_factors():
  image = np.zeros((1080, 4800, 3), np.uint8)
  small, sx, sy = image_io.reduced(image, 2048)
  assert small.shape == (461, 2048, 3) and sx == pytest.approx(4800 / 2048) and sy == pytest.approx(1080 / 461)
  same, sx, sy = image_io.reduced(image, None)
  assert same is image and (sx, sy) == (1.0, 1.0)
  assert image_io.reduced(image, 4800)[0] is image
