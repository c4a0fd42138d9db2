"""Landmark layouts: point counts, edges, flip pairs, NME indices; built in, or from a layout file.

A layout is everything that depends only on *which points* a dataset annotates, shared by the
configs, the data pipeline (flip, edge-map targets), the model (AAM edge-to-point transform) and the
metrics (normalising distances). The built-in values follow the official STAR code
(`conf/alignment.py`).

`config.layout` names a layout in one of three ways, all read by `get_layout`:
  - a built-in name: 'WFLW' (98 points), '300W' (68), '300VW' (68), 'COFW' (29);
  - the path of a layout file (.json; .yaml / .yml with PyYAML installed) for your own points,
    in the format of `layout_from_dict`;
  - the JSON text of such a file: checkpoints store a file's layout this way (`portable`), so that
    a checkpoint keeps working without the file.

Coordinates everywhere in star_jax are (x, y); pixel coordinates are 0-based.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

Edge = tuple[bool, tuple[int, ...]]  # (is_closed, point indices along the curve)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The annotation layout of one dataset.

  Attributes:
    name: 'WFLW', '300W', '300VW', 'COFW', or a layout file's name.
    num_points: landmarks per face.
    edges: AAM boundaries, each (is_closed, indices) in curve order.
    flip_pairs: index pairs swapped by a horizontal flip (points not listed map to themselves).
    flip_offset: a flip maps x to (image_width - flip_offset - x): 1 for WFLW and 300W
      (x' = w - 1 - x), 0 for COFW (x' = w - x), as the official code does.
    ocular: (left, right) point indices (or index tuples, averaged) for inter-ocular NME.
    pupil: the same for inter-pupil NME.
    default_norm: 'ocular' or 'pupil', the normalisation the paper reports first.
    threshold: NME threshold for failure rate and AUC (0.1; 0.05 for 300W).
    attributes: names of the per-image 0/1 flags a dataset records, for per-subset metrics.
  """
  name: str
  num_points: int
  edges: tuple[Edge, ...]
  flip_pairs: tuple[tuple[int, int], ...]
  flip_offset: int
  ocular: tuple
  pupil: tuple
  default_norm: str
  threshold: float
  attributes: tuple[str, ...] = ()

  @property
  def num_edges(self) -> int:
    return len(self.edges)

  def flip_permutation(self) -> np.ndarray:
    """Index array `perm` such that flipped_points = points[perm] (after mirroring x)."""
    perm = np.arange(self.num_points)
    for a, b in self.flip_pairs:
      perm[a], perm[b] = b, a
    return perm

  def edge_membership(self) -> np.ndarray:
    """(num_points, num_edges) float32: 1 where a point lies on an edge, else 0."""
    m = np.zeros((self.num_points, self.num_edges), np.float32)
    for e, (_, indices) in enumerate(self.edges):
      m[list(indices), e] = 1.0
    return m

  def norm_indices(self, norm: str | None = None):
    """The (left, right) indices for the normalisation `norm` ('ocular' / 'pupil')."""
    norm = norm or self.default_norm
    if norm == 'ocular':
      return self.ocular
    if norm == 'pupil':
      return self.pupil
    raise ValueError(f"norm must be 'ocular' or 'pupil', got {norm!r}")


WFLW = Layout(
    name='WFLW',
    num_points=98,
    edges=(
        (False, tuple(range(0, 33))),    # face contour
        (True, tuple(range(33, 42))),    # right eyebrow
        (True, tuple(range(42, 51))),    # left eyebrow
        (False, tuple(range(51, 55))),   # nose line
        (False, tuple(range(55, 60))),   # nose
        (True, tuple(range(60, 68))),    # right eye
        (True, tuple(range(68, 76))),    # left eye
        (True, tuple(range(76, 88))),    # outer lip
        (True, tuple(range(88, 96))),    # inner lip
    ),
    flip_pairs=(
        (0, 32), (1, 31), (2, 30), (3, 29), (4, 28), (5, 27), (6, 26), (7, 25), (8, 24), (9, 23),
        (10, 22), (11, 21), (12, 20), (13, 19), (14, 18), (15, 17),
        (33, 46), (34, 45), (35, 44), (36, 43), (37, 42), (38, 50), (39, 49), (40, 48), (41, 47),
        (60, 72), (61, 71), (62, 70), (63, 69), (64, 68), (65, 75), (66, 74), (67, 73),
        (55, 59), (56, 58),
        (76, 82), (77, 81), (78, 80), (87, 83), (86, 84),
        (88, 92), (89, 91), (95, 93), (96, 97),
    ),
    flip_offset=1,
    ocular=(60, 72),
    pupil=(96, 97),
    default_norm='ocular',
    threshold=0.1,
    attributes=('pose', 'expression', 'illumination', 'makeup', 'occlusion', 'blur'),
)

W300 = Layout(
    name='300W',
    num_points=68,
    edges=(
        (False, tuple(range(0, 17))),    # face contour
        (False, tuple(range(17, 22))),   # right eyebrow
        (False, tuple(range(22, 27))),   # left eyebrow
        (False, tuple(range(27, 31))),   # nose line
        (False, tuple(range(31, 36))),   # nose
        (True, tuple(range(36, 42))),    # right eye
        (True, tuple(range(42, 48))),    # left eye
        (True, tuple(range(48, 60))),    # outer lip
        (True, tuple(range(60, 68))),    # inner lip
    ),
    flip_pairs=(
        (0, 16), (1, 15), (2, 14), (3, 13), (4, 12), (5, 11), (6, 10), (7, 9),
        (17, 26), (18, 25), (19, 24), (20, 23), (21, 22),
        (31, 35), (32, 34),
        (36, 45), (37, 44), (38, 43), (39, 42), (40, 47), (41, 46),
        (48, 54), (49, 53), (50, 52), (61, 63), (60, 64), (67, 65), (58, 56), (59, 55),
    ),
    flip_offset=1,
    ocular=(36, 45),
    pupil=(tuple(range(36, 42)), tuple(range(42, 48))),
    default_norm='ocular',
    threshold=0.05,
    attributes=('common', 'challenge'),
)

COFW = Layout(
    name='COFW',
    num_points=29,
    edges=(
        (True, (0, 4, 2, 5)),            # right eyebrow
        (True, (1, 6, 3, 7)),            # left eyebrow
        (True, (8, 12, 10, 13)),         # right eye
        (False, (9, 14, 11, 15)),        # left eye (open in the official code)
        (True, (18, 20, 19, 21)),        # nose
        (True, (22, 26, 23, 27)),        # lower lip
        (True, (22, 24, 23, 25)),        # upper lip
    ),
    flip_pairs=(
        (0, 1), (4, 6), (2, 3), (5, 7), (8, 9), (10, 11), (12, 14), (16, 17), (13, 15), (18, 19),
        (22, 23),
    ),
    flip_offset=0,
    ocular=(8, 9),
    pupil=(16, 17),
    default_norm='pupil',
    threshold=0.1,
    attributes=('occlusion',),
)

# 300VW: the 300W points, edges and flips (the official '300VW' data definition repeats 300W's).
# FR / AUC at 0.1: the official FR_AUC uses 0.05 for '300W' only. The attributes are the test
# categories of the 300VW benchmark (datasets/the300vw), for per-category scores.
W300VW = dataclasses.replace(
    W300, name='300VW', threshold=0.1, attributes=('category1', 'category2', 'category3'))

LAYOUTS = {layout.name: layout for layout in (WFLW, W300, W300VW, COFW)}

LAYOUT_FILE_SUFFIXES = ('.json', '.yaml', '.yml')
# Keys of a layout file (see layout_from_dict).
_FILE_KEYS = ('name', 'base', 'num_points', 'edges', 'flip_pairs', 'flip_offset', 'ocular', 'pupil',
              'default_norm', 'threshold')


def builtin_layout(name: str) -> Layout | None:
  """The built-in layout called `name` (case-insensitive), or None."""
  for key, layout in LAYOUTS.items():
    if key.lower() == str(name).lower():
      return layout
  return None


def get_layout(spec) -> Layout:
  """The layout that `spec` names: a built-in name ('WFLW', '300W', '300VW', 'COFW'; any case), a
  layout file's path, the JSON text of a layout (what `portable` returns), or a Layout.

  Raises:
    ValueError: for an unknown name or a malformed layout (naming the file, and the line for JSON
      syntax errors); FileNotFoundError is never raised: a path that does not exist is an unknown name.
  """
  if isinstance(spec, Layout):
    return spec
  text = str(spec).strip()
  layout = builtin_layout(text)
  if layout is not None:
    return layout
  if text.startswith('{'):
    return layout_from_dict(_parse_json(text, 'inline layout'), 'inline layout')
  path = pathlib.Path(text).expanduser()
  if path.suffix.lower() in LAYOUT_FILE_SUFFIXES and path.is_file():
    return read_layout_file(path)
  hint = (f'; no layout file {path} exists' if path.suffix.lower() in LAYOUT_FILE_SUFFIXES else
          f', or the path of a layout file ({"/".join(LAYOUT_FILE_SUFFIXES)})')
  raise ValueError(f'unknown landmark layout {text!r}; choose one of {sorted(LAYOUTS)}{hint}')


def portable(spec) -> str:
  """`spec` as a value that needs no file: a built-in name as it is, anything else as the JSON text
  of its layout (for checkpoints and dataset builds, which outlive the layout file)."""
  if isinstance(spec, str) and builtin_layout(spec) is not None:
    return spec
  layout = get_layout(spec)
  if builtin_layout(layout.name) is layout:
    return layout.name
  return json.dumps(layout_to_dict(layout), separators=(',', ':'))


def same_geometry(a: Layout, b: Layout) -> bool:
  """Whether a model of layout `a` predicts the points of `b`: the same number of points on the same
  edges (the network is built from these; 300W and 300VW, say, share them)."""
  return a.num_points == b.num_points and a.edges == b.edges


# ---- Layout files -----------------------------------------------------------------------------------

def _parse_json(text: str, source: str):
  try:
    return json.loads(text)
  except json.JSONDecodeError as e:
    raise ValueError(f'{source}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})') from None


def read_layout_file(path) -> Layout:
  """Reads a layout file (.json, or .yaml / .yml when PyYAML is installed); see layout_from_dict."""
  path = pathlib.Path(path)
  text = path.read_text(encoding='utf-8')
  if path.suffix.lower() == '.json':
    data = _parse_json(text, str(path))
  else:
    try:
      import yaml  # lazy: optional extra (PyYAML, for .yaml layout files: not in the JAX-free install)
    except ImportError:
      raise ValueError(f'{path}: reading YAML layout files needs PyYAML (pip install pyyaml); or write '
                       'the layout as .json') from None
    try:
      data = yaml.safe_load(text)
    except yaml.YAMLError as e:
      mark = getattr(e, 'problem_mark', None)
      where = f'{path}:{mark.line + 1}' if mark is not None else str(path)
      raise ValueError(f'{where}: not valid YAML: {getattr(e, "problem", e)}') from None
  if isinstance(data, dict):
    data = {'name': path.stem, **data}
  return layout_from_dict(data, str(path))


def _index(value, num_points: int, where: str) -> int:
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f'{where}: a point index must be an integer, got {value!r}')
  if not 0 <= value < num_points:
    raise ValueError(f'{where}: point index {value} out of range for {num_points} points (0-based: '
                     f'0..{num_points - 1})')
  return value


def _indices(value, num_points: int, where: str, at_least: int = 1) -> tuple[int, ...]:
  if not isinstance(value, (list, tuple)) or len(value) < at_least:
    raise ValueError(f'{where}: expected a list of at least {at_least} point indices, got {value!r}')
  return tuple(_index(v, num_points, f'{where}[{i}]') for i, v in enumerate(value))


def _norm_pair(value, num_points: int, where: str) -> tuple:
  """(left, right): two point indices, or two lists of indices (averaged)."""
  if not isinstance(value, (list, tuple)) or len(value) != 2:
    raise ValueError(f'{where}: expected [left, right], two point indices or two lists of indices '
                     f'(averaged), got {value!r}')
  out = []
  for i, side in enumerate(value):
    if isinstance(side, (list, tuple)):
      out.append(_indices(side, num_points, f'{where}[{i}]'))
    else:
      out.append(_index(side, num_points, f'{where}[{i}]'))
  return tuple(out)


def _edge(value, num_points: int, where: str):
  """{"points": [...], "closed": bool} or [closed, [...]] -> (closed, indices)."""
  if isinstance(value, dict):
    unknown = sorted(set(value) - {'points', 'closed', 'name'})
    if unknown or 'points' not in value:
      raise ValueError(f'{where}: an edge is {{"points": [indices], "closed": true|false}} (optional '
                       f'"name"), got keys {sorted(value)}')
    closed, points = value.get('closed', False), value['points']
  elif isinstance(value, (list, tuple)) and len(value) == 2 and isinstance(value[0], bool):
    closed, points = value
  else:
    raise ValueError(f'{where}: an edge is {{"points": [indices], "closed": true|false}} or '
                     f'[closed, [indices]], got {value!r}')
  if not isinstance(closed, bool):
    raise ValueError(f'{where}: "closed" must be true or false, got {closed!r}')
  return closed, _indices(points, num_points, f'{where}.points', at_least=2)


def layout_from_dict(data: dict[str, Any], source: str = 'layout') -> Layout:
  """A Layout from the contents of a layout file.

  Keys (point indices are 0-based, in the order of the annotation's points):
    name          the layout's name (a file's default: its file name without suffix).
    base          optional: a built-in layout ('WFLW', '300W', '300VW', 'COFW') whose values the other
                  keys override, e.g. {"base": "300W", "threshold": 0.08}.
    num_points    number of points per face.
    edges         the AAM edges (face parts along which edge maps are drawn), in curve order: a list of
                  {"points": [i, j, ...], "closed": false} (at least 2 points each; "closed": true
                  joins the last point back to the first); at least one edge.
    flip_pairs    [[i, j], ...]: the points a horizontal flip swaps (left / right eye corners...);
                  unlisted points map to themselves. [] when there are none.
    flip_offset   a flip maps x to width - flip_offset - x: 1 (default; WFLW, 300W) or 0 (COFW).
    ocular        [left, right] for the inter-ocular NME: two indices, or two lists of indices whose
                  mean is used (e.g. eye centres from the eye contours).
    pupil         the same for the inter-pupil NME (default: ocular).
    default_norm  'ocular' (default) or 'pupil': the NME normalisation used unless one is asked for.
    threshold     NME threshold of the failure rate and AUC (default 0.1).

  A layout from a file has no attribute flags (per-subset scores come with the built-in datasets).

  Raises:
    ValueError: naming `source` and the key, for anything missing or malformed.
  """
  if not isinstance(data, dict):
    raise ValueError(f'{source}: a layout is a mapping of keys ({", ".join(_FILE_KEYS)}), got '
                     f'{type(data).__name__}')
  unknown = sorted(set(data) - set(_FILE_KEYS))
  if unknown:
    raise ValueError(f'{source}: unknown key(s) {unknown}; a layout file has {list(_FILE_KEYS)}')
  values: dict[str, Any] = {'flip_pairs': [], 'flip_offset': 1, 'default_norm': 'ocular', 'threshold': 0.1}
  if 'base' in data:
    base = builtin_layout(str(data['base']))
    if base is None:
      raise ValueError(f'{source}: "base" must be one of {sorted(LAYOUTS)}, got {data["base"]!r}')
    values.update({f.name: getattr(base, f.name) for f in dataclasses.fields(Layout)})
  values.update({k: v for k, v in data.items() if k != 'base'})
  missing = [k for k in ('name', 'num_points', 'edges', 'ocular') if k not in values]
  if missing:
    raise ValueError(f'{source}: missing key(s) {missing} (or a "base" layout to take them from)')
  name = values['name']
  if not isinstance(name, str) or not name.strip():
    raise ValueError(f'{source}: "name" must be a non-empty string, got {name!r}')
  n = values['num_points']
  if isinstance(n, bool) or not isinstance(n, int) or n < 2:
    raise ValueError(f'{source}: "num_points" must be an integer >= 2, got {n!r}')
  edges = values['edges']
  if not isinstance(edges, (list, tuple)) or not edges:
    raise ValueError(f'{source}: "edges" must be a non-empty list (the network draws an edge map per '
                     f'edge), got {edges!r}')
  edges = tuple(_edge(e, n, f'{source}: edges[{i}]') for i, e in enumerate(edges))
  pairs = values['flip_pairs']
  if not isinstance(pairs, (list, tuple)):
    raise ValueError(f'{source}: "flip_pairs" must be a list of [i, j] pairs, got {pairs!r}')
  seen: dict[int, int] = {}
  flip_pairs = []
  for k, pair in enumerate(pairs):
    where = f'{source}: flip_pairs[{k}]'
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise ValueError(f'{where}: expected a pair [i, j], got {pair!r}')
    a, b = _indices(pair, n, where, at_least=2)
    if a == b:
      raise ValueError(f'{where}: a point cannot swap with itself ({a})')
    for i in (a, b):
      if i in seen:
        raise ValueError(f'{where}: point {i} is already in flip_pairs[{seen[i]}]')
      seen[i] = k
    flip_pairs.append((a, b))
  if values['flip_offset'] not in (0, 1) or isinstance(values['flip_offset'], bool):
    raise ValueError(f'{source}: "flip_offset" must be 0 or 1, got {values["flip_offset"]!r}')
  ocular = _norm_pair(values['ocular'], n, f'{source}: ocular')
  pupil = _norm_pair(values['pupil'], n, f'{source}: pupil') if 'pupil' in values else ocular
  if values['default_norm'] not in ('ocular', 'pupil'):
    raise ValueError(f"{source}: \"default_norm\" must be 'ocular' or 'pupil', got {values['default_norm']!r}")
  threshold = values['threshold']
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
    raise ValueError(f'{source}: "threshold" must be a number in (0, 1), got {threshold!r}')
  return Layout(name=name.strip(), num_points=n, edges=edges, flip_pairs=tuple(flip_pairs),
                flip_offset=int(values['flip_offset']), ocular=ocular, pupil=pupil,
                default_norm=values['default_norm'], threshold=float(threshold), attributes=())


def layout_to_dict(layout: Layout) -> dict[str, Any]:
  """The layout-file contents of `layout` (layout_from_dict reads them back; attributes are dropped)."""
  def plain(value):
    return [plain(v) for v in value] if isinstance(value, (tuple, list)) else value
  return {
      'name': layout.name, 'num_points': layout.num_points,
      'edges': [{'points': list(indices), 'closed': closed} for closed, indices in layout.edges],
      'flip_pairs': plain(layout.flip_pairs), 'flip_offset': layout.flip_offset,
      'ocular': plain(layout.ocular), 'pupil': plain(layout.pupil),
      'default_norm': layout.default_norm, 'threshold': layout.threshold,
  }
