"""Benchmark: training-example throughput of the input pipeline on one CPU core.

One synthetic 1024 x 768 JPEG with 98 landmarks (WFLW layout, official crop size 256, maps 64): JPEG
decode, augmentation (flip, random geometry, warp, RandomTexture) and all targets (normalised points,
98 point maps, 9 edge maps) per sample. Rates are given by CPU time (what one core does, robust on a
shared machine) and by wall time. Rows:

* ours, one example at a time in one thread (OpenCV limited to one thread);
* ours through the Grain pipeline (`train_dataset`, batches of 32, config.data.num_threads threads), and
  with `--workers 0,8,15` with that many worker processes (config.data.num_workers) each: what the
  input pipeline can feed a GPU step, to compare with the train section's images/s;
* with `--official PATH` (and PyTorch + pandas importable): the official `AlignmentDataset.__getitem__`
  on the same image (a temporary tsv), one thread, and a same-draws parity check: both pipelines fed
  the same random draws, the largest differences of their images and targets.

  python scripts/benchmark.py data [--official /path/to/STAR] [--repeats 10] [--workers 0,1,2]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import types

import cv2
import numpy as np

import benchmarks
from benchmarks import official
from star_jax import layouts

WIDTH, HEIGHT = 1024, 768
LAYOUT = layouts.WFLW


def _rates(fn, per_call: int, repeats: int) -> tuple[float, float]:
  """(samples/s by wall time, samples/s by this process's CPU time): medians over `repeats` calls of
  `fn`, which handles `per_call` samples. The CPU-time rate is what one core does when the machine
  is shared (it ignores time spent waiting for the CPU)."""
  fn()
  wall, cpu = [], []
  for _ in range(repeats):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  return per_call / float(np.median(wall)), per_call / float(np.median(cpu))


def synthetic_face_record(seed: int = 0) -> dict:
  """A record as the TFDS builders write it, but with the image as JPEG bytes (so that decoding is
  timed): a smooth random 1024 x 768 picture, 98 points spread like a face, its crop parameters."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (HEIGHT // 16, WIDTH // 16, 3), dtype=np.uint8)
  image = cv2.resize(small, (WIDTH, HEIGHT), interpolation=cv2.INTER_CUBIC)
  image = np.clip(image.astype(np.int16) + rng.integers(-12, 13, image.shape), 0, 255).astype(np.uint8)
  ok, jpeg = cv2.imencode('.jpg', image, [cv2.IMWRITE_JPEG_QUALITY, 90])
  assert ok
  t = np.linspace(0, 2 * np.pi, LAYOUT.num_points, endpoint=False)
  centre = np.array([532.5, 368.5])
  radius = np.array([150.0, 190.0]) * (0.6 + 0.4 * rng.random((LAYOUT.num_points, 1)))
  landmarks = centre + radius * np.stack([np.cos(3 * t), np.sin(5 * t)], -1)
  # Multiples of 1/64 px (and a scale of 1.875): exact in float32 and in the official tsv's 6-decimal
  # text, so that both pipelines start from the same numbers.
  landmarks = np.round(landmarks * 64) / 64
  return {
      'image': jpeg.tobytes(),
      'landmarks': landmarks.astype(np.float32),
      'box': np.array([362, 178, 702, 558], np.float32),
      'scale': np.float32(1.875),
      'center': centre.astype(np.float32),
      'attributes': np.zeros(6, np.int32),
      'image_name': 'synthetic.jpg',
  }


def _config():
  from star_jax import config_lib  # pylint: disable=import-outside-toplevel
  base = config_lib.import_sibling(config_lib.resolve_config_path('configs/base.py'), 'base')
  return base.get_base_config(layout=LAYOUT.name, dataset='synthetic_faces')


# ---- Official side by side ----------------------------------------------------------------------

def _official_dataset(module, folder: str, record: dict, image_path: str):
  """An official AlignmentDataset (training mode, aug_prob 1, WFLW) over one row: `record`."""
  with open(image_path, 'wb') as f:
    f.write(record['image'])
  five = np.zeros(10, np.float32)  # unused by the crop pipeline
  tsv = os.path.join(folder, 'train.tsv')
  with open(tsv, 'w') as f:
    f.write('image_path\tlandmarks_5pts\tlandmarks_target\tscale\tcenter_w\tcenter_h\n')
    f.write('\t'.join([
        os.path.basename(image_path), ','.join(f'{v:.6f}' for v in five),
        ','.join(f'{v:.6f}' for v in record['landmarks'].ravel()), f"{float(record['scale']):.6f}",
        f"{float(record['center'][0]):.6f}", f"{float(record['center'][1]):.6f}"]) + '\n')
  edges = [[closed, list(indices)] for closed, indices in LAYOUT.edges]
  return module.AlignmentDataset(
      tsv, folder, None, 256, 256, 3, (127.5, 127.5, 127.5), 1 / 127.5,
      [LAYOUT.num_points, LAYOUT.num_edges, LAYOUT.num_points], True, 1.0, edges,
      [list(p) for p in LAYOUT.flip_pairs], True)


class _Script:
  """Pre-drawn random numbers, consumed in order by both pipelines (uniforms, standard normals,
  uint8 noise images)."""

  def __init__(self, seed: int):
    rng = np.random.default_rng(seed)
    self.uniform = list(rng.random(64))
    self.normal = list(rng.standard_normal(8))
    self.noise = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)


class _ScriptedGenerator:
  """The subset of np.random.Generator that star_jax.data.transforms uses, replaying a _Script."""

  def __init__(self, script: _Script):
    self._u, self._z, self._noise = list(script.uniform), list(script.normal), script.noise

  def random(self):
    return self._u.pop(0)

  def normal(self, loc=0.0, scale=1.0, size=None):
    if size is None:
      return loc + scale * self._z.pop(0)
    return np.array([loc + scale * self._z.pop(0) for _ in range(int(np.prod(size)))]).reshape(size)

  def integers(self, low, high, size, dtype):
    assert (low, high) == (0, 256) and tuple(size) == self._noise.shape
    return self._noise.astype(dtype)


def _script_official(module, script: _Script):
  """Makes the official augmentation module draw from `script` (its `random`, `np.random` and
  `os.urandom`, replaced by stand-ins on that module only). The noise is given in BGR order."""
  aug = sys.modules['lib.dataset.augmentation']
  u, z = list(script.uniform), list(script.normal)
  noise_bgr = np.ascontiguousarray(script.noise[..., ::-1]).tobytes()

  def normal(mu, sigma, size=None):
    if size is None:
      return mu + sigma * z.pop(0)
    return np.array([mu + sigma * z.pop(0) for _ in range(int(np.prod(size)))]).reshape(size)

  np_proxy = types.SimpleNamespace(**{k: getattr(np, k) for k in dir(np) if not k.startswith('__')})
  np_proxy.random = types.SimpleNamespace(normal=normal, uniform=None)
  aug.random = types.SimpleNamespace(random=lambda: u.pop(0))
  aug.np = np_proxy
  aug.os = types.SimpleNamespace(urandom=lambda n: noise_bgr[:n])
  del module


def _parity_rows(module, dataset, record, samples: int = 24) -> list[dict]:
  """Official vs ours with the same draws: largest |difference| over `samples` scripted samples."""
  import torch  # pylint: disable=import-outside-toplevel
  from star_jax.data import pipeline as input_pipeline  # pylint: disable=import-outside-toplevel
  spec = input_pipeline.ExampleSpec.from_config(_config())
  worst = {'image': 0.0, 'landmarks': 0.0, 'pointmaps': 0.0, 'edgemaps': 0.0}
  image_off_by_more_than_1 = 0.0
  aug = sys.modules['lib.dataset.augmentation']
  saved = (aug.random, aug.np, aug.os)
  try:
    for s in range(samples):
      script = _Script(1000 + s)
      _script_official(module, script)
      official = dataset[0]
      ours = input_pipeline.train_example(record, _ScriptedGenerator(script), spec)
      img = official['data'].numpy().transpose(1, 2, 0)[..., ::-1] * 127.5 + 127.5   # BGR CHW -> RGB HWC
      diff = np.abs(np.rint(img) - ours['image'].astype(np.float64))
      worst['image'] = max(worst['image'], float(diff.max()))
      image_off_by_more_than_1 = max(image_off_by_more_than_1, float((diff > 1).mean()))
      label = [t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in official['label']]
      worst['landmarks'] = max(worst['landmarks'], float(np.abs(label[0] - ours['landmarks']).max()))
      worst['pointmaps'] = max(worst['pointmaps'],
                               float(np.abs(label[1].transpose(1, 2, 0) - ours['pointmaps']).max()))
      worst['edgemaps'] = max(worst['edgemaps'],
                              float(np.abs(label[2].transpose(1, 2, 0) - ours['edgemaps']).max()))
  finally:
    aug.random, aug.np, aug.os = saved
  note = f'official vs ours, same random draws, {samples} samples'
  return [
      {'name': 'parity: max |image diff| (grey levels)', 'value': worst['image'], 'unit': 'levels',
       'notes': f'{note}; at most {100 * image_off_by_more_than_1:.2f}% of pixels differ by > 1'},
      {'name': 'parity: max |landmark diff| (normalised)', 'value': worst['landmarks'], 'unit': '', 'notes': note},
      {'name': 'parity: max |point map diff|', 'value': worst['pointmaps'], 'unit': '', 'notes': note},
      {'name': 'parity: max |edge map diff|', 'value': worst['edgemaps'], 'unit': '', 'notes': note},
  ]


def _official_rows(path: str, record: dict, repeats: int, ours_rate: float) -> tuple[list[dict], str]:
  try:
    import pandas  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return [], f'official timing skipped ({e})'
  module = official.alignment_dataset(path)
  torch.set_num_threads(1)
  rows = []
  with tempfile.TemporaryDirectory() as folder:
    dataset = _official_dataset(module, folder, record, os.path.join(folder, 'face.jpg'))
    n = 8
    wall, cpu = _rates(lambda: [dataset[0] for _ in range(n)], n, repeats)
    rows.append({'name': 'official AlignmentDataset.__getitem__ (1 thread, CPU time)', 'value': cpu,
                 'unit': 'samples/s', 'notes': f'{1e3 / cpu:.1f} ms CPU per sample; ours is '
                                               f'{ours_rate / cpu:.1f}x faster (CPU time)'})
    rows.append({'name': 'official AlignmentDataset.__getitem__ (1 thread, wall)', 'value': wall,
                 'unit': 'samples/s', 'notes': f'{1e3 / wall:.1f} ms per sample'})
    rows += _parity_rows(module, dataset, record)
  return rows, ''


# ---- Ours -------------------------------------------------------------------------------------------

def worker_counts(args) -> list[int]:
  """`--workers` as a list of worker-process counts (empty when not given)."""
  given = getattr(args, 'workers', '') or ''
  counts = [int(w) for w in given.split(',') if w.strip()]
  if any(w < 0 for w in counts):
    raise ValueError(f'--workers must be counts >= 0, got {given!r}')
  return counts


def _worker_rows(args, config, source, batch: int) -> list[dict]:
  """The Grain training stream with config.data.num_workers worker processes (mp_prefetch), for each
  count of `--workers`: samples/s by wall time, after a warm-up that starts the workers and fills
  their buffers. What a GPU step can be fed: compare with the train section's images/s."""
  from star_jax.data import pipeline as input_pipeline  # pylint: disable=import-outside-toplevel
  rows = []
  for workers in worker_counts(args):
    config.data.num_workers = workers
    t_start = time.perf_counter()
    it = iter(input_pipeline.train_dataset(config, source, seed=0, process_index=0, process_count=1))
    try:
      for _ in range(2 + 2 * workers):   # worker start-up and their first batches
        next(it)
      warmup = time.perf_counter() - t_start
      steps = max(8, 4 * workers)
      t0 = time.perf_counter()
      for _ in range(steps):
        next(it)
      seconds = time.perf_counter() - t0
    finally:
      getattr(it, 'close', lambda: None)()
    rate = steps * batch / seconds
    rows.append({'name': f'ours Grain train_dataset, {workers} worker processes (wall)', 'value': rate,
                 'unit': 'samples/s', 'workers': workers, 'cpu_count': os.cpu_count(), 'batch': batch,
                 'notes': f'{steps} batches of {batch} after a {warmup:.1f} s warm-up; {config.data.num_threads} '
                          f'threads per process; {os.cpu_count()} CPU cores on this machine'})
  config.data.num_workers = 0
  return rows


def run(args) -> list[dict]:
  from star_jax.data import pipeline as input_pipeline  # pylint: disable=import-outside-toplevel
  repeats = benchmarks.repeats(args)
  record = synthetic_face_record()
  config = _config()
  spec = input_pipeline.ExampleSpec.from_config(config)
  threads = cv2.getNumThreads()
  cv2.setNumThreads(1)
  try:
    rng = np.random.default_rng(0)
    n = 16
    wall, ours_rate = _rates(lambda: [input_pipeline.train_example(record, rng, spec) for _ in range(n)], n,
                             repeats)
    what = '1024x768 JPEG decode, augmentation, targets'
    rows = [{'name': 'ours train_example (1 thread, CPU time)', 'value': ours_rate, 'unit': 'samples/s',
             'notes': f'{1e3 / ours_rate:.1f} ms CPU per sample: {what}'},
            {'name': 'ours train_example (1 thread, wall)', 'value': wall, 'unit': 'samples/s',
             'notes': f'{1e3 / wall:.1f} ms per sample'}]

    batch = 32
    config.batch_size = batch
    source = [record] * 64
    it = iter(input_pipeline.train_dataset(config, source, seed=0, process_index=0, process_count=1))
    next(it)  # warm-up (thread start)
    steps = max(2, repeats // 2)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
      next(it)
    rate = steps * batch / (time.perf_counter() - t0)
    cpu_rate = steps * batch / (time.process_time() - c0)
    getattr(it, 'close', lambda: None)()   # stop its prefetch threads before timing the official
    rows.append({'name': f'ours Grain train_dataset ({config.data.get("num_threads", 2)} threads, wall)',
                 'value': rate, 'unit': 'samples/s',
                 'notes': f'batches of {batch}; {cpu_rate:.0f} samples per CPU-second; {os.cpu_count()} '
                          'CPU cores on this machine'})

    rows += _worker_rows(args, config, source, batch)

    if getattr(args, 'official', ''):
      official, why = _official_rows(args.official, record, repeats, ours_rate)
      rows += official
      if why:
        rows.append({'name': 'official AlignmentDataset.__getitem__', 'value': float('nan'), 'unit': '',
                     'notes': why})
  finally:
    cv2.setNumThreads(threads)
  return rows
