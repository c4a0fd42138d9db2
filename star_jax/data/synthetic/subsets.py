"""The 68-point (300W) and 29-point (COFW) synthetic faces: subsets of the 98 WFLW points, so that
every layout carries the same faces and the same (tangential) label noise."""

from __future__ import annotations

import numpy as np

from star_jax import layouts


# 300W (iBUG 68): every second contour point; upper edges of the brows; nose line and nostril base
# as they are; eyes: the corners and the outer / inner of the three WFLW lid points; lips as they are.
WFLW_TO_300W = np.array(
    list(range(0, 33, 2))                          # 0-16 contour
    + [33, 34, 35, 36, 37, 42, 43, 44, 45, 46]     # 17-26 brows (upper edge, image-left first)
    + [51, 52, 53, 54, 55, 56, 57, 58, 59]         # 27-35 nose
    + [60, 61, 63, 64, 65, 67]                     # 36-41 right eye (image-left)
    + [68, 69, 71, 72, 73, 75]                     # 42-47 left eye
    + list(range(76, 96)),                         # 48-67 lips
    np.int32)

# COFW (29): the WFLW points the STAR authors use for the COFW subset (tools/analysis_motivation.py
# of the official code), put in COFW order: brow corners and mid-points (inner corner = WFLW's lower
# inner brow point), eye corners and lid mid-points, pupils, nose wings / tip / base, mouth corners,
# lip mid-points, chin.
WFLW_TO_COFW = np.array(
    # 0-7 brows: outer R / L, inner R / L, top R, bottom R, top L, bottom L (R = image-left)
    [33, 46, 38, 50, 35, 40, 44, 48,
     # 8-15 eyes: outer R / L, inner R / L, upper lid R, lower lid R, upper lid L, lower lid L
     60, 72, 64, 68, 62, 66, 70, 74,
     96, 97,                                       # 16-17 pupils
     55, 59, 54, 57,                               # 18-21 nose: wing R/L, tip, base
     76, 82, 79, 90, 94, 85,                       # 22-27 mouth corners R / L, upper lip top / bottom,
                                                   #       lower lip top / bottom
     16],                                          # 28 chin
    np.int32)

_POINT_MAPS = {'WFLW': None, '300W': WFLW_TO_300W, '300VW': WFLW_TO_300W, 'COFW': WFLW_TO_COFW}


def point_map(layout_name: str) -> np.ndarray:
  """Indices into the 98 WFLW points giving `layout_name`'s points, in its order."""
  name = layouts.get_layout(layout_name).name
  m = _POINT_MAPS[name]
  return np.arange(98, dtype=np.int32) if m is None else m
