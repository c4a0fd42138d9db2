"""Synthetic samples and records: sample `index` of `split` is a pure function of (seed, split,
index), drawn from two independent random streams (the face, and its label noise)."""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Mapping, Sequence

import cv2
import numpy as np

from star_jax import layouts
from star_jax.data import crop
from star_jax.data.synthetic.noise import ANNOTATOR_BIAS_SHARE
from star_jax.data.synthetic.noise import ANNOTATOR_SMOOTHING
from star_jax.data.synthetic.noise import RELABEL_MODELS
from star_jax.data.synthetic.noise import annotator_biases
from star_jax.data.synthetic.noise import annotator_noise
from star_jax.data.synthetic.noise import tangential_noise
from star_jax.data.synthetic.params import FaceParams
from star_jax.data.synthetic.params import sample_params
from star_jax.data.synthetic.render import render
from star_jax.data.synthetic.subsets import point_map


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
  box = crop.landmarks_box(clean98)
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


class RelabelledSource:
  """A level-0 synthetic train split whose 'landmarks' are re-drawn at another ambiguity level.

  model 'independent' (the builder's): record i gets exactly the labels the synthetic_faces builder
  gives train sample i at `level`: its exact points (the record's 'clean_landmarks', 98 WFLW points in
  image px) moved along their tangents by the sample's own label-noise stream (`sample_rngs`).

  model 'annotators': record i is labelled by one of `annotators` simulated annotators
  (`noise.annotator_biases`, drawn from the build's seed), chosen by the next draw of the sample's
  label-noise stream after its 98 normal draws; the amounts are that annotator's habit plus those
  draws (`noise.annotator_noise`, `bias_share` of the variance is the habit). So record i's labels
  are a pure function of (seed, i, level, annotators, bias_share), and each label has the same
  spread as in the independent model.

  Images and everything else are the level-0 record's, which are the same at every level (separate
  random streams). So one build of the exact labels serves every level and model
  (`data.relabel_ambiguity`, `data.relabel_model`, `data.annotators`, `data.annotator_bias` of the
  synthetic configs).
  """

  def __init__(self, source: Sequence[Mapping[str, Any]], level: float, *, seed: int, image_size: int,
               model: str = 'independent', annotators: int = 5, bias_share: float = ANNOTATOR_BIAS_SHARE,
               smoothing: float = ANNOTATOR_SMOOTHING):
    if level < 0:
      raise ValueError(f'ambiguity level must be >= 0, got {level}')
    if model not in RELABEL_MODELS:
      raise ValueError(f'relabel model must be one of {RELABEL_MODELS}, got {model!r}')
    if not 0.0 <= bias_share <= 1.0:
      raise ValueError(f"the annotators' bias share must be in [0, 1], got {bias_share}")
    self.source, self.level, self.seed, self.image_size = source, float(level), int(seed), int(image_size)
    self.model, self.bias_share = model, float(bias_share)
    # (K, 98) habits; None for the independent model.
    self.biases = annotator_biases(self.seed, annotators, smoothing) if model == 'annotators' else None

  def __len__(self) -> int:
    return len(self.source)

  def _draws(self, index: int) -> tuple[np.ndarray, int | None]:
    """(z (98,), annotator or None) of record `index`: the builder's draw, then the annotator's."""
    _, noise_rng = sample_rngs(self.seed, 'train', index)
    z = noise_rng.standard_normal(98)  # the builder's first (and only) draw from this stream
    if self.biases is None:
      return z, None
    return z, int(noise_rng.integers(len(self.biases)))

  def annotator(self, index: int) -> int | None:
    """Which annotator labels record `index` (None for the independent model)."""
    return self._draws(int(index))[1]

  def __getitem__(self, index):
    index = int(index)
    record = dict(self.source[index])
    clean = np.asarray(record['clean_landmarks'], np.float64)
    if clean.shape != (98, 2):
      raise ValueError(f"record {index}: 'clean_landmarks' must be the (98, 2) WFLW points, got {clean.shape}")
    z, annotator = self._draws(index)
    if annotator is not None:
      z = annotator_noise(self.biases, annotator, z, self.bias_share)
    record['landmarks'] = tangential_noise(clean, z, self.level, self.image_size).astype(np.float32)
    return record
