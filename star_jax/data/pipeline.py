"""Grain input pipelines: augmented training batches with exact resume, and evaluation batches.

Records are dicts as the star_jax TFDS builders write them (`tfds.data_source(...)[i]`, or any
random-access sequence of such dicts):
  'image' uint8 (H, W, 3) RGB (or encoded image bytes, decoded here with OpenCV),
  'landmarks' float32 (N, 2) 0-based pixel (x, y), 'scale' float32 (face side / 200 px),
  'center' float32 (2,) (center_w, center_h), 'attributes' int32 (K,), 'image_name' str / bytes.

Batches are dicts of numpy arrays holding THIS process's share of a global batch;
`star_jax.mesh.to_global` turns them into global `jax.Array`s sharded over the mesh.

Training order: the split is shuffled (differently each epoch) and repeated forever; global stream
position i goes to process i % process_count. The augmentation of position i draws from a generator
seeded by (seed, i) only, so a run is reproducible, independent of worker and process counts, and
resumes exactly from the iterator state (`get_state` / `set_state`, or grain's orbax handler).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

from absl import flags
import cv2
import grain
import jax
import numpy as np

from star_jax import layouts
from star_jax.data import targets as targets_lib
from star_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class AugParams:
  """config.aug as a plain picklable value (Grain worker processes receive a copy)."""
  prob: float = 1.0
  flip: float = 0.5
  shift_sigma: float = 0.05
  rot_sigma_deg: float = 18.0
  scale_sigma: float = 0.1
  occlusion: float = 0.4
  blur: float = 0.3
  gamma: float = 0.2
  noise: float = 0.2
  gray: float = 0.2

  @classmethod
  def from_config(cls, aug) -> 'AugParams':
    return cls(**{f.name: float(aug[f.name]) for f in dataclasses.fields(cls)})


@dataclasses.dataclass(frozen=True)
class ExampleSpec:
  """What turning one record into one example needs (picklable)."""
  layout: str
  image_size: int
  heatmap_size: int
  sigma: float
  aug: AugParams = AugParams()

  @classmethod
  def from_config(cls, config) -> 'ExampleSpec':
    # The layout itself, not a file path: worker processes need not read (or find) the file.
    return cls(layout=layouts.portable(config.layout), image_size=int(config.data.image_size),
               heatmap_size=int(config.data.heatmap_size), sigma=float(config.data.sigma),
               aug=AugParams.from_config(config.aug))

  @functools.cached_property
  def layout_obj(self) -> layouts.Layout:
    return layouts.get_layout(self.layout)

  @functools.cached_property
  def permutation(self) -> np.ndarray:
    return self.layout_obj.flip_permutation()


# ---- One record -----------------------------------------------------------------------------------

class BadRecordError(ValueError):
  """A dataset record that cannot be used (a missing field, NaN landmarks, undecodable image bytes);
  the message names the record by its image name."""


def _name(record: Mapping[str, Any]) -> str:
  name = record.get('image_name', '?')
  return name.decode('utf-8', 'replace') if isinstance(name, bytes) else str(name)


def decode_image(value, name: str = '?') -> tuple[np.ndarray, bool]:
  """A record's 'image' -> (uint8 (H, W, 3) array, is_bgr). Encoded bytes are decoded by OpenCV and
  stay BGR (the crop is converted, which is cheaper than converting the full image); arrays are RGB."""
  if isinstance(value, (bytes, bytearray, memoryview)) or (
      isinstance(value, np.ndarray) and value.dtype == np.uint8 and value.ndim == 1):
    image = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
      raise BadRecordError(f"record {name!r}: field 'image' holds bytes OpenCV cannot decode")
    return image, True
  image = np.asarray(value)
  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  if image.ndim == 2:
    image = np.repeat(image[..., None], 3, axis=-1)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise BadRecordError(f"record {name!r}: field 'image' must be uint8 (H, W, 3), got {image.dtype} "
                         f"{image.shape}")
  return image, False


def _geometry(record: Mapping[str, Any], num_points: int):
  """(landmarks (N, 2) float32, scale, (center_w, center_h)) of a record, checked: a NaN that got
  this far would otherwise surface as an unrelated error deep in the crop ("negative dimensions")."""
  name = _name(record)
  for field in ('image', 'landmarks', 'scale', 'center'):
    if field not in record:
      raise BadRecordError(f'record {name!r}: missing field {field!r} (has {sorted(record)})')
  landmarks = np.asarray(record['landmarks'], np.float32)
  if landmarks.shape != (num_points, 2):
    raise BadRecordError(f"record {name!r}: field 'landmarks' must be ({num_points}, 2), got {landmarks.shape}")
  if not np.all(np.isfinite(landmarks)):
    bad = np.flatnonzero(~np.all(np.isfinite(landmarks), axis=1))
    raise BadRecordError(f"record {name!r}: field 'landmarks' holds NaN or infinite values (points "
                         f'{bad[:10].tolist()}{" ..." if bad.size > 10 else ""}); rebuild the dataset from '
                         'corrected annotations')
  scale = float(np.asarray(record['scale']))
  center = np.asarray(record['center'], np.float64).reshape(-1)
  if not (np.isfinite(scale) and scale > 0) or center.shape != (2,) or not np.all(np.isfinite(center)):
    raise BadRecordError(f"record {name!r}: fields 'scale' / 'center' must be finite > 0 / (2,) finite, got "
                         f'{scale} / {center}')
  return landmarks, scale, (float(center[0]), float(center[1]))


def _targets(crop_landmarks: np.ndarray, spec: ExampleSpec) -> dict[str, np.ndarray]:
  s, h = spec.image_size, spec.heatmap_size
  return {
      'landmarks': targets_lib.normalize_landmarks(crop_landmarks, s),
      'pointmaps': targets_lib.point_maps(crop_landmarks, s, h, spec.sigma),
      'edgemaps': targets_lib.edge_maps(crop_landmarks, spec.layout_obj.edges, s, h),
  }


def train_example(record: Mapping[str, Any], rng: np.random.Generator, spec: ExampleSpec) -> dict:
  """One augmented training example: 'image' uint8 (S, S, 3) RGB, 'landmarks' float32 (N, 2) in
  [-1, 1], 'pointmaps' (h, h, N), 'edgemaps' (h, h, E)."""
  landmarks, scale, center = _geometry(record, spec.layout_obj.num_points)
  image, bgr = decode_image(record['image'], _name(record))
  crop = transforms.augment(image, landmarks, scale, center, spec.image_size, rng, spec.aug,
                            spec.permutation, spec.layout_obj.flip_offset, bgr=bgr)
  return {'image': crop.image, **_targets(crop.landmarks, spec)}


def eval_example(record: Mapping[str, Any], index: int, spec: ExampleSpec) -> dict:
  """One evaluation example: the plain crop, its normalised landmarks, the original pixel landmarks,
  the crop matrix (image px -> crop px), attributes and the position in the split."""
  landmarks, scale, center = _geometry(record, spec.layout_obj.num_points)
  image, bgr = decode_image(record['image'], _name(record))
  crop = transforms.center_crop(image, landmarks, scale, center, spec.image_size, bgr=bgr)
  return {
      'image': crop.image,
      'landmarks': targets_lib.normalize_landmarks(crop.landmarks, spec.image_size),
      'landmarks_px': landmarks,
      'matrix': crop.matrix.astype(np.float32),
      'attributes': np.asarray(record.get('attributes', np.zeros(0, np.int32)), np.int32),
      'index': np.int32(index),
      'valid': np.bool_(True),
  }


def _padding_example(like: dict) -> dict:
  out = {k: np.zeros_like(v) for k, v in like.items()}
  out['matrix'] = np.eye(3, dtype=np.float32)  # invertible, so map_back works on padded rows
  out['index'] = np.int32(-1)
  out['valid'] = np.bool_(False)
  return out


# ---- Datasets -----------------------------------------------------------------------------------

def _process(process_index, process_count) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= index < count:
    raise ValueError(f'process_index {index} out of range for process_count {count}')
  return index, count


def _local_batch(global_batch: int, process_count: int, what: str) -> int:
  if global_batch <= 0 or global_batch % process_count:
    raise ValueError(f'{what} {global_batch} must be a positive multiple of the process count {process_count}')
  return global_batch // process_count


def _read_options(config) -> grain.ReadOptions:
  # A few threads: OpenCV and numpy release the GIL for most of the work. The default Grain buffer
  # (500 elements, here batches) would hold gigabytes.
  threads = int(config.data.get('num_threads', 2))
  return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, int(config.data.prefetch)))


def _init_worker(worker_index: int, worker_count: int) -> None:
  """In each Grain worker process: OpenCV on one thread. The workers are the parallelism; OpenCV's own
  pool (one thread per core by default) in each of them would oversubscribe the cores."""
  del worker_index, worker_count
  cv2.setNumThreads(1)


def _maybe_multiprocess(ds: grain.IterDataset, config) -> grain.IterDataset:
  workers = int(config.data.num_workers)
  if workers <= 0:
    return ds
  if not flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags
    flags.FLAGS.mark_as_parsed()
  return ds.mp_prefetch(grain.MultiprocessingOptions(
      num_workers=workers, per_worker_buffer_size=max(1, int(config.data.prefetch))), worker_init_fn=_init_worker)


def _seeds(seed: int) -> tuple[int, int]:
  """Independent 32-bit seeds for the shuffle and the augmentation, from one run seed."""
  shuffle_seed, aug_seed = np.random.SeedSequence(int(seed)).generate_state(2)
  return int(shuffle_seed), int(aug_seed)


def train_dataset(config, source: Sequence[Mapping[str, Any]], *, seed: int, process_index: int | None = None,
                  process_count: int | None = None) -> grain.IterDataset:
  """The endless training stream: an IterDataset of this process's batches, each a dict
  'image' uint8 (b, S, S, 3) RGB, 'landmarks' float32 (b, N, 2) in [-1, 1], 'pointmaps' float32
  (b, h, h, N), 'edgemaps' float32 (b, h, h, E), with b = config.batch_size // process_count.

  `iter()` it, and checkpoint the iterator with `get_state()` / `set_state()`: a restored iterator
  yields exactly the batches an uninterrupted one would have. One epoch is
  `star_jax.training.state.steps_per_epoch(config, len(source))` steps."""
  process_index, process_count = _process(process_index, process_count)
  local = _local_batch(int(config.batch_size), process_count, 'config.batch_size')
  if len(source) == 0:
    raise ValueError('the training source is empty')
  shuffle_seed, aug_seed = _seeds(seed)
  spec = ExampleSpec.from_config(config)
  ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None)
  # Augment before sharding: each position's draws depend on its global position alone. Map
  # datasets are lazy, so a process still only decodes and augments its own share.
  ds = ds.random_map(functools.partial(train_example, spec=spec), seed=aug_seed)
  ds = ds[process_index::process_count]
  ds = ds.batch(local, drop_remainder=True)
  return _maybe_multiprocess(ds.to_iter_dataset(_read_options(config)), config)


def num_eval_examples(config, source) -> int:
  """How many records evaluation uses: all, or the first config.data.max_eval_examples."""
  n = len(source)
  limit = int(config.data.get('max_eval_examples', 0))
  return min(n, limit) if limit > 0 else n


def eval_batches(config, source: Sequence[Mapping[str, Any]], *, process_index: int | None = None,
                 process_count: int | None = None) -> grain.IterDataset:
  """The evaluation batches (iterate it once per evaluation): the crop only, in split order.

  Global batch k holds split positions [k B, (k + 1) B), B = config.eval_batch_size; this process
  gets the b = B // process_count consecutive positions starting at k B + process_index b. The last
  batch is padded: 'valid' (b,) bool marks real examples and padded rows have 'index' -1. Each batch:
  'image' uint8 (b, S, S, 3) RGB, 'landmarks' float32 (b, N, 2) normalised crop ground truth,
  'landmarks_px' (b, N, 2) original pixel ground truth, 'matrix' (b, 3, 3) crop matrix (image px ->
  crop px; map_back(pred, matrix, S) returns predictions in image px), 'attributes' int32 (b, K),
  'index' int32 (b,), 'valid' bool (b,)."""
  process_index, process_count = _process(process_index, process_count)
  global_batch = int(config.eval_batch_size)
  local = _local_batch(global_batch, process_count, 'config.eval_batch_size')
  n = num_eval_examples(config, source)
  if n == 0:
    raise ValueError('the evaluation source is empty')
  spec = ExampleSpec.from_config(config)
  num_batches = math.ceil(n / global_batch)
  like = eval_example(source[0], 0, spec)

  def position(j: int) -> int:
    k, offset = divmod(j, local)
    return k * global_batch + process_index * local + offset

  def example(j: int) -> dict:
    i = position(j)
    return eval_example(source[i], i, spec) if i < n else _padding_example(like)

  ds = grain.MapDataset.range(num_batches * local).map(example).batch(local)
  return ds.to_iter_dataset(_read_options(config))
