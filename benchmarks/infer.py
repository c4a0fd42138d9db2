"""CPU inference latency of the full WFLW network (256 px, 4 stacks, 256 channels, 98 points), random
weights: ours in JAX (float32, bfloat16), the ONNX export in onnxruntime (float32; int8 dynamic
quantisation for the network alone) and the official PyTorch network (`--official PATH`).

  python scripts/benchmark.py infer [--official /path/to/STAR --official_python /path/to/python-with-torch]
      [--repeats 3] [--small]

Two measurements, at batch 1 (per-face latency) and batch 8 (throughput):
- network alone: one forward pass on B face crops already in memory (ours: the jit-compiled prediction
  function of `star_jax.models.network_fn`, landmarks and covariances, on uint8 crops; ONNX: the exported
  model's `session.run` on float32 crops; official: `net(x)` under no_grad on a prepared tensor, timed
  inside its process);
- end to end: `FaceLandmarker.predict` on B paths of a 640 x 360 JPEG photo (tests/testdata/real_faces_full/
  breakingbad.jpg downscaled; decode, BlazeFace detection of the largest face (the default: its pyramid
  scanned coarse to fine, stopping once no finer level can find a larger face), its crop, network, map
  back to image pixels; refinement off, so one network pass per face). 'pipeline only' is the same
  with a network that returns zeros: what the network's time is added to; 'pipeline only, whole
  pyramid' scans every level, as detection did before the coarse-to-fine scan.
  The official network runs end to end behind the same pipeline: its crops go to its process through
  a .npy file in /dev/shm, it applies the official demo's input scaling (BGR, x / 255 * 2 - 1), and its
  last stack's landmarks come back the same way (the official code ships no detector of its own besides
  dlib, and the crop is the official demo's rule in both).
Every engine runs in turns (each repetition calls every engine once, after one untimed call each), so
a change in the machine's load hits all alike; medians of --repeats (default 3 on a CPU).

Start-up: the wall time of the predict command on that photo (a checkpoint of the same network) in a
fresh process, twice, with a new, empty cache folder ($STAR_JAX_HOME): the first run compiles the
network (what every run paid before JAX's persistent compilation cache), the second loads the compiled
program from the cache folder (star_jax/home.py).

Also: the network's FLOPs per face (XLA's cost analysis of our compiled forward; PyTorch's
FlopCounterMode on the official one, when it runs), the FLOP/s of a large float32 matmul measured in
the same run (JAX and numpy, the faster is the "matmul peak"), and the fraction of that peak each
engine's network reaches. The official network runs in its own process (`--official_python`, by default
this interpreter; it needs PyTorch and numpy, no JAX), as the official code ships (no star_jax CPU
tuning). --small: a narrow network (256 px, 4 stacks, 16 channels) and a small matmul, for a smoke test.
"""

from __future__ import annotations

import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import benchmarks

_REPO = pathlib.Path(__file__).resolve().parents[1]
PHOTO = _REPO / 'tests' / 'testdata' / 'real_faces_full' / 'breakingbad.jpg'
FULL = {'image_size': 256, 'nstack': 4, 'channels': 256, 'matmul': 2048}
# The official network needs 256 px and 4 stacks (sizes fixed in its code), so the small one is narrow.
SMALL = {'image_size': 256, 'nstack': 4, 'channels': 16, 'matmul': 512}
PHOTO_WIDTH = 640   # the benchmark photo is PHOTO downscaled to 640 x 360: detection cost grows with the pixels
BATCHES = (1, 8)


# ---- Timing -------------------------------------------------------------------------------------

def in_turns(engines: dict, repeats: int) -> dict:
  """name -> median seconds of `engines[name]()`, called in turn each repetition (one untimed call
  each first). An engine may return its own measured seconds (a float) instead of None: the
  official network alone is timed inside its process."""
  for fn in engines.values():
    fn()
  times = {name: [] for name in engines}
  for _ in range(repeats):
    for name, fn in engines.items():
      t0 = time.perf_counter()
      own = fn()
      times[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def matmul_peak(n: int, repeats: int = 5) -> dict:
  """FLOP/s of an (n, n) @ (n, n) float32 matmul, best of `repeats`: {'jax': ..., 'numpy': ...}."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  a = np.random.default_rng(0).standard_normal((n, n), np.float32)
  b = np.random.default_rng(1).standard_normal((n, n), np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  mm = jax.jit(jnp.matmul)
  fns = {'jax': lambda: jax.block_until_ready(mm(ja, jb)), 'numpy': lambda: a @ b}
  out = {}
  for name, fn in fns.items():
    fn()
    best = min(_timed(fn) for _ in range(repeats))
    out[name] = 2.0 * n ** 3 / best
  return out


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


# ---- The official network in its own process ----------------------------------------------------

class OfficialWorker(benchmarks.WorkerProcess):
  """The official StackedHGNetV1 (random weights, eval, no_grad) in a child process, driven by lines:
  'net B' times one forward pass on a prepared (B, 3, S, S) tensor; 'crops PATH' runs the network on
  the uint8 RGB crops in PATH (.npy) as the official demo does and writes the last stack's landmarks
  (B, P, 2) in [-1, 1] to PATH.out.npy. A separate process: PyTorch's and XLA's thread pools and heaps
  would share one process otherwise (see benchmarks/train.py)."""

  def __init__(self, path: str, python: str, shape: dict):
    super().__init__(['-m', 'benchmarks.infer', '--official-worker', path, str(shape['image_size']),
                      str(shape['nstack']), str(shape['channels'])], python=python, cwd=str(_REPO))
    self._dir = tempfile.mkdtemp(prefix='star_infer_', dir='/dev/shm' if os.path.isdir('/dev/shm') else None)
    note = self._reply('ready')
    self.flops, self.note = note.split(' ', 1)

  def network_seconds(self, batch: int) -> float:
    return float(self._ask(f'net {batch}'))

  def __call__(self, crops: np.ndarray) -> dict:
    """A FaceLandmarker network function: uint8 (B, S, S, 3) RGB -> {'landmarks': (B, P, 2) in [-1, 1]}."""
    path = os.path.join(self._dir, 'crops.npy')
    np.save(path, np.ascontiguousarray(crops))
    self._ask(f'crops {path}')
    return {'landmarks': np.load(path + '.out.npy')}

  def close(self):
    super().close()
    for name in os.listdir(self._dir):
      os.unlink(os.path.join(self._dir, name))
    os.rmdir(self._dir)


def _worker_main(path: str, image_size: int, nstack: int, channels: int):
  """The child side of OfficialWorker (imports PyTorch, numpy and benchmarks.official; no JAX)."""
  import warnings  # pylint: disable=import-outside-toplevel
  warnings.simplefilter('ignore')
  try:
    import torch  # pylint: disable=import-outside-toplevel

    from benchmarks import official  # pylint: disable=import-outside-toplevel
    from star_jax import layouts  # pylint: disable=import-outside-toplevel
    torch.set_grad_enabled(False)
    net = official.network(path, layouts.WFLW, image_size=image_size, nstack=nstack, channels=channels).eval()
    inputs = {b: torch.randn(b, 3, image_size, image_size) for b in BATCHES}
    from torch.utils.flop_counter import FlopCounterMode  # pylint: disable=import-outside-toplevel
    counter = FlopCounterMode(display=False)
    with counter:
      net(inputs[1])
    flops = counter.get_total_flops()
  except Exception as e:  # pylint: disable=broad-except
    print(f'error {type(e).__name__}: {e}', flush=True)
    return
  print(f'ready {flops} torch {torch.__version__}, {torch.get_num_threads()} threads', flush=True)
  for line in sys.stdin:
    command = line.split()
    if not command or command[0] == 'quit':
      break
    if command[0] == 'net':
      x = inputs[int(command[1])]
      t0 = time.perf_counter()
      net(x)
      print(f'done {time.perf_counter() - t0}', flush=True)
    else:   # crops PATH: the official demo's input scaling, on BGR (its images come from cv2.imread)
      crops = np.load(command[1])
      x = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).float().permute(0, 3, 1, 2) / 255.0 * 2.0 - 1.0
      landmarks = net(x)[-1]
      np.save(command[1] + '.out.npy', landmarks.numpy())
      print('done 0', flush=True)


# ---- Our engines --------------------------------------------------------------------------------

def _models(shape: dict):
  """Our float32 and bfloat16 networks (the same random weights), eval mode."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from star_jax import layouts  # pylint: disable=import-outside-toplevel
  from star_jax.models import StackedHGNet  # pylint: disable=import-outside-toplevel

  def build(dtype):
    return StackedHGNet(layouts.WFLW.num_points, layouts.WFLW.edge_membership(), image_size=shape['image_size'],
                        nstack=shape['nstack'], nlevels=4, channels=shape['channels'], dtype=dtype, rngs=nnx.Rngs(0))

  f32, bf16 = build('float32'), build('bfloat16')
  nnx.update(bf16, nnx.state(f32))
  f32.eval()
  bf16.eval()
  return f32, bf16


def network_flops(model, batch: int = 1) -> float:
  """FLOPs of one compiled forward pass (landmarks and covariances) at `batch`, by XLA's cost analysis."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from star_jax import models  # pylint: disable=import-outside-toplevel

  graph, params, batch_stats = models.split(model)
  fn = jax.jit(models.make_predict_fn(graph, covariances=True))
  images = jax.ShapeDtypeStruct((batch, model.image_size, model.image_size, 3), jnp.uint8)
  cost = fn.lower(params, batch_stats, images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost['flops'])


def _onnx_files(model, tmp: str, quantise: bool) -> dict:
  """Writes the ONNX export of `model` (and its int8 dynamic quantisation); name -> (path, seconds to make)."""
  from star_jax import export  # pylint: disable=import-outside-toplevel
  files = {}
  t0 = time.perf_counter()
  fp32 = os.path.join(tmp, 'model.onnx')
  with open(fp32, 'wb') as f:
    f.write(export.export_onnx(model, metadata={'layout': 'WFLW'}).SerializeToString())
  files['onnx'] = (fp32, time.perf_counter() - t0)
  if quantise:
    from onnxruntime.quantization import QuantType, quantize_dynamic  # pylint: disable=import-outside-toplevel
    from onnxruntime.quantization.shape_inference import quant_pre_process  # pylint: disable=import-outside-toplevel
    t0 = time.perf_counter()
    pre, int8 = os.path.join(tmp, 'model.pre.onnx'), os.path.join(tmp, 'model.int8.onnx')
    quant_pre_process(fp32, pre)   # constant folding first, see benchmarks/export.py
    quantize_dynamic(pre, int8, weight_type=QuantType.QInt8)
    files['onnx int8'] = (int8, time.perf_counter() - t0)
  return files


def predict_startup(shape: dict, photo: str) -> tuple[float, float]:
  """Seconds of `python -m star_jax.predict` on `photo` with a checkpoint of a random full-layout WFLW
  network of `shape`, run twice in fresh processes sharing a new cache folder: (first, second)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from star_jax import config_lib  # pylint: disable=import-outside-toplevel
  from star_jax.models import create_model  # pylint: disable=import-outside-toplevel
  from star_jax import checkpoints  # pylint: disable=import-outside-toplevel

  config = config_lib.load_config(str(_REPO / 'configs' / 'wflw.py'))
  config.model.nstack, config.model.channels = shape['nstack'], shape['channels']
  times = []
  with tempfile.TemporaryDirectory(prefix='star_infer_startup_') as tmp:
    checkpoint = os.path.join(tmp, 'checkpoint')
    checkpoints.save_model_checkpoint(checkpoint, model=create_model(config, nnx.Rngs(0)), config=config)
    env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_COMPILATION_CACHE')}
    env.update(STAR_JAX_HOME=os.path.join(tmp, 'home'), STAR_JAX_COMPILATION_CACHE='1')
    for i in range(2):
      t0 = time.perf_counter()
      subprocess.run([sys.executable, '-m', 'star_jax.predict', '--checkpoint', checkpoint, photo, '--output',
                      os.path.join(tmp, f'out{i}')], cwd=str(_REPO), env=env, check=True, capture_output=True)
      times.append(time.perf_counter() - t0)
  return times[0], times[1]


class _WholePyramid:
  """A detector without BlazeFace's coarse-to-fine scan for the largest face: every level, then the choice."""

  def __init__(self, detector):
    self.detect = detector.detect


# ---- The section --------------------------------------------------------------------------------

def run(args):
  import cv2  # pylint: disable=import-outside-toplevel  (not at the top: the official worker has no OpenCV)
  import jax  # pylint: disable=import-outside-toplevel

  from star_jax import models  # pylint: disable=import-outside-toplevel
  from star_jax.inference import face_detect  # pylint: disable=import-outside-toplevel
  from star_jax.inference.landmarker import FaceLandmarker  # pylint: disable=import-outside-toplevel

  small = bool(getattr(args, 'small', False))
  shape = SMALL if small else FULL
  size = shape['image_size']
  what = f"WFLW {size}px {shape['nstack']} stacks {shape['channels']} ch"
  repeats = benchmarks.repeats(args, full_network=not small)
  rows = []
  load_before = os.getloadavg()[0]

  peaks = matmul_peak(shape['matmul'])
  peak = max(peaks.values())
  for name, flops_s in peaks.items():
    rows.append({'name': f"matmul f32 {shape['matmul']}^3 {name}", 'value': flops_s / 1e9, 'unit': 'GFLOP/s',
                 'notes': 'best of 5' + ('; the matmul peak' if flops_s == peak else '')})

  f32, bf16 = _models(shape)
  flops = network_flops(f32)
  bf16_fn = models.network_fn(bf16, with_covariance=True)
  nets = {'jax f32': models.network_fn(f32, with_covariance=True),
          # The pipeline's geometry is float32 numpy: the outputs are cast as the export casts them.
          'jax bf16': lambda crops: {k: v.astype(np.float32) for k, v in bf16_fn(crops).items()}}

  try:
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel

    from star_jax.inference import onnx_model  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    ort = None
    rows.append({'name': 'onnxruntime', 'value': float('nan'), 'unit': '', 'notes': f'skipped: {e}'})
  tmp = tempfile.mkdtemp(prefix='star_infer_onnx_')
  sessions = {}
  if ort is not None:
    for name, (path, seconds) in _onnx_files(f32, tmp, quantise=True).items():
      rows.append({'name': f'{name} file {what}', 'value': os.path.getsize(path) / 2 ** 20, 'unit': 'MiB',
                   'notes': f'made in {seconds:.0f} s'})
      sessions[name] = ort.InferenceSession(path, providers=['CPUExecutionProvider'])
    nets['onnx'] = onnx_model.OnnxNetwork(os.path.join(tmp, 'model.onnx'))

  worker = None
  if getattr(args, 'official', ''):
    try:
      worker = OfficialWorker(args.official, getattr(args, 'official_python', ''), shape)
    except (RuntimeError, OSError) as e:
      rows.append({'name': 'official PyTorch network', 'value': float('nan'), 'unit': '', 'notes': f'skipped: {e}'})
    else:
      nets['official'] = worker
  rows.append({'name': f'network FLOPs per face {what}', 'value': flops / 1e9, 'unit': 'GFLOP',
               'notes': 'XLA cost analysis of our compiled forward (landmarks + covariances), batch 1'
                        + (f'; official (PyTorch FlopCounterMode): {float(worker.flops) / 1e9:.2f} GFLOP'
                           if worker is not None else '')})

  detector = face_detect.make_detector('blazeface')
  landmarkers = {name: FaceLandmarker(fn, size, detector=detector, faces='largest', refine=False, batch_size=8)
                 for name, fn in nets.items()}

  def no_network(crops):
    return {'landmarks': np.zeros((len(crops), 98, 2), np.float32)}
  landmarkers['pipeline only'] = FaceLandmarker(no_network, size, detector=detector, faces='largest', refine=False,
                                                batch_size=8)
  landmarkers['pipeline only, whole pyramid'] = FaceLandmarker(
      no_network, size, detector=_WholePyramid(detector), faces='largest', refine=False, batch_size=8)
  photo = os.path.join(tmp, 'photo.jpg')
  image = cv2.imread(str(PHOTO))
  image = cv2.resize(image, (PHOTO_WIDTH, round(image.shape[0] * PHOTO_WIDTH / image.shape[1])),
                     interpolation=cv2.INTER_AREA)
  cv2.imwrite(photo, image, [cv2.IMWRITE_JPEG_QUALITY, 90])
  assert len(landmarkers['jax f32'].predict([photo])[0]) == 1, 'no face found in the benchmark photo'

  try:
    results = {}
    for batch in BATCHES:
      crops = np.random.default_rng(batch).integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
      crops_f32 = crops.astype(np.float32)
      paths = [photo] * batch
      engines = {}
      for name in ('jax f32', 'jax bf16'):
        engines[f'network {name}'] = lambda fn=nets[name]: fn(crops)
      for name, session in sessions.items():
        engines[f'network {name}'] = lambda s=session: s.run(None, {'image': crops_f32})
      if worker is not None:
        engines['network official'] = lambda b=batch: worker.network_seconds(b)
      for name, lm in landmarkers.items():
        engines[f'end to end {name}'] = lambda lm=lm: lm.predict(paths)
      results[batch] = in_turns(engines, repeats)
    first, second = predict_startup(shape, photo)
  finally:
    if worker is not None:
      worker.close()
    for name in os.listdir(tmp):
      os.unlink(os.path.join(tmp, name))
    os.rmdir(tmp)

  where = (f'{jax.default_backend()}, onnxruntime {ort.__version__ if ort else "-"}, {os.cpu_count()} CPUs, '
           f'load average {load_before:.1f} before; in turns, median of {repeats}')
  for batch, times in results.items():
    official_net = times.get('network official')
    official_e2e = times.get('end to end official')
    for name, seconds in times.items():
      per_face = seconds / batch
      note = f'{batch / seconds:.2f} faces/s'
      if name.startswith('network'):
        note += f'; {flops / per_face / peak:.0%} of the matmul peak'
        ref = official_net
      else:
        ref = official_e2e
      if ref and 'official' not in name and 'pipeline' not in name:
        note += f'; {ref / seconds:.2f}x the official'
      rows.append({'name': f'{name} b{batch}', 'value': per_face * 1e3, 'unit': 'ms/face', 'notes': f'{note}; {where}'})
  rows.append({'name': f'predict one photo, first run {what}', 'value': first, 'unit': 's',
               'notes': 'python -m star_jax.predict in a fresh process with an empty cache folder: compiles the '
                        f'network, as every run did before the persistent compilation cache; {where}'})
  rows.append({'name': f'predict one photo, second run {what}', 'value': second, 'unit': 's',
               'notes': f'the same again, the compiled network loaded from the cache folder: {first - second:.1f} s '
                        f'less ({first / second:.2f}x); {where}'})
  if 'network onnx int8' in results[8]:
    faster = results[8]['network onnx int8'] < results[8]['network onnx']
    rows.append({'name': 'onnx int8 over onnx f32, network b8', 'value': results[8]['network onnx'] /
                 results[8]['network onnx int8'], 'unit': 'x',
                 'notes': 'faster: its accuracy cost needs a trained model (not measured here)' if faster else
                          'not faster than float32: not offered'})
  return rows


if __name__ == '__main__':
  if len(sys.argv) == 6 and sys.argv[1] == '--official-worker':
    _worker_main(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]))
  else:  # quick manual run: python -m benchmarks.infer
    import types  # pylint: disable=import-outside-toplevel
    for r in run(types.SimpleNamespace(repeats=1, official='', small=True)):
      print(r)
