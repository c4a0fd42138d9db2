"""Procedurally drawn faces with exact landmarks and controllable annotation ambiguity.

The default data of star_jax: with no dataset downloaded, training runs on these faces. Each face is a
3D-ish template in the WFLW 98-point layout (star_jax.layouts.WFLW), varied in identity, expression
(mouth open, smile, brow raise) and pose (yaw / pitch / roll, mild perspective), projected and drawn
with OpenCV (anti-aliased, sub-pixel vertices) so that every landmark sits on a visible feature: the
contour is the edge of the face against hair / background / neck, the brows are filled shapes whose
outline holds the brow points, the eye lids, lips and nostril line are drawn through their points and
the pupils are the iris centres. Appearance varies in skin tone, hair, lighting gradient, makeup,
random occluders, blur, sensor noise and background (gradient / smooth noise / shapes).

Annotation ambiguity (the study of STAR's claim): the *annotated* training labels are the exact points
moved along the local tangent of their curve (`curve_tangents`), by a Gaussian amount whose standard
deviation is `level x AMBIGUITY_FRACTION[part] x inter-ocular distance`: largest on the face contour
and brows (where human annotators disagree most), small on eyes and lips, zero on the pupils. The
test split is always exact. The image and the exact points do not depend on the level (separate
random streams), so the `level` configs differ only in their training labels.

Determinism: sample `index` of split `split` is a pure function of (seed, split, index).

Coordinates: 0-based pixel (x, y), pixel centres at integers, as cv2 draws them; images RGB uint8
(H, W, 3).

68-point (300W) and 29-point (COFW) variants take subsets of the 98 points (`WFLW_TO_300W`,
`WFLW_TO_COFW`), so they carry the same (tangential) label noise.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import time
import zlib

import cv2
import numpy as np

from star_jax import layouts
from star_jax.data import crop

# ------------------------------------------------------------------------------------------------
# Point maps from the 98-point WFLW layout to the other layouts.

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

_POINT_MAPS = {'WFLW': None, '300W': WFLW_TO_300W, 'COFW': WFLW_TO_COFW}


def point_map(layout_name: str) -> np.ndarray:
  """Indices into the 98 WFLW points giving `layout_name`'s points, in its order."""
  name = layouts.get_layout(layout_name).name
  m = _POINT_MAPS[name]
  return np.arange(98, dtype=np.int32) if m is None else m


# ------------------------------------------------------------------------------------------------
# Annotation ambiguity.

# Standard deviation of the tangential label noise per part, as a fraction of the inter-ocular
# distance at level 1: outline and brows are where annotators disagree most.
AMBIGUITY_FRACTION = {
    'contour': 0.04, 'brow': 0.03, 'nose_line': 0.02, 'nose_base': 0.01, 'eye': 0.01,
    'outer_lip': 0.015, 'inner_lip': 0.01, 'pupil': 0.0,
}
_PART_SLICES = {
    'contour': slice(0, 33), 'brow': slice(33, 51), 'nose_line': slice(51, 55),
    'nose_base': slice(55, 60), 'eye': slice(60, 76), 'outer_lip': slice(76, 88),
    'inner_lip': slice(88, 96), 'pupil': slice(96, 98),
}
_NOISE_CLIP = 3.0  # truncate the Gaussian at this many standard deviations


def ambiguity_fractions() -> np.ndarray:
  """(98,) float: per-point noise standard deviation at level 1, as a fraction of the IOD."""
  f = np.zeros(98, np.float64)
  for part, sl in _PART_SLICES.items():
    f[sl] = AMBIGUITY_FRACTION[part]
  return f


def curve_tangents(points: np.ndarray, layout: layouts.Layout = layouts.WFLW) -> np.ndarray:
  """Unit tangents (N, 2) of `points` (N, 2) along the layout's edges.

  The tangent at a point is the direction from its previous to its next neighbour on its edge
  (closed edges wrap around; an open edge's end points use their one neighbour). Points on no edge,
  or whose neighbours coincide, get a zero tangent. A point on several edges keeps its first one.
  """
  points = np.asarray(points, np.float64)
  t = np.zeros_like(points)
  done = np.zeros(len(points), bool)
  for closed, idx in layout.edges:
    idx = np.asarray(idx)
    p = points[idx]
    if closed:
      d = np.roll(p, -1, axis=0) - np.roll(p, 1, axis=0)
    else:
      nxt = np.concatenate([p[1:], p[-1:]])
      prv = np.concatenate([p[:1], p[:-1]])
      d = nxt - prv
    norm = np.linalg.norm(d, axis=-1, keepdims=True)
    d = np.where(norm > 1e-9, d / np.maximum(norm, 1e-12), 0.0)
    new = ~done[idx]
    t[idx[new]] = d[new]
    done[idx] = True
  return t


def inter_ocular(points98: np.ndarray) -> float:
  """Distance between the outer eye corners (WFLW 60 and 72), in the units of `points98`."""
  return float(np.linalg.norm(points98[60] - points98[72]))


def _room(points: np.ndarray, dirs: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """(N,) largest t >= 0 with lo <= points + t * dirs <= hi in both coordinates (inf if unbounded)."""
  with np.errstate(divide='ignore', invalid='ignore'):
    limit = np.where(dirs > 0, (hi - points) / dirs, np.where(dirs < 0, (lo - points) / dirs, np.inf))
  return np.maximum(limit.min(-1), 0.0)


def tangential_noise(clean98: np.ndarray, z: np.ndarray, level: float,
                     image_size: int | None = None) -> np.ndarray:
  """The annotated labels: `clean98` (98, 2) moved along their tangents.

  Args:
    clean98: exact points, pixels.
    z: (98,) standard-normal draws (one per point; the caller's seeded stream).
    level: ambiguity level (0 = exact labels); the displacement is linear in it.
    image_size: if given, shorten a displacement that would leave [0, image_size - 1] (still along
      the tangent) so labels stay inside the image.

  Returns:
    (98, 2) float64 points with (noisy - clean) parallel to `curve_tangents(clean98)`.
  """
  tangent = curve_tangents(clean98, layouts.WFLW)
  sigma = level * ambiguity_fractions() * inter_ocular(clean98)
  amount = sigma * np.clip(z, -_NOISE_CLIP, _NOISE_CLIP)
  if image_size is not None:
    # Shorten steps that would leave the image (why: labels must stay valid targets); the moved
    # point stays on the tangent line.
    fwd = _room(clean98, tangent, 0.0, image_size - 1.0)
    back = _room(clean98, -tangent, 0.0, image_size - 1.0)
    amount = np.clip(amount, -back, fwd)
  return clean98 + amount[:, None] * tangent


# ------------------------------------------------------------------------------------------------
# Face parameters.

@dataclasses.dataclass(frozen=True)
class FaceParams:
  """Everything that decides one drawn face (lengths in face units: half face width ~ 1)."""
  # Identity.
  face_w: float = 1.0          # half width of the face at the cheeks
  chin_y: float = 1.08         # chin height below the face centre
  jaw_n: float = 2.5           # superellipse exponent of the jaw (2 round, 3+ square)
  temple_y: float = -0.37      # height of the contour's top points (0 and 32)
  eye_x: float = 0.4           # eye centre distance from the midline
  eye_y: float = -0.3          # eye centre height
  eye_w: float = 0.16          # half width of an eye
  eye_open: float = 0.85       # upper-lid opening (1 ~ wide open)
  eye_tilt: float = 0.015      # outer corner raised by this much
  iris_r: float = 0.072        # iris radius
  gaze: tuple = (0.0, 0.0)     # iris offset in (-1, 1) units of the eye
  brow_inner_x: float = 0.13   # inner brow end distance from the midline
  brow_gap: float = 0.2        # brow height above the eye centre
  brow_thick: float = 0.085    # brow thickness at its inner end
  brow_arch: float = 0.06      # arch height of the brow
  nose_tip_y: float = 0.18     # nose tip height
  nose_w: float = 0.16         # half width of the nose wings
  mouth_dy: float = 0.24       # mouth line below the nose base
  mouth_w: float = 0.31        # half width of the mouth
  lip_up: float = 0.06         # upper lip thickness
  lip_low: float = 0.085       # lower lip thickness
  asym: np.ndarray | None = None  # (98, 2) small per-point offsets (natural asymmetry)
  # Expression, each in [0, 1].
  mouth_open: float = 0.0
  smile: float = 0.0
  brow_raise: float = 0.0
  # Pose (degrees) and placement in the image.
  yaw: float = 0.0
  pitch: float = 0.0
  roll: float = 0.0
  scale: float = 0.75          # target box scale: min(w, h) of the 98-point box / 200 x 1.05
  shift: tuple = (0.0, 0.0)    # box centre offset from the image centre, pixels at 256
  # Appearance (RGB colours 0-255).
  skin: tuple = (224, 180, 150)
  hair: tuple = (60, 40, 30)
  hair_style: int = 1          # 0 none, 1 short, 2 long
  hairline: float = -0.95
  brow_color: tuple = (70, 50, 40)
  iris_color: tuple = (90, 60, 40)
  lip_color: tuple = (180, 95, 90)
  clothes: tuple = (60, 80, 130)
  lipstick: bool = False
  eyeshadow: tuple | None = None
  background: int = 0          # 0 gradient, 1 smooth noise, 2 shapes
  bg_colors: tuple = ((120, 140, 160), (200, 210, 220))
  light_angle: float = 0.0     # direction the light comes from (radians, image plane)
  light_strength: float = 0.0  # shading gradient amplitude in [0, 1)
  brightness: float = 1.0      # global exposure factor
  occluders: tuple = ()        # ((kind, cx, cy, w, h, angle, colour), ...) cx..h in face-box units
  blur_sigma: float = 0.0      # Gaussian blur sigma (pixels at 256)
  motion_blur: float = 0.0     # motion blur length (pixels at 256)
  motion_angle: float = 0.0
  noise_sigma: float = 2.0     # sensor noise std (grey levels)
  texture_seed: int = 0        # seed of the background / occluder textures


def neutral_params(**overrides) -> FaceParams:
  """A frontal, symmetric, evenly lit face without occlusion or blur (for tests and docs)."""
  base = dict(asym=None, noise_sigma=0.0, background=0, bg_colors=((70, 110, 90), (90, 130, 110)))
  base.update(overrides)
  return FaceParams(**base)


_SKIN_TONES = np.array([
    (255, 224, 196), (241, 194, 160), (224, 172, 138), (198, 144, 106), (168, 112, 78),
    (141, 85, 54), (110, 66, 42), (80, 50, 34)], np.float64)
_HAIR_COLOURS = np.array([
    (25, 20, 18), (60, 40, 28), (100, 70, 45), (165, 125, 80), (210, 180, 120), (140, 60, 30),
    (150, 150, 150), (230, 230, 225)], np.float64)
_IRIS_COLOURS = np.array([(70, 45, 30), (110, 75, 40), (60, 100, 140), (80, 120, 90), (40, 30, 25)],
                         np.float64)


def _u(rng, lo, hi):
  return float(rng.uniform(lo, hi))


def sample_params(rng: np.random.Generator) -> FaceParams:
  """Draws a random face. Distributions are set so each attribute flag fires in ~10-30% of faces."""
  skin = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * rng.uniform(0.92, 1.05, 3)
  hair = _HAIR_COLOURS[rng.integers(len(_HAIR_COLOURS))] * rng.uniform(0.85, 1.15)
  brow = 0.6 * hair + 0.4 * np.array([40, 30, 25]) if rng.random() < 0.85 else skin * 0.45
  lip = skin * np.array([0.85, 0.55, 0.55]) + np.array([20, 0, 5])
  lipstick = rng.random() < 0.1
  if lipstick:
    lipsticks = [(200, 30, 50), (150, 20, 60), (220, 90, 120), (120, 40, 90)]
    lip = np.array(lipsticks[rng.integers(len(lipsticks))], float)
  eyeshadow = None
  if rng.random() < 0.08:
    eyeshadow = tuple(int(c) for c in rng.integers(40, 230, 3))

  def expr(p_active):
    return _u(rng, 0.25, 1.0) if rng.random() < p_active else _u(rng, 0.0, 0.15)

  mouth_open, smile, brow_raise = expr(0.15), expr(0.15), expr(0.1)
  yaw = float(np.clip(rng.normal(0, 15), -40, 40))
  pitch = float(np.clip(rng.normal(0, 9), -25, 25))
  roll = float(np.clip(rng.normal(0, 10), -35, 35))

  occluders = []
  if rng.random() < 0.25:
    for _ in range(rng.integers(1, 3)):
      kind = int(rng.integers(4))  # 0 rectangle, 1 ellipse, 2 skin-coloured blob (hand), 3 textured
      colour = skin * rng.uniform(0.8, 1.1) if kind == 2 else rng.integers(0, 256, 3)
      # (kind, centre x, centre y, width, height in face-box units, angle, colour)
      occluders.append((kind, _u(rng, 0.1, 0.9), _u(rng, 0.15, 0.95), _u(rng, 0.2, 0.5),
                        _u(rng, 0.15, 0.45), _u(rng, 0, 180), tuple(int(c) for c in colour)))
  blur_sigma = motion = 0.0
  r = rng.random()
  if r < 0.15:
    blur_sigma = _u(rng, 0.8, 3.2)
  elif r < 0.22:
    motion = _u(rng, 4, 14)
  bg = rng.integers(40, 240, (2, 3))
  strong_light = rng.random() < 0.25
  return FaceParams(
      face_w=_u(rng, 0.92, 1.05), chin_y=_u(rng, 0.98, 1.18), jaw_n=_u(rng, 2.0, 3.2),
      temple_y=_u(rng, -0.42, -0.32),
      eye_x=_u(rng, 0.38, 0.44), eye_y=_u(rng, -0.34, -0.27), eye_w=_u(rng, 0.155, 0.19),
      eye_open=_u(rng, 0.55, 1.1), eye_tilt=_u(rng, -0.015, 0.04), iris_r=_u(rng, 0.062, 0.078),
      gaze=(_u(rng, -0.7, 0.7), _u(rng, -0.4, 0.4)),
      brow_inner_x=_u(rng, 0.1, 0.17), brow_gap=_u(rng, 0.17, 0.24), brow_thick=_u(rng, 0.06, 0.11),
      brow_arch=_u(rng, 0.02, 0.09),
      nose_tip_y=_u(rng, 0.13, 0.23), nose_w=_u(rng, 0.13, 0.19),
      mouth_dy=_u(rng, 0.2, 0.28), mouth_w=_u(rng, 0.27, 0.36), lip_up=_u(rng, 0.045, 0.075),
      lip_low=_u(rng, 0.06, 0.1), asym=rng.normal(0, 0.007, (98, 2)),
      mouth_open=mouth_open, smile=smile, brow_raise=brow_raise,
      yaw=yaw, pitch=pitch, roll=roll, scale=_u(rng, 0.6, 0.9),
      shift=(float(rng.normal(0, 6)), float(rng.normal(0, 6))),
      skin=tuple(np.clip(skin, 0, 255)), hair=tuple(np.clip(hair, 0, 255)),
      hair_style=int(rng.choice(3, p=(0.15, 0.5, 0.35))), hairline=_u(rng, -1.05, -0.85),
      brow_color=tuple(np.clip(brow, 0, 255)),
      iris_color=tuple(_IRIS_COLOURS[rng.integers(len(_IRIS_COLOURS))]),
      lip_color=tuple(np.clip(lip, 0, 255)), clothes=tuple(int(c) for c in rng.integers(20, 235, 3)),
      lipstick=lipstick, eyeshadow=eyeshadow,
      background=int(rng.integers(3)), bg_colors=tuple(tuple(int(c) for c in row) for row in bg),
      light_angle=_u(rng, 0, 2 * np.pi),
      light_strength=_u(rng, 0.45, 0.85) if strong_light else _u(rng, 0.0, 0.3),
      brightness=_u(rng, 0.55, 1.35) if rng.random() < 0.15 else _u(rng, 0.85, 1.12),
      occluders=tuple(occluders), blur_sigma=blur_sigma, motion_blur=motion,
      motion_angle=_u(rng, 0, 180), noise_sigma=_u(rng, 0.0, 6.0),
      texture_seed=int(rng.integers(2**31)))


# Attribute thresholds (what counts as "large pose", "exaggerated expression", ...).
POSE_THRESHOLDS_DEG = (28.0, 18.0, 25.0)    # |yaw|, |pitch|, |roll|
EXPRESSION_THRESHOLD = 0.45                 # mouth_open, smile or brow_raise above this
ILLUMINATION_THRESHOLDS = (0.45, 0.7, 1.25)  # light_strength above, brightness below / above
OCCLUSION_FRACTION = 0.1                    # share of the 98 points under an occluder
BLUR_THRESHOLDS = (1.5, 7.0)                # Gaussian sigma, motion length (pixels at 256)


def attribute_flags(p: FaceParams, occluded_fraction: float) -> dict[str, int]:
  """0/1 flags for the WFLW attributes, from the parameters a face was drawn with."""
  flags = {
      'pose': abs(p.yaw) >= POSE_THRESHOLDS_DEG[0] or abs(p.pitch) >= POSE_THRESHOLDS_DEG[1]
              or abs(p.roll) >= POSE_THRESHOLDS_DEG[2],
      'expression': max(p.mouth_open, p.smile, p.brow_raise) >= EXPRESSION_THRESHOLD,
      'illumination': p.light_strength >= ILLUMINATION_THRESHOLDS[0]
                      or not ILLUMINATION_THRESHOLDS[1] <= p.brightness <= ILLUMINATION_THRESHOLDS[2],
      'makeup': p.lipstick or p.eyeshadow is not None,
      'occlusion': occluded_fraction >= OCCLUSION_FRACTION,
      'blur': p.blur_sigma >= BLUR_THRESHOLDS[0] or p.motion_blur >= BLUR_THRESHOLDS[1],
  }
  # 300W's split: "challenge" (iBUG-like: large pose, expression or occlusion) vs "common".
  flags['challenge'] = flags['pose'] or flags['expression'] or flags['occlusion']
  flags['common'] = not flags['challenge']
  return {k: int(v) for k, v in flags.items()}


# ------------------------------------------------------------------------------------------------
# Geometry: the 3D template (x right, y down, z towards the camera; face half width ~ 1).

# WFLW point order of the parts (image-left side = the subject's right, as WFLW annotates).
_RIGHT_BROW = dict(upper=[33, 34, 35, 36, 37], lower=[41, 40, 39, 38])  # both listed outer -> inner
_LEFT_BROW = dict(upper=[46, 45, 44, 43, 42], lower=[47, 48, 49, 50])
_RIGHT_EYE = dict(outer=60, upper=[61, 62, 63], inner=64, lower=[67, 66, 65])  # lids outer -> inner
_LEFT_EYE = dict(outer=72, upper=[71, 70, 69], inner=68, lower=[73, 74, 75])


def _superellipse_jaw(p: FaceParams, n_dense: int = 200) -> np.ndarray:
  """Dense image-left half of the contour (temple -> chin), (n_dense, 2)."""
  cy = -0.08
  b = p.chin_y - cy
  th = np.linspace(np.pi, np.pi / 2, n_dense)           # left side -> chin (y down)
  c, s = np.cos(th), np.sin(th)
  e = 2.0 / p.jaw_n
  x = p.face_w * np.sign(c) * np.abs(c) ** e
  y = cy + b * np.abs(s) ** e
  # Temple segment above the widest point: slightly narrower towards the top.
  ty = np.linspace(p.temple_y, cy, 24, endpoint=False)
  tx = -p.face_w * (1.0 - 0.04 * ((cy - ty) / (cy - p.temple_y)) ** 2)
  return np.concatenate([np.stack([tx, ty], -1), np.stack([x, y], -1)])


def _resample(curve: np.ndarray, n: int) -> np.ndarray:
  """`n` points equally spaced by arc length along the polyline `curve` (k, d), ends included."""
  seg = np.linalg.norm(np.diff(curve, axis=0), axis=-1)
  s = np.concatenate([[0.0], np.cumsum(seg)])
  targets = np.linspace(0.0, s[-1], n)
  return np.stack([np.interp(targets, s, curve[:, d]) for d in range(curve.shape[1])], -1)


def template(p: FaceParams) -> dict[str, np.ndarray]:
  """The face geometry in 3D face units.

  Returns a dict with 'landmarks' (98, 3) in WFLW order and drawing-only outlines (k, 3): 'forehead'
  (from point 32 over the head to point 0), 'hair' (outer arc of the hair, image-right to
  image-left), 'hairline' (image-left to image-right), 'back_hair' (long hair behind the head,
  closed), 'neck', and 'nostrils' (2, 3) centres.
  """
  L = np.zeros((98, 3))
  # Contour: left half by arc length (17 points, temple -> chin), mirrored.
  half = _resample(_superellipse_jaw(p), 17)
  contour = np.concatenate([half, half[-2::-1] * np.array([-1.0, 1.0])])
  contour[16, 0] = 0.0
  L[0:33, :2] = contour
  L[0:33, 2] = 0.35 * (1.0 - (contour[:, 0] / p.face_w) ** 2)  # chin forward, cheeks back

  # Expression: the jaw drops with the mouth.
  gap = 0.16 * p.mouth_open
  low = np.clip((L[0:33, 1] - 0.1) / (p.chin_y - 0.1), 0.0, 1.0)
  L[0:33, 1] += 0.55 * gap * low ** 1.5

  # Brows (z 0.3): centre line from outer (u=0) to inner (u=1) end, thickness tapering outward.
  raise_ = 0.1 * p.brow_raise
  for side, ids in ((-1, _RIGHT_BROW), (1, _LEFT_BROW)):
    inner = np.array([side * p.brow_inner_x, p.eye_y - p.brow_gap - raise_ * 0.8])
    outer = np.array([side * (p.eye_x + p.eye_w + 0.07), p.eye_y - p.brow_gap * 0.8 - raise_ * 0.5])
    def centre(u):
      pt = outer[None] + (inner - outer)[None] * u[:, None]
      pt[:, 1] -= (p.brow_arch + 0.5 * raise_) * np.sin(np.pi * np.clip(u / 1.4 + 0.15, 0, 1)) * 1.1
      return pt
    u_up = np.linspace(0.0, 1.0, 5)
    u_lo = np.array([0.25, 0.5, 0.75, 1.0])
    thick = lambda u: p.brow_thick * (0.25 + 0.75 * u)
    L[ids['upper'], :2] = centre(u_up) - np.stack([np.zeros(5), thick(u_up) / 2], -1)
    L[ids['upper'][0], 1] += p.brow_thick * 0.12  # the outer tip sits on the centre line
    L[ids['lower'], :2] = centre(u_lo) + np.stack([np.zeros(4), thick(u_lo) / 2], -1)
    L[ids['upper'] + ids['lower'], 2] = 0.3

  # Eyes (z 0.3): corners, upper lid (3 points) and lower lid (3 points).
  irises = []
  for side, ids in ((-1, _RIGHT_EYE), (1, _LEFT_EYE)):
    cx = side * p.eye_x
    outer = np.array([cx + side * p.eye_w, p.eye_y - p.eye_tilt / 2])
    inner = np.array([cx - side * p.eye_w, p.eye_y + p.eye_tilt / 2 + 0.005])
    hu = 0.085 * p.eye_open * (1.0 - 0.25 * p.smile)
    hl = 0.04 * (0.7 + 0.3 * p.eye_open) * (1.0 - 0.3 * p.smile)
    u = np.array([0.25, 0.5, 0.75])  # outer -> inner
    line = outer[None] + (inner - outer)[None] * u[:, None]
    bump_up = (4 * u * (1 - u)) ** 0.7
    bump_lo = (4 * u * (1 - u)) ** 0.9
    L[ids['outer'], :2] = outer
    L[ids['inner'], :2] = inner
    L[ids['upper'], :2] = line - np.stack([np.zeros(3), hu * bump_up * np.array([0.95, 1.0, 0.9])], -1)
    L[ids['lower'], :2] = line + np.stack([np.zeros(3), hl * bump_lo], -1)
    L[[ids['outer'], ids['inner']] + ids['upper'] + ids['lower'], 2] = 0.3
    mid = (outer + inner) / 2
    # The same gaze offset for both eyes: they look the same way.
    iris = mid + np.array([p.gaze[0] * p.eye_w * 0.35, -0.012 + p.gaze[1] * 0.012])
    irises.append(np.array([iris[0], iris[1], 0.33]))
  L[96] = irises[0]
  L[97] = irises[1]

  # Nose: line from the nasion to the tip (51-54), base 55-59 image-left to image-right.
  top = np.array([0.0, p.eye_y + 0.02, 0.35])
  tip = np.array([0.0, p.nose_tip_y, 0.8])
  L[51:55] = top[None] + (tip - top)[None] * np.linspace(0, 1, 4)[:, None]
  nb = p.nose_tip_y + 0.1
  w = p.nose_w
  L[55:60] = [[-w, nb - 0.045, 0.45], [-0.075, nb - 0.005, 0.58], [0.0, nb + 0.005, 0.62],
              [0.075, nb - 0.005, 0.58], [w, nb - 0.045, 0.45]]

  # Lips: the closed-mouth line curves up at the corners with a smile; the mouth opens downward.
  my = nb + p.mouth_dy
  mw = p.mouth_w * (1.0 + 0.15 * p.smile - 0.12 * p.mouth_open)
  lift = 0.08 * p.smile
  line_y = lambda x: my - lift * (x / mw) ** 2
  corner_y = my - lift + 0.35 * gap
  xs_up = np.array([-1.0, -0.55, -0.2, 0.0, 0.2, 0.55, 1.0]) * mw
  prof_up = np.array([0.0, 0.85, 1.0, 0.8, 1.0, 0.85, 0.0]) * p.lip_up * (1 - 0.25 * p.smile)
  L[76:83, :2] = np.stack([xs_up, line_y(xs_up) - prof_up], -1)
  L[[76, 82], 1] = corner_y
  xs_lo = np.array([0.55, 0.22, 0.0, -0.22, -0.55]) * mw
  prof_lo = np.array([0.7, 0.97, 1.0, 0.97, 0.7]) * p.lip_low
  L[83:88, :2] = np.stack([xs_lo, line_y(xs_lo) + gap + prof_lo], -1)
  xi_up = np.array([-0.88, -0.42, 0.0, 0.42, 0.88]) * mw
  inner_up = line_y(xi_up) + 0.004
  inner_up[[0, 4]] = corner_y
  L[88:93, :2] = np.stack([xi_up, inner_up], -1)
  xi_lo = np.array([0.42, 0.0, -0.42]) * mw
  L[93:96, :2] = np.stack([xi_lo, line_y(xi_lo) + 0.004 + gap * np.array([0.9, 1.0, 0.9])], -1)
  L[76:96, 2] = 0.5 - 0.12 * (L[76:96, 0] / mw) ** 2

  if p.asym is not None:
    L[:, :2] += p.asym

  # Drawing-only geometry.
  a = p.face_w
  th = np.linspace(0, np.pi, 40)  # from point 32 (right) over the top to point 0 (left)
  top_y = p.temple_y - 1.0
  fx = a * 0.97 * np.cos(th)
  fy = p.temple_y + (top_y - p.temple_y) * np.sin(th) ** 0.8
  forehead = np.stack([fx, fy, 0.3 * np.sin(th)], -1)
  forehead[0, :2] = L[32, :2]
  forehead[-1, :2] = L[0, :2]
  # Hair: an outer arc a little outside the forehead (right -> over the top -> left), a hairline
  # (left -> right) that is high in the middle and comes down at the temples, and long hair
  # falling behind the head to below the chin.
  hth = np.linspace(-0.12, np.pi + 0.12, 40)
  rise = np.sin(np.clip(hth, 0, np.pi))
  hair = np.stack([a * 1.1 * np.cos(hth),
                   p.temple_y + 0.05 - (p.temple_y + 0.05 - top_y + 0.1) * rise ** 0.75
                   + 0.25 * np.clip(-np.sin(hth), 0, None),
                   0.25 * rise], -1)
  hx = np.linspace(-1.0, 1.0, 25)
  hairline = np.stack([a * 1.02 * hx, p.hairline + (p.temple_y + 0.08 - p.hairline) * np.abs(hx) ** 3.5
                       + 0.015 * np.cos(11 * hx), 0.3 * (1 - hx ** 2)], -1)
  back = np.concatenate([hair, [[-a * 1.15, 0.6, -0.2], [-a * 1.05, 1.25, -0.3], [-a * 0.7, 1.35, -0.3],
                               [a * 0.7, 1.35, -0.3], [a * 1.05, 1.25, -0.3], [a * 1.15, 0.6, -0.2]]])
  neck = np.array([[-0.45, 0.5, -0.3], [-0.52, 2.6, -0.3], [0.52, 2.6, -0.3], [0.45, 0.5, -0.3]])
  nostrils = np.array([[-0.068, nb - 0.03, 0.58], [0.068, nb - 0.03, 0.58]])
  if p.asym is not None:
    nostrils[:, :2] += p.asym[[56, 58]]
  return dict(landmarks=L, forehead=forehead, hair=hair, hairline=hairline, back_hair=back,
              neck=neck, nostrils=nostrils)


def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
  """(3, 3) rotation (degrees): yaw about y (positive turns the nose to image-right), then pitch
  about x (positive looks up), then roll in the image plane (positive is clockwise on screen)."""
  y, x, r = np.deg2rad([yaw, pitch, roll])
  ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
  rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
  rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
  return rz @ rx @ ry


_FOCAL = 7.0  # camera distance in face units: mild perspective


def _project(pts3: np.ndarray, rot: np.ndarray) -> np.ndarray:
  q = pts3 @ rot.T
  return q[:, :2] * (_FOCAL / (_FOCAL - q[:, 2:3]))


def face_box(points: np.ndarray) -> np.ndarray:
  """(4,) x_min, y_min, x_max, y_max of `points` (N, 2)."""
  return np.concatenate([points.min(0), points.max(0)])


# ------------------------------------------------------------------------------------------------
# Drawing helpers (sub-pixel, anti-aliased).

_SHIFT = 4
_ONE = 1 << _SHIFT


def _fix(pts):
  """cv2 polygon vertices with _SHIFT fractional bits, (k, 1, 2) int32."""
  return np.round(np.asarray(pts, np.float64) * _ONE).astype(np.int32).reshape(-1, 1, 2)


def _fix_pt(xy):
  """One cv2 point (or ellipse axes) with _SHIFT fractional bits."""
  return tuple(int(round(float(v) * _ONE)) for v in xy)


def _fill(img, pts, colour):
  cv2.fillPoly(img, [_fix(pts)], _col(colour), cv2.LINE_AA, _SHIFT)


def _poly(img, pts, colour, thickness, closed=False):
  cv2.polylines(img, [_fix(pts)], closed, _col(colour), max(1, int(round(thickness))), cv2.LINE_AA,
                _SHIFT)


def _col(c):
  return tuple(float(v) for v in c)


def spline(points: np.ndarray, per_segment: int = 6, closed: bool = False) -> np.ndarray:
  """Uniform Catmull-Rom curve through `points` (k, 2); passes through every point exactly."""
  p = np.asarray(points, np.float64)
  if closed:
    ext = np.concatenate([p[-1:], p, p[:2]])
    nseg = len(p)
  else:
    ext = np.concatenate([2 * p[:1] - p[1:2], p, 2 * p[-1:] - p[-2:-1]])
    nseg = len(p) - 1
  t = np.arange(per_segment) / per_segment
  basis = np.stack([np.ones_like(t), t, t * t, t ** 3], -1) @ (0.5 * np.array(
      [[0, 2, 0, 0], [-1, 0, 1, 0], [2, -5, 4, -1], [-1, 3, -3, 1]], np.float64))
  geom = ext[np.arange(nseg)[:, None] + np.arange(4)[None]]   # (nseg, 4, 2)
  out = np.einsum('tj,sjd->std', basis, geom).reshape(-1, 2)
  return out if closed else np.concatenate([out, p[-1:]])


def _roi(shape, pts, pad):
  h, w = shape[:2]
  x0, y0 = np.floor(pts.min(0) - pad).astype(int)
  x1, y1 = np.ceil(pts.max(0) + pad).astype(int) + 1
  return max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)


def _mask(shape, pts, roi):
  x0, y0, x1, y1 = roi
  m = np.zeros((y1 - y0, x1 - x0), np.uint8)
  cv2.fillPoly(m, [_fix(pts - np.array([x0, y0]))], 255, cv2.LINE_AA, _SHIFT)
  return m


def _blend(img, pts, colour, alpha, soften=0.0):
  """Alpha-blends a filled polygon (optionally with a blurred edge) into img in place."""
  roi = _roi(img.shape, pts, 2 + 3 * soften)
  x0, y0, x1, y1 = roi
  if x1 <= x0 or y1 <= y0:
    return
  m = _mask(img.shape, pts, roi).astype(np.float32) * (alpha / 255.0)
  if soften > 0:
    m = cv2.GaussianBlur(m, (0, 0), soften)
  sub = img[y0:y1, x0:x1].astype(np.float32)
  img[y0:y1, x0:x1] = (sub + (np.asarray(colour, np.float32) - sub) * m[..., None]).astype(np.uint8)


def _blend_line(img, pts, colour, alpha, thickness, soften=0.0):
  """Alpha-blends an anti-aliased polyline (optionally blurred) into img in place."""
  roi = _roi(img.shape, pts, 2 + thickness + 3 * soften)
  x0, y0, x1, y1 = roi
  if x1 <= x0 or y1 <= y0:
    return
  m = np.zeros((y1 - y0, x1 - x0), np.uint8)
  cv2.polylines(m, [_fix(pts - np.array([x0, y0]))], False, 255, max(1, int(round(thickness))),
                cv2.LINE_AA, _SHIFT)
  m = m.astype(np.float32) * (alpha / 255.0)
  if soften > 0:
    m = cv2.GaussianBlur(m, (0, 0), soften)
  sub = img[y0:y1, x0:x1].astype(np.float32)
  img[y0:y1, x0:x1] = (sub + (np.asarray(colour, np.float32) - sub) * m[..., None]).astype(np.uint8)


@functools.lru_cache(maxsize=4)
def _grid(size: int) -> np.ndarray:
  """(2, size, size) float32 pixel row / column coordinates (cached: used for every face)."""
  g = np.mgrid[0:size, 0:size].astype(np.float32)
  g.flags.writeable = False
  return g


def _smooth_noise(rng, size, cells, channels=3):
  """Smooth random field in [0, 1] of shape (size, size, channels): upsampled coarse noise."""
  coarse = rng.random((cells, cells, channels)).astype(np.float32)
  fine = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
  return fine.clip(0, 1).reshape(size, size, channels)


def _background(p: FaceParams, size: int, rng) -> np.ndarray:
  c0 = np.asarray(p.bg_colors[0], np.float32)
  c1 = np.asarray(p.bg_colors[1], np.float32)
  if p.background == 0:    # linear gradient with a faint texture
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = _grid(size) / size
    t = (np.cos(ang) * (xx - 0.5) + np.sin(ang) * (yy - 0.5) + 0.5).clip(0, 1)[..., None]
    img = c0 + (c1 - c0) * t + 20 * (_smooth_noise(rng, size, 24, 1) - 0.5)
  elif p.background == 1:  # smooth coloured noise at two scales
    n = 0.65 * _smooth_noise(rng, size, int(rng.integers(3, 8))) + 0.35 * _smooth_noise(rng, size, 32)
    img = c0 + (c1 - c0) * n
  else:                    # random shapes, softened
    img = np.empty((size, size, 3), np.float32)
    img[:] = c0
    for _ in range(int(rng.integers(6, 14))):
      col = _col(rng.integers(0, 256, 3))
      cx, cy = rng.uniform(0, size, 2)
      r = rng.uniform(0.05, 0.3) * size
      if rng.random() < 0.5:
        cv2.circle(img, (int(cx), int(cy)), int(r), col, -1, cv2.LINE_AA)
      else:
        cv2.rectangle(img, (int(cx - r), int(cy - r / 2)), (int(cx + r), int(cy + r / 2)), col, -1,
                      cv2.LINE_AA)
    img = cv2.GaussianBlur(img, (0, 0), 1.5)
  return img.clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# Rendering.

@dataclasses.dataclass
class Rendered:
  """One drawn face: `image` (S, S, 3) uint8 RGB, exact `points` (98, 2) pixels, the attribute
  flags by name and the share of the 98 points under an occluder."""
  image: np.ndarray
  points: np.ndarray
  flags: dict
  occluded_fraction: float


@dataclasses.dataclass
class _View:
  """Where the face lands in the image: `px` pixels per face unit, `points` (98, 2) pixels, and
  `place(q3)` mapping (k, 3) face-unit points to (k, 2) pixels."""
  rot: np.ndarray
  px: float
  centre_units: np.ndarray
  centre_px: np.ndarray
  points: np.ndarray

  def place(self, pts3: np.ndarray) -> np.ndarray:
    return (_project(pts3, self.rot) - self.centre_units) * self.px + self.centre_px


def _view(p: FaceParams, landmarks3: np.ndarray, size: int) -> _View:
  """Scales the projected face so its box has scale `p.scale` and centres the box (kept inside)."""
  k = size / 256.0
  rot = rotation(p.yaw, p.pitch, p.roll)
  pts = _project(landmarks3, rot)
  box = face_box(pts)
  unit_min = min(box[2] - box[0], box[3] - box[1])
  px = p.scale * crop.FACE_SIDE_PX / crop.BOX_RULE_MARGIN / unit_min * k
  centre_units = (box[:2] + box[2:]) / 2
  half = (box[2:] - box[:2]) * px / 2
  margin = 6 * k
  centre_px = np.clip((size - 1) / 2 + np.asarray(p.shift) * k, half + margin, size - 1 - half - margin)
  return _View(rot, px, centre_units, centre_px, (pts - centre_units) * px + centre_px)


def _draw_body_and_head(img, p: FaceParams, geo, v: _View) -> np.ndarray:
  """Long hair, shoulders, neck, the head and the hair on top; returns the head mask (uint8)."""
  skin = np.asarray(p.skin, np.float64)
  hair = np.asarray(p.hair, np.float64)
  if p.hair_style == 2:  # long hair, behind everything else
    _fill(img, spline(v.place(geo['back_hair']), 3, closed=True), hair * 0.85)
  shoulders = v.place(np.array([[-2.2, 3.2, -0.5], [-1.6, 1.65, -0.4], [1.6, 1.65, -0.4],
                                [2.2, 3.2, -0.5]]))
  _fill(img, spline(shoulders, 8), p.clothes)
  _fill(img, v.place(geo['neck']), skin * 0.7)  # shadowed, so the jaw line stays visible
  # The head: contour plus forehead, filled with skin.
  head = np.concatenate([spline(v.points[0:33], 5), v.place(geo['forehead'])[1:-1]])
  _fill(img, head, skin)
  mask = np.zeros(img.shape[:2], np.uint8)
  cv2.fillPoly(mask, [_fix(head)], 255, cv2.LINE_AA, _SHIFT)
  if p.hair_style > 0:  # hair on top of the head, well above the brows
    _fill(img, np.concatenate([v.place(geo['hair']), v.place(geo['hairline'])]), hair)
  return mask


def _draw_brows(img, p: FaceParams, P):
  """Filled brows: the spline through the upper edge, back along the lower edge."""
  for ids in (_RIGHT_BROW, _LEFT_BROW):
    outline = np.concatenate([spline(P[ids['upper']], 4), spline(P[ids['lower'][::-1]], 4)[1:-1]])
    _fill(img, outline, p.brow_color)


def _draw_eyes(img, p: FaceParams, P, px: float, k: float):
  """Lid shadow (or eye shadow), sclera, iris, pupil and glint clipped to the lids, lid lines."""
  skin = np.asarray(p.skin, np.float64)
  for i, ids in enumerate((_RIGHT_EYE, _LEFT_EYE)):
    up_c = spline(P[[ids['outer']] + ids['upper'] + [ids['inner']]], 5)
    lo_c = spline(P[[ids['inner']] + ids['lower'][::-1] + [ids['outer']]], 5)
    eye = np.concatenate([up_c, lo_c[1:-1]])
    if p.eyeshadow is not None:
      lid = np.concatenate([up_c, up_c[::-1] - np.array([0, 0.09 * px])])
      _blend(img, lid, p.eyeshadow, 0.55, soften=1.5 * k)
    else:
      lid = np.concatenate([up_c, up_c[::-1] - np.array([0, 0.05 * px])])
      _blend(img, lid, skin * 0.8, 0.5, soften=1.0 * k)
    roi = _roi(img.shape, eye, 2)
    x0, y0, x1, y1 = roi
    inside = _mask(img.shape, eye, roi)[..., None].astype(np.float32) / 255.0
    sub = img[y0:y1, x0:x1].copy()
    ball = np.empty_like(sub)
    ball[:] = np.array([235, 232, 225]) * (0.9 + 0.1 * (skin.mean() / 255))
    c = P[96 + i] - np.array([x0, y0])  # the pupil landmark is the iris centre
    ax_x = p.iris_r * px * np.cos(np.deg2rad(p.yaw)) * 0.97  # foreshortened by the pose
    ax_y = p.iris_r * px * np.cos(np.deg2rad(p.pitch))
    cen = _fix_pt(c)
    cv2.ellipse(ball, cen, _fix_pt((ax_x, ax_y)), p.roll, 0, 360, _col(p.iris_color), -1, cv2.LINE_AA,
                _SHIFT)
    cv2.ellipse(ball, cen, _fix_pt((ax_x * 0.42, ax_y * 0.42)), p.roll, 0, 360, (15, 12, 12), -1,
                cv2.LINE_AA, _SHIFT)
    glint = _fix_pt((c[0] + ax_x * 0.3, c[1] - ax_y * 0.35))
    cv2.circle(ball, glint, int(round(max(1.0, ax_x * 0.16) * _ONE)), (250, 250, 250), -1, cv2.LINE_AA,
               _SHIFT)
    img[y0:y1, x0:x1] = (sub * (1 - inside) + ball * inside).astype(np.uint8)
    _poly(img, up_c, (25, 20, 20), 1.6 * k * px / 80)
    _poly(img, lo_c, skin * 0.55, 1.0 * k)


def _draw_nose(img, p: FaceParams, P, nostrils, px: float, k: float):
  """Ridge shadow through 51-54, wings, nostrils, the base line through 55-59, a tip highlight."""
  skin = np.asarray(p.skin, np.float64)
  light = np.array([np.cos(p.light_angle), np.sin(p.light_angle)])
  ridge = spline(P[51:55], 4)
  _blend_line(img, ridge, skin * 0.6, 0.55, max(1.0, 1.6 * k * px / 80), soften=0.8 * k)
  # A wider, fainter shadow on the side away from the light.
  _blend_line(img, ridge - light * 0.035 * px, skin * 0.7, 0.4, max(1.0, 2.0 * k * px / 80),
              soften=1.5 * k)
  up = P[54] - P[57]
  for j, wing in enumerate((55, 59)):
    arc = np.stack([P[wing], P[wing] + up * 0.45, (P[wing] + P[54]) / 2 + up * 0.3], 0)
    _poly(img, spline(arc, 5), skin * 0.72, 1.0 * k)
    axes = _fix_pt((0.036 * px * np.cos(np.deg2rad(p.yaw)), 0.017 * px))
    cv2.ellipse(img, _fix_pt(nostrils[j]), axes, p.roll + (20 if j else -20), 0, 360, _col(skin * 0.3), -1,
                cv2.LINE_AA, _SHIFT)
  _poly(img, spline(P[55:60], 4), skin * 0.55, max(1.0, 1.4 * k))
  ang = np.linspace(0, 2 * np.pi, 16, endpoint=False)
  tip = P[54] + 0.035 * px * np.stack([np.cos(ang), np.sin(ang)], -1)
  _blend(img, tip, np.minimum(skin * 1.15 + 10, 255), 0.45, soften=1.0 * k)


def _draw_mouth(img, p: FaceParams, P, px: float, k: float):
  """Filled lips; the opening (dark, with upper teeth) when open, else the line where they meet."""
  outer = np.concatenate([spline(P[76:83], 4), spline(P[[82, 83, 84, 85, 86, 87, 76]], 4)[1:-1]])
  _fill(img, outer, p.lip_color)
  inner_up = spline(P[88:93], 4)
  if p.mouth_open <= 0.05:
    _poly(img, inner_up, np.asarray(p.lip_color, np.float64) * 0.45, max(1.0, 1.3 * k))
    return
  inner = np.concatenate([inner_up, spline(P[[92, 93, 94, 95, 88]], 4)[1:-1]])
  roi = _roi(img.shape, inner, 2)
  x0, y0, x1, y1 = roi
  inside = _mask(img.shape, inner, roi)[..., None].astype(np.float32) / 255.0
  sub = img[y0:y1, x0:x1].copy()
  dark = np.empty_like(sub)
  dark[:] = (60, 20, 25)
  teeth = inner_up - np.array([x0, y0])
  teeth = np.concatenate([teeth, teeth[::-1] + np.array([0, 0.035 * px])])
  cv2.fillPoly(dark, [_fix(teeth)], (235, 230, 215), cv2.LINE_AA, _SHIFT)
  img[y0:y1, x0:x1] = (sub * (1 - inside) + dark * inside).astype(np.uint8)


def _light(img, p: FaceParams, head_mask, centre_px) -> np.ndarray:
  """float32 image lit: darker towards the face edge, a directional gradient, the exposure."""
  size = img.shape[0]
  small = cv2.resize(head_mask, (64, 64), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
  shade = cv2.resize(cv2.GaussianBlur(small, (0, 0), 3.0), (size, size), interpolation=cv2.INTER_LINEAR)
  factor = 1.0 - 0.25 * (head_mask.astype(np.float32) / 255.0) * (1.0 - shade)
  yy, xx = _grid(size)
  light = np.array([np.cos(p.light_angle), np.sin(p.light_angle)])
  ramp = ((xx - centre_px[0]) * light[0] + (yy - centre_px[1]) * light[1]) / (size / 2)
  factor = factor * (1.0 + p.light_strength * np.clip(ramp, -1.2, 1.2)) * p.brightness
  return img.astype(np.float32) * factor[..., None]


def _occlude(f, p: FaceParams, P, rng) -> tuple[np.ndarray, np.ndarray]:
  """Draws the occluders (placed in units of the face box) over float image `f`.

  Returns the new image and the uint8 mask of what they cover.
  """
  size = f.shape[0]
  cover = np.zeros((size, size), np.uint8)
  box = face_box(P)
  (bx, by), (bw, bh) = box[:2], box[2:] - box[:2]
  for kind, ox, oy, ow, oh, ang, colour in p.occluders:
    c = (bx + ox * bw, by + oy * bh)
    axes = (max(2.0, ow * bw / 2), max(2.0, oh * bh / 2))
    if kind in (1, 2):  # ellipse, skin-coloured blob (a hand)
      poly = cv2.ellipse2Poly((int(c[0]), int(c[1])), (int(axes[0]), int(axes[1])), int(ang), 0, 360, 10)
    else:               # rectangle, textured rectangle
      poly = cv2.boxPoints(((c[0], c[1]), (2 * axes[0], 2 * axes[1]), ang))
    m = np.zeros((size, size), np.uint8)
    cv2.fillPoly(m, [_fix(np.asarray(poly, np.float64))], 255, cv2.LINE_AA, _SHIFT)
    a = m.astype(np.float32)[..., None] / 255.0
    fill = np.empty_like(f)
    fill[:] = colour
    if kind == 3:
      fill *= 0.6 + 0.8 * _smooth_noise(rng, size, 12)
    elif kind == 2:
      fill *= 0.85 + 0.3 * _smooth_noise(rng, size, 6, 1)
    f = f * (1 - a) + fill * a
    cover = np.maximum(cover, m)
  return f, cover


def _degrade(f, p: FaceParams, rng, k: float) -> np.ndarray:
  """Gaussian or motion blur and sensor noise; returns the uint8 image."""
  if p.blur_sigma > 0:
    f = cv2.GaussianBlur(f, (0, 0), p.blur_sigma * k)
  if p.motion_blur > 0:
    n = max(3, int(round(p.motion_blur * k)) | 1)
    kern = np.zeros((n, n), np.float32)
    kern[n // 2] = 1.0
    turn = cv2.getRotationMatrix2D(((n - 1) / 2, (n - 1) / 2), p.motion_angle, 1.0)
    kern = cv2.warpAffine(kern, turn, (n, n))
    f = cv2.filter2D(f, -1, kern / kern.sum())
  if p.noise_sigma > 0:
    f += np.float32(p.noise_sigma) * rng.standard_normal(f.shape, dtype=np.float32)
  return np.clip(f + 0.5, 0, 255).astype(np.uint8)


def render(p: FaceParams, image_size: int = 256) -> Rendered:
  """Draws the face `p`; its exact landmarks are where the features were drawn."""
  k = image_size / 256.0
  rng = np.random.default_rng(p.texture_seed)  # textures only: background, occluders, noise
  geo = template(p)
  v = _view(p, geo['landmarks'], image_size)
  P = v.points
  img = _background(p, image_size, rng)
  head_mask = _draw_body_and_head(img, p, geo, v)
  _draw_brows(img, p, P)
  _draw_eyes(img, p, P, v.px, k)
  _draw_nose(img, p, P, v.place(geo['nostrils']), v.px, k)
  _draw_mouth(img, p, P, v.px, k)
  f = _light(img, p, head_mask, v.centre_px)
  f, cover = _occlude(f, p, P, rng)
  image = _degrade(f, p, rng, k)
  ij = np.clip(np.round(P).astype(int), 0, image_size - 1)
  occluded = float((cover[ij[:, 1], ij[:, 0]] > 127).mean())
  return Rendered(image=image, points=P, flags=attribute_flags(p, occluded), occluded_fraction=occluded)


# ------------------------------------------------------------------------------------------------
# Samples and records.

_SPLIT_IDS = {'train': 0, 'test': 1}


def _split_id(split: str) -> int:
  # A stable id per split name (crc32, not hash(): that changes between processes).
  return _SPLIT_IDS.get(split, zlib.crc32(split.encode()) + 2)


def sample_rngs(seed: int, split: str, index: int) -> tuple[np.random.Generator, np.random.Generator]:
  """The two independent random streams of one sample: (face, label noise)."""
  if index < 0:
    raise ValueError(f'sample index must be >= 0, got {index}')
  ss = np.random.SeedSequence([int(seed), _split_id(split), int(index)])
  face, noise = ss.spawn(2)
  return np.random.default_rng(face), np.random.default_rng(noise)


@dataclasses.dataclass
class Sample:
  """One generated face in a layout.

  Attributes:
    image: (S, S, 3) uint8 RGB.
    landmarks: (N, 2) float32 annotated labels (noisy on 'train' when ambiguity > 0, else exact).
    clean_landmarks: (N, 2) float32 exact points.
    box: (4,) float32 x_min, y_min, x_max, y_max of the exact 98 points (the whole face, whatever
      the layout, so every layout crops the same face).
    scale: float, min(w, h) / 200 x 1.05 of `box`.
    center: (2,) float32 box centre (x, y).
    attributes: (K,) int32 flags in the order of the layout's `attributes`.
    name: 'split/000123'.
    params: the FaceParams it was drawn from.
  """
  image: np.ndarray
  landmarks: np.ndarray
  clean_landmarks: np.ndarray
  box: np.ndarray
  scale: float
  center: np.ndarray
  attributes: np.ndarray
  name: str
  params: FaceParams


def generate(seed: int, split: str, index: int, layout: str = 'WFLW', ambiguity: float = 1.0,
             image_size: int = 256) -> Sample:
  """Sample `index` of `split`: a pure function of (seed, split, index) and the options.

  Only 'train' labels carry the tangential ambiguity noise; every other split is exact. The image and
  the exact points do not depend on `layout` or `ambiguity`.
  """
  if ambiguity < 0:
    raise ValueError(f'ambiguity must be >= 0, got {ambiguity}')
  lay = layouts.get_layout(layout)
  face_rng, noise_rng = sample_rngs(seed, split, index)
  params = sample_params(face_rng)
  r = render(params, image_size)
  clean98 = r.points
  z = noise_rng.standard_normal(98)  # drawn even at level 0 / test, to keep streams aligned
  noisy98 = tangential_noise(clean98, z, ambiguity, image_size) if split == 'train' else clean98
  idx = point_map(lay.name)
  box = face_box(clean98)
  scale, center = crop.box_rule(box)
  return Sample(
      image=r.image,
      landmarks=noisy98[idx].astype(np.float32),
      clean_landmarks=clean98[idx].astype(np.float32),
      box=box.astype(np.float32),
      scale=float(scale),
      center=np.asarray(center, np.float32),
      attributes=np.array([r.flags[a] for a in lay.attributes], np.int32),
      name=f'{split}/{index:06d}',
      params=params)


def encode_image(image: np.ndarray, fmt: str = 'jpeg', quality: int = 95) -> bytes:
  """Encodes an RGB uint8 image as JPEG ('jpeg') or PNG ('png') bytes."""
  bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
  if fmt == 'jpeg':
    ok, buf = cv2.imencode('.jpg', bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
  elif fmt == 'png':
    ok, buf = cv2.imencode('.png', bgr, [cv2.IMWRITE_PNG_COMPRESSION, 1])
  else:
    raise ValueError(f"image format must be 'jpeg' or 'png', got {fmt!r}")
  if not ok:
    raise RuntimeError(f'OpenCV failed to encode a {image.shape} image as {fmt}')
  return buf.tobytes()


# ------------------------------------------------------------------------------------------------
# Visual check.

_PART_COLOURS = [(255, 60, 60), (255, 200, 0), (255, 200, 0), (0, 220, 255), (0, 220, 255),
                 (60, 255, 60), (60, 255, 60), (255, 0, 255), (255, 120, 255)]


def draw_landmarks(image: np.ndarray, points: np.ndarray, layout: str = 'WFLW', radius: float = 1.5,
                   clean: np.ndarray | None = None) -> np.ndarray:
  """A copy of `image` with `points` drawn (colour per edge; white = on no edge); `clean`, if given,
  is drawn as small black dots with a line to its label."""
  lay = layouts.get_layout(layout)
  out = image.copy()
  colour = np.full((lay.num_points, 3), 255.0)
  for e, (_, idx) in enumerate(lay.edges):
    colour[list(idx)] = _PART_COLOURS[e % len(_PART_COLOURS)]
  for i, q in enumerate(points):
    if clean is not None:
      _poly(out, np.stack([clean[i], q]), (255, 255, 255), 1)
    cv2.circle(out, tuple(int(v) for v in np.round(q * _ONE)), int(radius * _ONE), _col(colour[i]), -1,
               cv2.LINE_AA, _SHIFT)
  return out


def contact_sheet(images: list[np.ndarray], columns: int = 4) -> np.ndarray:
  """Tiles equally sized RGB images into one (rows x columns) image."""
  h, w = images[0].shape[:2]
  rows = -(-len(images) // columns)
  sheet = np.zeros((rows * h, columns * w, 3), np.uint8)
  for i, im in enumerate(images):
    r, c = divmod(i, columns)
    sheet[r * h:(r + 1) * h, c * w:(c + 1) * w] = im
  return sheet


def main(argv=None):
  parser = argparse.ArgumentParser(description='Draw synthetic faces: a contact sheet and a timing.')
  parser.add_argument('--sheet', default='/tmp/synthetic_sheet.png', help='contact sheet PNG to write')
  parser.add_argument('--num', type=int, default=16, help='faces on the sheet')
  parser.add_argument('--start', type=int, default=0, help='first sample index')
  parser.add_argument('--split', default='train')
  parser.add_argument('--layout', default='WFLW')
  parser.add_argument('--ambiguity', type=float, default=1.0)
  parser.add_argument('--no_points', action='store_true', help='draw the faces without landmarks')
  parser.add_argument('--time', type=int, default=0,
                      help='also time generating + encoding this many faces')
  args = parser.parse_args(argv)
  tiles = []
  for i in range(args.start, args.start + args.num):
    s = generate(0, args.split, i, args.layout, args.ambiguity)
    tiles.append(s.image if args.no_points else draw_landmarks(s.image, s.landmarks, args.layout))
  cv2.imwrite(args.sheet, cv2.cvtColor(contact_sheet(tiles, min(4, len(tiles))), cv2.COLOR_RGB2BGR))
  print(f'wrote {args.sheet}')
  if args.time:
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(args.time):
      encode_image(generate(0, 'train', i, args.layout, args.ambiguity).image)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    print(f'{args.time} faces (generate + JPEG encode): wall {dt:.2f} s '
          f'({1e3 * dt / args.time:.2f} ms/face), CPU {dc:.2f} s ({1e3 * dc / args.time:.2f} ms/face)')


if __name__ == '__main__':
  main()
