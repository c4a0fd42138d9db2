"""What decides one synthetic face: identity, expression, pose, appearance (`FaceParams`), how they
are drawn at random, and the WFLW attribute flags they imply."""

from __future__ import annotations

import dataclasses

import numpy as np


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
