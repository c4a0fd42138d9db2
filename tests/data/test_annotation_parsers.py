"""Property-based tests of every raw annotation parser under random damage: WFLW list lines, iBUG .pts
files, COFW .mat rows, the ADNet / STAR metadata TSV.

Each test writes a valid file from random values, damages it at random (a token replaced by a number,
garbage, NaN, a separator; a character inserted or deleted; a line dropped, doubled or added; the file
cut short; a byte that is not UTF-8), and checks that the parser either

- raises an AnnotationError (a ValueError) whose message starts with 'file:line' (COFW: 'file:var[row]')
  at the first line the format's definition says is wrong, or
- returns exactly the values the damaged file holds, as the format's definition reads them,

and never fails any other way. The definitions (`*_spec` below) are written declaratively from the
format descriptions, independently of the parsers' code, and share only the number syntax (plain
decimals, finite) with them.
"""

import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from star_jax.data import crop
from star_jax.data.annotations import AnnotationError
from star_jax_datasets.cofw import cofw_dataset_builder as cofw
from star_jax_datasets.the300w import the300w_dataset_builder as the300w
from star_jax_datasets.wflw import wflw_dataset_builder as wflw

SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
NUMBER = re.compile(r'[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?', re.ASCII)


class Bad(Exception):
  """The spec's verdict: the file is wrong at `line` (None: the file as a whole)."""

  def __init__(self, line):
    super().__init__(line)
    self.line = line


def num(text: str) -> float:
  """The number a field holds, as the formats define numbers (float32 values, finite)."""
  with np.errstate(over='ignore'):
    if NUMBER.fullmatch(text) is None or not np.isfinite(np.float32(float(text))):
      raise ValueError(text)
  return float(text)


def is_num(text: str) -> bool:
  try:
    num(text)
    return True
  except ValueError:
    return False


def lines_of(data: bytes):
  """(line number, text) of the file's lines: UTF-8, '\\n' / '\\r\\n' / '\\r' line ends."""
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise Bad(data[:e.start].count(b'\n') + 1) from None
  return list(enumerate(re.split(r'\r\n|\r|\n', text), start=1))


# ---- Damage -----------------------------------------------------------------------------------------

TOKENS = ['0', '1', '7', '-3.25', '12.5', '.5', '4.', '1e2', '-2E-3', '+6', '00012',                  # numbers
          'nan', 'NaN', 'inf', '-inf', 'Infinity', '1e999', '1e39', '', 'x', '--1', '1..2', '1_0', '\u0663',
          '0x1f', '.', '-', 'e5', '1,2', '3 4', '5\t6', 'a b', '{', '}', 'n_points: 68', ':']
CHARS = ['0', '9', '.', '-', 'e', ' ', '\t', ',', 'x', ':', '{', '}', '\x00', '\xa0', '\x85', '\u2028', '\r', '\n']


@st.composite
def damaged(draw, data: bytes, sep: str | None) -> bytes:
  """`data` with one to three random kinds of damage; `sep` splits a line into tokens (None: spaces)."""
  text = data.decode()
  for _ in range(draw(st.integers(1, 3))):
    lines = text.split('\n')
    k = draw(st.integers(0, len(lines) - 1))
    kind = draw(st.sampled_from(['token', 'token', 'token', 'drop_token', 'char', 'char', 'drop_char', 'line_drop',
                                 'line_double', 'line_add', 'blank', 'cut', 'byte']))
    if kind in ('token', 'drop_token'):
      tokens = lines[k].split(sep) if sep else lines[k].split(' ')
      j = draw(st.integers(0, len(tokens) - 1))
      if kind == 'token':
        tokens[j] = draw(st.sampled_from(TOKENS))
      else:
        del tokens[j]
      lines[k] = (sep or ' ').join(tokens)
    elif kind in ('char', 'drop_char'):
      i = draw(st.integers(0, len(lines[k])))
      if kind == 'char':
        lines[k] = lines[k][:i] + draw(st.sampled_from(CHARS)) + lines[k][i:]
      else:
        lines[k] = lines[k][:i] + lines[k][i + 1:]
    elif kind == 'line_drop':
      del lines[k]
    elif kind == 'line_double':
      lines.insert(k, lines[k])
    elif kind == 'line_add':
      lines.insert(k, draw(st.sampled_from(TOKENS)))
    elif kind == 'blank':
      lines.insert(k, draw(st.sampled_from(['', ' ', '\t', '\r'])))
    elif kind == 'cut':
      text = text[:draw(st.integers(0, len(text)))]
      continue
    text = '\n'.join(lines)
    if kind == 'byte':
      raw = text.encode()
      i = draw(st.integers(0, len(raw)))
      return raw[:i] + draw(st.sampled_from([b'\xff', b'\xc3', b'\x80'])) + raw[i:]
  return text.encode()


def check(parse, spec, path, data: bytes):
  """The property: `parse` gives `spec`'s records, or an AnnotationError at `spec`'s line."""
  path.write_bytes(data)
  try:
    want = spec(data)
  except Bad as bad:
    with pytest.raises(AnnotationError) as e:
      parse(path, data)
    where = f'{path}:{bad.line}' if bad.line is not None else str(path)
    assert str(e.value).startswith(f'{where}: '), (str(e.value), where, data)
    return
  got = parse(path, data)
  assert len(got) == len(want), (got, want, data)
  for g, w in zip(got, want):
    assert len(g) == len(w)
    for a, b in zip(g, w):
      if isinstance(b, str):
        assert a == b, (a, b, data)
      else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b, np.asarray(a).dtype), err_msg=repr(data))


@pytest.fixture(scope='module')
def scratch(tmp_path_factory):
  return tmp_path_factory.mktemp('parsers')


# ---- WFLW list files --------------------------------------------------------------------------------
# One face per line: 196 coordinates, 4 box values, 6 flags (0 / 1), the image path; blank lines allowed.

def wflw_spec(data: bytes):
  faces = []
  for n, line in lines_of(data):
    tokens = line.split()
    if not tokens:
      continue
    if (len(tokens) != 207 or not all(is_num(t) for t in tokens[:200])
        or not all(t in ('0', '1') for t in tokens[200:206])):
      raise Bad(n)
    values = [num(t) for t in tokens[:200]]
    faces.append((np.reshape(values[:196], (98, 2)), values[196:], [int(t) for t in tokens[200:206]],
                  tokens[206].replace('\\', '/')))
  if not faces:
    raise Bad(None)
  return faces


def wflw_file(rng) -> bytes:
  lines = []
  for i in range(int(rng.integers(1, 4))):
    landmarks = np.round(rng.uniform(0, 500, (98, 2)), int(rng.integers(0, 7)))
    box = rng.integers(0, 500, 4)
    flags = rng.integers(0, 2, 6)
    lines.append(' '.join([f'{v:g}' for v in landmarks.reshape(-1)] + [str(v) for v in box]
                          + [str(v) for v in flags] + [f'{i}--Event/img_{i}.jpg']))
  return ('\n'.join(lines) + '\n').encode()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), draw=st.data())
def test_wflw_list_lines(scratch, seed, draw):
  data = draw.draw(damaged(wflw_file(np.random.default_rng(seed)), sep=' '))

  def parse(path, data):
    return [(f.landmarks, f.box, f.attributes, f.path) for f in wflw.parse_list(data, str(path))]
  check(parse, wflw_spec, scratch / 'list.txt', data)


# ---- iBUG .pts ----------------------------------------------------------------------------------------
# 'key: value' header lines (n_points, if given, is 68), '{', 68 lines 'x y', '}', then nothing;
# blank lines anywhere; points 1-based (the record holds them minus 1).

def pts_spec(data: bytes):
  lines = [(n, line.strip()) for n, line in lines_of(data) if line.strip()]
  if not lines:
    raise Bad(None)
  i = 0
  while i < len(lines) and lines[i][1] != '{':
    key, colon, value = lines[i][1].partition(':')
    if not colon or (key.strip() == 'n_points' and value.strip() != '68'):
      raise Bad(lines[i][0])
    i += 1
  if i == len(lines):
    raise Bad(lines[-1][0])
  points = []
  for n, line in lines[i + 1:]:
    if line == '}':
      if len(points) != 68:
        raise Bad(n)
      rest = [m for m, _ in lines if m > n]
      if rest:
        raise Bad(rest[0])
      return [(np.array(points, np.float32) - 1,)]
    tokens = line.split()
    if len(tokens) != 2 or not all(is_num(t) for t in tokens):
      raise Bad(n)
    points.append([num(t) for t in tokens])
  raise Bad(lines[-1][0])


def pts_file(rng) -> bytes:
  points = np.round(rng.uniform(1, 400, (68, 2)), int(rng.integers(0, 4)))
  header = ['version: 1', 'n_points: 68'] if rng.random() < 0.8 else []
  return ('\n'.join(header + ['{'] + [f'{x:g} {y:g}' for x, y in points] + ['}']) + '\n').encode()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), draw=st.data())
def test_pts_files(scratch, seed, draw):
  data = draw.draw(damaged(pts_file(np.random.default_rng(seed)), sep=' '))
  check(lambda path, data: [(the300w.read_pts(path),)], pts_spec, scratch / 'face.pts', data)


# ---- ADNet / STAR metadata TSV ------------------------------------------------------------------------
# Tab-separated: image path (not blank), 5 points 'x,y,...', N points 'x,y,...', scale (> 0), center_w,
# center_h, optional tags. A first line whose points, scale and centre columns hold no number at all
# is a header. Blank lines allowed.

N = 3


def tsv_spec(data: bytes):
  rows = []
  for n, line in lines_of(data):
    if not line.strip():
      continue
    fields = line.split('\t')
    if n == 1 and len(fields) >= 6 and not any(is_num(v) for f in fields[2:6] for v in f.split(',')):
      continue
    if len(fields) < 6 or not fields[0].strip() or not all(is_num(f) for f in fields[3:6]):
      raise Bad(n)
    points = fields[2].split(',')
    if not all(is_num(p) for p in points) or len(points) != 2 * N or not num(fields[3]) > 0:
      raise Bad(n)
    rows.append((fields[0].replace('\\', '/'), np.reshape([num(p) for p in points], (N, 2)), num(fields[3]),
                 [num(fields[4]), num(fields[5])], n))
  return rows


def tsv_file(rng) -> bytes:
  lines = ['image\tfive\tpoints\tscale\tcenter_w\tcenter_h\ttags'] if rng.random() < 0.5 else []
  for i in range(int(rng.integers(1, 4))):
    points = np.round(rng.uniform(0, 300, 2 * N), 3)
    fields = [f'./raw\\{i}.jpg', ','.join(['1.0'] * 10), ','.join(f'{v:g}' for v in points),
              f'{rng.uniform(0.5, 3):.4f}', f'{rng.uniform(0, 300):.2f}', f'{rng.uniform(0, 300):.2f}']
    lines.append('\t'.join(fields + (['0,1,0'] if rng.random() < 0.5 else [])))
  return ('\n'.join(lines) + '\n').encode()


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), draw=st.data())
def test_metadata_tsv(scratch, seed, draw):
  data = draw.draw(damaged(tsv_file(np.random.default_rng(seed)), sep='\t'))

  def parse(path, data):
    return [(r.image_path, r.landmarks, r.scale, r.center, r.line) for r in crop.read_metadata_tsv(path, N)]
  check(parse, tsv_spec, scratch / 'test.tsv', data)


# ---- COFW .mat rows -----------------------------------------------------------------------------------
# phis: 29 x, 29 y (1-based), 29 occlusion flags (0 / 1), all finite; box x, y, w, h finite, w and h > 0;
# the image uint8 (H, W) or (H, W, 3); landmarks that fit the image only transposed mean a transposed
# image. The record holds the points and box minus 1, the flags as booleans, the image as RGB.

def cofw_spec(phis, box, image):
  phis, box = np.asarray(phis, np.float64), np.asarray(box, np.float64)
  if not np.all(np.isfinite(phis)) or not np.all(np.isin(phis[58:], (0, 1))):
    raise Bad('phis')
  if not np.all(np.isfinite(box)) or not (box[2] > 0 and box[3] > 0):
    raise Bad('box')
  points = np.stack([phis[:29], phis[29:58]], -1) - 1
  with np.errstate(over='ignore'):
    corners = np.array([box[0] - 1, box[1] - 1, box[0] - 1 + box[2], box[1] - 1 + box[3]], np.float32)
    if np.any(~np.isfinite(points.astype(np.float32))):
      raise Bad('phis')
    if np.any(~np.isfinite(corners)):
      raise Bad('box')
  if image.dtype != np.uint8 or not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
    raise Bad('image')
  h, w = image.shape[:2]

  def fits(width, height):
    return bool(np.all((points[:, 0] > -0.25 * width) & (points[:, 0] < 1.25 * width)
                       & (points[:, 1] > -0.25 * height) & (points[:, 1] < 1.25 * height)))
  if h != w and not fits(w, h) and fits(h, w):
    raise Bad('image')
  rgb = image if image.ndim == 3 else np.repeat(image[..., None], 3, -1)
  return {'rgb': rgb, 'landmarks': points.astype(np.float32), 'occluded': phis[58:] != 0,
          'box': np.array([box[0] - 1, box[1] - 1, box[0] - 1 + box[2], box[1] - 1 + box[3]], np.float32)}


VALUES = [np.nan, np.inf, -np.inf, 1e300, 1e39, -1e39, 0.0, 1.0, 0.5, -1.0, 2.0, 3.7, -40.0, 1000.0]


@SETTINGS
@given(seed=st.integers(0, 2**32 - 1), draw=st.data())
def test_cofw_rows(seed, draw):
  rng = np.random.default_rng(seed)
  height, width = int(rng.integers(20, 60)), int(rng.integers(20, 60))
  image = rng.integers(0, 256, (height, width, 3) if rng.random() < 0.5 else (height, width), dtype=np.uint8)
  points = rng.uniform(3, [width - 3, height - 3], (29, 2))
  phis = np.concatenate([points[:, 0], points[:, 1], rng.integers(0, 2, 29)]).astype(np.float64)
  box = np.array([*(points.min(0) - 2), *(points.max(0) - points.min(0) + 4)])
  for _ in range(draw.draw(st.integers(1, 3))):
    kind = draw.draw(st.sampled_from(['phis', 'phis', 'box', 'dtype', 'shape', 'transpose']))
    if kind == 'phis':
      phis[draw.draw(st.integers(0, 86))] = draw.draw(st.sampled_from(VALUES))
    elif kind == 'box':
      box[draw.draw(st.integers(0, 3))] = draw.draw(st.sampled_from(VALUES))
    elif kind == 'dtype':
      image = image.astype(draw.draw(st.sampled_from([np.float64, np.int16, np.uint8])))
    elif kind == 'shape':
      image = draw.draw(st.sampled_from([image[..., :1], np.dstack([image, image]), image.reshape(-1), image]))
    elif image.ndim >= 2:
      image = np.swapaxes(image, 0, 1)
  where = {'image': 'f.mat:IsTr[4]', 'phis': 'f.mat:phisTr[4]', 'box': 'f.mat:bboxesTr[4]'}
  try:
    want = cofw_spec(phis, box, image)
  except Bad as bad:
    with pytest.raises(AnnotationError) as e:
      cofw.face_fields(phis, box, image, where=where['image'], where_phis=where['phis'], where_box=where['box'])
    assert str(e.value).startswith(where[bad.line] + ': '), (str(e.value), bad.line)
    return
  got = cofw.face_fields(phis, box, image, where=where['image'], where_phis=where['phis'], where_box=where['box'])
  assert sorted(got) == sorted(want)
  for key in want:
    assert got[key].dtype == want[key].dtype, key
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
