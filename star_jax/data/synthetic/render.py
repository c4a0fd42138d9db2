"""Drawing a synthetic face with OpenCV (anti-aliased, sub-pixel vertices): background, head, hair,
brows, eyes, nose, mouth, lighting, occluders and degradations. Images are RGB uint8 (S, S, 3);
points are 0-based pixel (x, y), pixel centres at integers, as cv2 draws them."""

from __future__ import annotations

import dataclasses
import functools

import cv2
import numpy as np

from star_jax.data import crop
from star_jax.data.synthetic.params import FaceParams
from star_jax.data.synthetic.params import attribute_flags
from star_jax.data.synthetic.template import LEFT_BROW
from star_jax.data.synthetic.template import LEFT_EYE
from star_jax.data.synthetic.template import RIGHT_BROW
from star_jax.data.synthetic.template import RIGHT_EYE
from star_jax.data.synthetic.template import project
from star_jax.data.synthetic.template import rotation
from star_jax.data.synthetic.template import template


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
    return (project(pts3, self.rot) - self.centre_units) * self.px + self.centre_px


def _view(p: FaceParams, landmarks3: np.ndarray, size: int) -> _View:
  """Scales the projected face so its box has scale `p.scale` and centres the box (kept inside)."""
  k = size / 256.0
  rot = rotation(p.yaw, p.pitch, p.roll)
  pts = project(landmarks3, rot)
  box = crop.landmarks_box(pts)
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
  for ids in (RIGHT_BROW, LEFT_BROW):
    outline = np.concatenate([spline(P[ids['upper']], 4), spline(P[ids['lower'][::-1]], 4)[1:-1]])
    _fill(img, outline, p.brow_color)


def _draw_eyes(img, p: FaceParams, P, px: float, k: float):
  """Lid shadow (or eye shadow), sclera, iris, pupil and glint clipped to the lids, lid lines."""
  skin = np.asarray(p.skin, np.float64)
  for i, ids in enumerate((RIGHT_EYE, LEFT_EYE)):
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
  box = crop.landmarks_box(P)
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
