"""Image geometry and augmentation of STAR training / evaluation crops (numpy + OpenCV, per example).

Follows the official `lib/dataset/augmentation.py` (ZhenglinZhou/STAR): a square face crop of side
`scale * 200` image pixels around the box centre, mapped onto `image_size x image_size`; for training
a random horizontal flip, a random similarity transform about the crop centre and a random texture
(occlusion, blur, gamma, noise, grey).

Conventions: images are uint8 (H, W, 3) **RGB** (the official code works on BGR), landmarks are
float32 (N, 2) 0-based pixel (x, y); a 3x3 `matrix` maps homogeneous image pixel coordinates to crop
pixel coordinates (row vectors: `p_crop = p_img @ matrix.T`). Every random draw comes from the
`np.random.Generator` passed in, so a (seed, example index) pair always gives the same crop.

Where the official code has a quirk we keep it (for parity with its targets) and say so.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import cv2
import numpy as np

from star_jax.data import crop as crop_lib


# ---- Matrices -----------------------------------------------------------------------------------

def rotate_scale_matrix(angle: float, scale: float, shift_xy, from_center, to_center) -> np.ndarray:
  """(3, 3) float32 similarity: rotates by `angle` (radians; x' = s (x cos a - y sin a), i.e.
  clockwise on screen, whose y axis points down) and scales by `scale` about `from_center`, which
  lands on `to_center + shift_xy`. The official `_compose_rotate_and_scale`: computed in float64,
  stored as float32."""
  cos_a, sin_a = scale * math.cos(angle), scale * math.sin(angle)
  fx, fy = float(from_center[0]), float(from_center[1])
  tx, ty = float(to_center[0]), float(to_center[1])
  return np.array([
      [cos_a, -sin_a, tx - cos_a * fx + sin_a * fy + float(shift_xy[0])],
      [sin_a, cos_a, ty - sin_a * fx - cos_a * fy + float(shift_xy[1])],
      [0.0, 0.0, 1.0],
  ], np.float32)


def crop_matrix(scale: float, center, image_size: int) -> np.ndarray:
  """(3, 3) float32 image px -> crop px: the square of side `scale * 200` px centred on
  `center` = (center_w, center_h) maps onto `image_size` px, the centre onto (image_size - 1) / 2
  (the official GetCropMatrix with align_corners=True and target_face_scale 1)."""
  if not scale > 0:
    raise ValueError(f'crop scale must be positive, got {scale!r}')
  half = (image_size - 1) / 2.0
  return rotate_scale_matrix(0.0, image_size / (float(scale) * crop_lib.FACE_SIDE_PX), (0.0, 0.0), center, (half, half))


def geometry_matrix(shift_xy, angle: float, scale: float, image_size: int) -> np.ndarray:
  """(3, 3) float32 crop px -> augmented crop px for given draws: rotation `angle` (radians) and
  `scale` about the crop centre (image_size - 1) / 2, then a shift of `shift_xy` in units of the
  crop side minus one (255 px for 256; the official GetRandomGeometryMatrix, align_corners=True)."""
  side = image_size - 1
  centre = (side / 2.0, side / 2.0)
  shift = np.asarray(shift_xy, np.float64) * side
  return rotate_scale_matrix(angle, scale, shift, centre, centre)


def hflip_image_matrix(width: int) -> np.ndarray:
  """(3, 3) float32: the pixel mapping of `np.fliplr` on an image `width` px wide, x' = width - 1 - x."""
  return np.array([[-1.0, 0.0, width - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], np.float32)


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
  """Applies a (3, 3) projective `matrix` to (N, 2) points (x, y); keeps the points' dtype.

  Computed as the official `_transformPoints2D` (homogeneous (N, 3) @ matrix.T in the points' dtype,
  then divide by w): edge-map targets round 4x-scaled points to integers, so even float rounding
  differences would move a few of their pixels."""
  points = np.asarray(points)
  dtype = points.dtype if points.dtype.kind == 'f' else np.float64
  homogeneous = np.concatenate([points.astype(dtype, copy=False), np.ones_like(points[:, :1], dtype)], axis=1)
  out = homogeneous @ np.asarray(matrix, dtype).T
  return (out[:, :2] / out[:, 2:3]).astype(dtype, copy=False)


def warp(image: np.ndarray, matrix: np.ndarray, image_size: int) -> np.ndarray:
  """The crop: bilinear warp of `image` (H, W, C) by `matrix` (image px -> crop px) onto
  image_size x image_size, black border; cv2.warpPerspective with INTER_LINEAR as the official
  Transform (warpAffine would be 0.2 ms faster but rounds differently, up to a few grey levels).

  OpenCV rounds sample positions to 1/32 px; builds that interpolate at exact positions (as the one
  that made the golden crops in tests/testdata) differ by up to ~4 grey levels at sharp edges."""
  return cv2.warpPerspective(image, np.asarray(matrix, np.float64), (image_size, image_size),
                             flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


# ---- Flip ---------------------------------------------------------------------------------------

def flip_landmarks(landmarks: np.ndarray, width: int, permutation: np.ndarray, flip_offset: int) -> np.ndarray:
  """Mirrors (N, 2) landmarks of an image `width` px wide: swaps left / right points
  (`flipped = points[permutation]`, `Layout.flip_permutation()`) and maps x to
  `width - flip_offset - x`. The official code uses flip_offset 1 (x' = w - 1 - x, the exact pixel
  mirror) for WFLW / 300W but 0 for COFW, whose flipped points so sit 1 px right of the mirrored
  image; we keep that quirk (Layout.flip_offset)."""
  out = np.array(landmarks, np.float32)[np.asarray(permutation)]
  out[:, 0] = np.float32(width - flip_offset) - out[:, 0]
  return out


def flip_center(center_w: float, width: int, flip_offset: int) -> float:
  """The crop centre's x after the flip (the official flips it like the landmarks)."""
  return float(width - flip_offset) - float(center_w)


# ---- Crops --------------------------------------------------------------------------------------

class Crop(NamedTuple):
  image: np.ndarray      # uint8 (S, S, 3)
  landmarks: np.ndarray  # float32 (N, 2) crop px
  matrix: np.ndarray     # float32 (3, 3) original image px -> crop px


def _as_rgb(crop_image: np.ndarray, bgr: bool) -> np.ndarray:
  # Swapping the channels of the 256 x 256 crop is much cheaper than of the full decoded image.
  return cv2.cvtColor(crop_image, cv2.COLOR_BGR2RGB) if bgr else crop_image


def center_crop(image: np.ndarray, landmarks: np.ndarray, scale: float, center, image_size: int,
                bgr: bool = False) -> Crop:
  """The evaluation crop (no augmentation): `crop_matrix` then `warp`. `bgr`: the image is BGR (as
  decoded by OpenCV); the returned crop is RGB either way."""
  m = crop_matrix(scale, center, image_size)
  crop_image = _as_rgb(warp(image, m, image_size), bgr)
  return Crop(crop_image, transform_points(np.asarray(landmarks, np.float32), m), m)


class GeometryDraw(NamedTuple):
  flip: bool
  shift_xy: tuple[float, float]   # in units of the crop side minus one
  angle: float                    # radians
  scale: float


def draw_geometry(rng: np.random.Generator, aug) -> GeometryDraw:
  """Random flip and similarity (the official Flip and GetRandomGeometryMatrix): flip with
  probability aug.flip, shift ~ N(0, aug.shift_sigma) per axis, angle ~ N(0, aug.rot_sigma_deg)
  (converted to radians), scale ~ N(1, aug.scale_sigma). Drawn in the official order."""
  flip = bool(rng.random() < aug.flip)
  shift = rng.normal(0.0, aug.shift_sigma, size=2)
  angle = rng.normal(0.0, math.radians(aug.rot_sigma_deg))
  scale = rng.normal(1.0, aug.scale_sigma)
  return GeometryDraw(flip, (float(shift[0]), float(shift[1])), float(angle), float(scale))


def augmented_crop(image: np.ndarray, landmarks: np.ndarray, scale: float, center, image_size: int,
                   draw: GeometryDraw, permutation: np.ndarray, flip_offset: int) -> Crop:
  """The training crop for given draws, with ONE bilinear warp of the original image.

  The official code flips the whole image (np.fliplr), then warps it by geometry @ crop; we fold the
  flip into the matrix instead (geometry @ crop(flipped centre) @ hflip), which samples the same
  positions without copying the full-size image. Landmarks follow the official path exactly:
  flip (permutation + flip_offset), then geometry @ crop. The returned matrix maps original image px to
  crop px (the flip included)."""
  width = image.shape[1]
  landmarks = np.asarray(landmarks, np.float32)
  center_w, center_h = float(center[0]), float(center[1])
  if draw.flip:
    landmarks = flip_landmarks(landmarks, width, permutation, flip_offset)
    center_w = flip_center(center_w, width, flip_offset)
  # float32 products, as the official `matrix_geoaug @ matrix_pre`.
  m = geometry_matrix(draw.shift_xy, draw.angle, draw.scale, image_size) @ crop_matrix(
      scale, (center_w, center_h), image_size)
  out_landmarks = transform_points(landmarks, m)
  m_image = m.astype(np.float64) @ hflip_image_matrix(width) if draw.flip else m
  return Crop(warp(image, m_image, image_size), out_landmarks, m_image.astype(np.float32))


# ---- Texture ------------------------------------------------------------------------------------

# Official quirk: RandomTexture.add_gray calls cv2.COLOR_RGB2GRAY on its BGR image, so its grey is
# 0.299 B + 0.587 G + 0.114 R. On our RGB images the same grey is cv2.COLOR_BGR2GRAY (which weighs
# channel 0 = R by 0.114 and channel 2 = B by 0.299). `official_gray=False` gives true luma instead.
_GRAY_CODES = {True: cv2.COLOR_BGR2GRAY, False: cv2.COLOR_RGB2GRAY}


def to_gray(image: np.ndarray, official_gray: bool = True) -> np.ndarray:
  """(H, W, 3) uint8 RGB -> the same shape with three equal grey channels."""
  grey = cv2.cvtColor(image, _GRAY_CODES[bool(official_gray)])
  return np.repeat(grey[..., None], 3, axis=-1)


def occlude(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Blacks out a random rectangle in place (official add_occ: height 20-80 % of half the side).

  Official quirk kept: the rectangle's x centre is drawn over the image height and its y centre over
  the width (the same for the square crops used)."""
  h, w = image.shape[:2]
  rh = 0.2 + 0.6 * rng.random()
  rw = rh - 0.2 + 0.4 * rng.random()
  cx = int((h - 1) * rng.random())
  cy = int((w - 1) * rng.random())
  dh, dw = int(h / 2 * rh), int(w / 2 * rw)
  x0, y0 = max(0, cx - dw // 2), max(0, cy - dh // 2)
  x1, y1 = min(w - 1, cx + dw // 2), min(h - 1, cy + dh // 2)
  image[y0:y1 + 1, x0:x1 + 1] = 0
  return image


def box_blur(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Official add_blur: a box filter (cv2.blur) of side up to 5 % of the image side; none below 2."""
  ksize = int((image.shape[0] + image.shape[1]) / 2 * (0.05 * rng.random()))
  return cv2.blur(image, (ksize, ksize)) if ksize > 1 else image


def random_gamma(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Official add_gamma: gamma uniform in [0.25, 1) or [1, 4) with equal odds; 255 (x/255)^gamma,
  truncated to uint8 (done as a 256-entry table, the same values)."""
  gamma = 0.25 + 0.75 * rng.random() if rng.random() < 0.5 else 1.0 + 3.0 * rng.random()
  table = ((np.arange(256) / 255.0) ** gamma * 255).astype(np.uint8)
  return cv2.LUT(image, table)


def add_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Official add_nose_fusion: blends uniform uint8 noise with weight alpha ~ U[0, 0.5), truncated."""
  noise = rng.integers(0, 256, size=image.shape, dtype=np.uint8)
  alpha = 0.5 * rng.random()
  return ((1 - alpha) * image + alpha * noise).astype(np.uint8)   # float64, as the official


def random_texture(image: np.ndarray, rng: np.random.Generator, aug, official_gray: bool = True) -> np.ndarray:
  """The official RandomTexture on a uint8 (H, W, 3) RGB crop, in its fixed order: occlusion
  (aug.occlusion), blur (aug.blur), gamma (aug.gamma), noise (aug.noise), then grey (aug.gray).
  Returns a new array (the input is not modified)."""
  image = image.copy()
  if rng.random() < aug.occlusion:
    image = occlude(image, rng)
  if rng.random() < aug.blur:
    image = box_blur(image, rng)
  if rng.random() < aug.gamma:
    image = random_gamma(image, rng)
  if rng.random() < aug.noise:
    image = add_noise(image, rng)
  if rng.random() < aug.gray:
    image = to_gray(image, official_gray)
  return image


def augment(image: np.ndarray, landmarks: np.ndarray, scale: float, center, image_size: int,
            rng: np.random.Generator, aug, permutation: np.ndarray, flip_offset: int,
            bgr: bool = False) -> Crop:
  """The official training augmentation (Augmentation.process, is_train): with probability aug.prob
  flip + random geometry + crop in one warp, then RandomTexture; otherwise the plain crop.
  `aug` has the fields of config.aug; `bgr` as in center_crop (the crop is RGB either way)."""
  if not rng.random() < aug.prob:
    return center_crop(image, landmarks, scale, center, image_size, bgr)
  draw = draw_geometry(rng, aug)
  crop = augmented_crop(image, landmarks, scale, center, image_size, draw, permutation, flip_offset)
  return crop._replace(image=random_texture(_as_rgb(crop.image, bgr), rng, aug))


# ---- Back to image pixels ---------------------------------------------------------------------------

def denormalize(points, image_size: int):
  """[-1, 1] -> crop px (align_corners=False): ((p + 1) S - 1) / 2, the inverse of
  targets.normalize_landmarks (without its clip). Works on numpy and jax arrays."""
  return ((points + 1.0) * image_size - 1.0) / 2.0


def map_back(points, matrix, image_size: int | None = None) -> np.ndarray:
  """Crop points back to original image px, given each example's crop matrix (b, 3, 3) (image px ->
  crop px): applies the inverse matrix (the official evaluate.py postprocess).

  `points` (b, N, 2) are normalised [-1, 1] predictions when `image_size` is given (they are
  denormalized first), else crop px. Returns float32 numpy (b, N, 2)."""
  pts = np.asarray(points, np.float64)
  if image_size is not None:
    pts = denormalize(pts, image_size)
  inv = np.linalg.inv(np.asarray(matrix, np.float64))
  out = np.einsum('bij,bnj->bni', inv[:, :2, :2], pts) + inv[:, None, :2, 2]
  if np.any(inv[:, 2] != (0.0, 0.0, 1.0)):  # projective matrices only; the crops are similarities
    w = np.einsum('bj,bnj->bn', inv[:, 2, :2], pts) + inv[:, None, 2, 2]
    out = out / w[..., None]
  return out.astype(np.float32)
