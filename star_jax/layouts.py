"""Landmark layouts of the supported datasets: point counts, edges, flip pairs, NME indices.

A layout is everything that depends only on *which points* a dataset annotates, shared by the
configs, the data pipeline (flip, edge-map targets), the model (AAM edge-to-point transform) and the
metrics (normalising distances). Values follow the official STAR code (`conf/alignment.py`).

Coordinates everywhere in star_jax are (x, y); pixel coordinates are 0-based.
"""

from __future__ import annotations

import dataclasses

import numpy as np

Edge = tuple[bool, tuple[int, ...]]  # (is_closed, point indices along the curve)


@dataclasses.dataclass(frozen=True)
class Layout:
  """The annotation layout of one dataset.

  Attributes:
    name: 'WFLW', '300W' or 'COFW'.
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

LAYOUTS = {layout.name: layout for layout in (WFLW, W300, COFW)}


def get_layout(name: str) -> Layout:
  """Looks a layout up by name ('WFLW', '300W', 'COFW'; case-insensitive)."""
  for key, layout in LAYOUTS.items():
    if key.lower() == str(name).lower():
      return layout
  raise ValueError(f'unknown landmark layout {name!r}; choose one of {sorted(LAYOUTS)}')

