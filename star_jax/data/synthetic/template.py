"""The 3D face template of the synthetic faces in the WFLW 98-point layout, and its projection (x right,
y down, z towards the camera; face half width ~ 1)."""

from __future__ import annotations

import numpy as np

from star_jax.data.synthetic.params import FaceParams


# WFLW point order of the parts (image-left side = the subject's right, as WFLW annotates).
RIGHT_BROW = dict(upper=[33, 34, 35, 36, 37], lower=[41, 40, 39, 38])  # both listed outer -> inner
LEFT_BROW = dict(upper=[46, 45, 44, 43, 42], lower=[47, 48, 49, 50])
RIGHT_EYE = dict(outer=60, upper=[61, 62, 63], inner=64, lower=[67, 66, 65])  # lids outer -> inner
LEFT_EYE = dict(outer=72, upper=[71, 70, 69], inner=68, lower=[73, 74, 75])


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
  for side, ids in ((-1, RIGHT_BROW), (1, LEFT_BROW)):
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
  for side, ids in ((-1, RIGHT_EYE), (1, LEFT_EYE)):
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


def project(pts3: np.ndarray, rot: np.ndarray) -> np.ndarray:
  """(N, 2) face-unit image-plane positions of (N, 3) template points rotated by `rot` (perspective)."""
  q = pts3 @ rot.T
  return q[:, :2] * (_FOCAL / (_FOCAL - q[:, 2:3]))
