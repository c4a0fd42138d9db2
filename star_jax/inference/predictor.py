"""Landmarks of faces in photos: crop each face as the official demo does, run the network, map the
landmarks (and their covariances) back to image pixels, optionally refine the crop once.

Images are uint8 (H, W, 3) RGB; boxes (x_min, y_min, x_max, y_max), landmarks (N, 2) (x, y) and
covariances (N, 2, 2) are in 0-based image pixels (px^2 for covariances).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from star_jax import drawing
from star_jax.data import crop as crop_lib
from star_jax.data import transforms
from star_jax.inference import face_detect

# A refined box is kept only if its shorter side is within this factor of the first crop's face size;
# otherwise (a model that has not learned faces yet, a face the model got badly wrong) the first
# pass stands.
_REFINE_MAX_RATIO = 2.5


# ---- The network --------------------------------------------------------------------------------

def run_batched(predict_fn, crops: np.ndarray, batch_size: int, pad: bool = True) -> dict:
  """Runs `predict_fn` over (M, S, S, 3) crops in batches of `batch_size`: exactly that many with `pad`
  (the last one padded, so there is one compilation), else the last one as it is (a runtime with a
  dynamic batch); returns the outputs concatenated over the M crops."""
  outs = []
  for start in range(0, len(crops), batch_size):
    chunk = crops[start:start + batch_size]
    missing = batch_size - len(chunk) if pad else 0
    if missing:
      chunk = np.concatenate([chunk, np.zeros((missing,) + chunk.shape[1:], chunk.dtype)])
    out = predict_fn(chunk)
    outs.append({k: v[:len(chunk) - missing] for k, v in out.items()})
  return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


# ---- Geometry -----------------------------------------------------------------------------------

def covariances_to_image(cov_normalized: np.ndarray, matrix: np.ndarray, image_size: int) -> np.ndarray:
  """Maps (b, N, 2, 2) covariances of normalised landmarks to original image pixels^2.

  Normalised -> crop px is `transforms.denormalize`, linear with slope image_size / 2 (the official
  tester's align_corners=False mapping); crop px -> image px is the inverse of the (b, 3, 3) crop
  `matrix` (a similarity, so affine). With J the 2x2 Jacobian of the whole map: cov_px = J cov J^T.
  """
  inv = np.linalg.inv(np.asarray(matrix, np.float64))
  jac = inv[:, :2, :2] * (image_size / 2.0)                                   # (b, 2, 2)
  cov = np.asarray(cov_normalized, np.float64)
  return np.einsum('bij,bnjk,blk->bnil', jac, cov, jac).astype(np.float32)


def refined_crop(landmarks_px: np.ndarray, previous_scale: float):
  """The demo's crop (scale, center) from the bounding box of predicted landmarks (N, 2), or None when
  that box is degenerate or implausibly far in size from the previous crop (scale ratio beyond 2.5)."""
  if not np.all(np.isfinite(landmarks_px)):
    return None
  try:
    scale, center = crop_lib.box_rule(crop_lib.landmarks_box(landmarks_px))
  except ValueError:
    return None
  ratio = scale / previous_scale
  if not 1.0 / _REFINE_MAX_RATIO <= ratio <= _REFINE_MAX_RATIO:
    return None
  return scale, center


# ---- Faces --------------------------------------------------------------------------------------

@dataclasses.dataclass
class FaceResult:
  """One face of one image, filled in by `predict_faces`."""
  face: face_detect.Face
  box_source: str                   # 'detector' or 'user'
  scale: float = 0.0
  center: tuple[float, float] = (0.0, 0.0)
  refined: bool = False
  landmarks: np.ndarray | None = None    # (N, 2) image px
  covariances: np.ndarray | None = None  # (N, 2, 2) image px^2

  @property
  def box(self) -> tuple[float, float, float, float]:
    """The face box (x_min, y_min, x_max, y_max) in image px: the detector's, or the one given."""
    return self.face.box

  @property
  def score(self) -> float | None:
    """The detector's score of the face (None for a given box)."""
    return self.face.score

  def to_dict(self) -> dict:
    """JSON-ready: box, box_source, detector_score, crop, landmarks and (if predicted) covariances."""
    return face_json(self)


def predict_faces(image_list: Sequence[np.ndarray], faces_list: Sequence[list[FaceResult]], predict_fn,
                  image_size: int, batch_size: int, refine: bool, pad: bool = True) -> None:
  """Fills every FaceResult (crop, landmarks, covariances) of the given images, in place.

  The crop of a face box is the official demo's (`crop.box_rule`: a square of side 1.05 x the shorter
  box side around the box centre). With `refine`, each face is cropped again by the bounding box of
  its predicted landmarks (the demo crops by a landmark box, not a detector box) and predicted once more.
  pad: see `run_batched`.
  """
  jobs = [(i, r) for i, results in enumerate(faces_list) for r in results]
  if not jobs:
    return
  for _, r in jobs:
    scale, center = crop_lib.box_rule(r.face.box)
    r.scale, r.center = float(scale), (float(center[0]), float(center[1]))

  def run(selected):
    matrices = np.stack([transforms.crop_matrix(r.scale, r.center, image_size) for _, r in selected])
    crops = np.stack([transforms.warp(image_list[i], m, image_size) for (i, _), m in zip(selected, matrices)])
    out = run_batched(predict_fn, crops, batch_size, pad)
    landmarks = transforms.map_back(out['landmarks'], matrices, image_size)
    covs = (covariances_to_image(out['covariances'], matrices, image_size)
            if 'covariances' in out else [None] * len(selected))
    for (_, r), lm, cov in zip(selected, landmarks, covs):
      r.landmarks, r.covariances = lm, cov

  run(jobs)
  if refine:
    again = []
    for i, r in jobs:
      refined = refined_crop(r.landmarks, r.scale)
      if refined is not None:
        r.scale, r.center, r.refined = float(refined[0]), (float(refined[1][0]), float(refined[1][1])), True
        again.append((i, r))
    if again:
      run(again)


def face_json(r: FaceResult) -> dict:
  """One face of the JSON output: boxes and crop in image px, landmarks (N, 2), covariances (N, 2, 2)."""
  out = {
      'box': [round(float(v), 2) for v in r.face.box],
      'box_source': r.box_source,
      'detector_score': None if r.face.score is None else round(float(r.face.score), 4),
      'crop': {'scale': float(r.scale), 'center': [float(r.center[0]), float(r.center[1])],
               'refined': bool(r.refined)},
      'landmarks': np.round(r.landmarks.astype(np.float64), 3).tolist(),
  }
  if r.covariances is not None:
    out['covariances'] = np.round(r.covariances.astype(np.float64), 4).tolist()
  return out


def draw(image: np.ndarray, results: Sequence[FaceResult], show_ambiguity: bool) -> np.ndarray:
  """The output picture: `image` (RGB) with each face's box, ellipses (optional) and landmarks."""
  out = image
  for r in results:
    out = drawing.draw_box(out, r.face.box)
    if show_ambiguity and r.covariances is not None:
      out = drawing.draw_ellipses(out, r.landmarks, r.covariances)
    out = drawing.draw_landmarks(out, r.landmarks)
  return out
