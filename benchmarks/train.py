"""Speed of the full WFLW training step: images per second.

Ours is exactly what the trainer runs: `star_jax.training.step.make_train_step` (StackedHGNet 256 x 256, 4 stacks,
256 channels, AAM; STAR loss + AWing on point and edge maps for every stack; Adam; EMA of weights and
BatchNorm statistics), `jax.jit`-compiled with the state donated. On a CPU: batch 8, float32. On a GPU:
the official per-GPU batch 32 (global batch 128 over 4 GPUs) in float32 and bfloat16 compute (float32
parameters), with the share of the GPU's peak FLOP/s (MFU: FLOPs counted by XLA's cost analysis of the
step before optimisation, over the step's wall time and the device's dense peak) and memory: XLA's
buffer assignment of the compiled step and the device allocator's peak (`memory_stats()`, on GPUs).
`--batch`, `--dtypes` choose other settings; `--small` times a small network (64 px input, 4 stacks,
32 channels) with the same code, for dry runs on a CPU (scripts/device_check.sh).

With `--official PATH` (a checkout of ZhenglinZhou/STAR) and PyTorch importable, the official training
step runs side by side on the same batch in a child process, timed in turns with ours (blocks of
BLOCK consecutive steps, the first of each not counted; turns make a load change on a shared machine
hit both alike), as the official code ships (XLA flag and huge-page malloc of star_jax/cpu_tuning.py
are ours only): the official StackedHGNetV1 (its own
initialisation) in train mode, STARLoss_v2 on each stack's fusion heatmaps and AWingLoss on its point
and edge maps (classes loaded from PATH/lib/loss), weighted as the official config, `zero_grad`,
`backward`, Adam, then the EMA update of a second network. Timed with autograd anomaly detection off,
and as the official code ships it (anomaly detection on: `set_detect_anomaly(True)` in
`set_environment` and `detect_anomaly()` around `backward`). It runs in float32 only (as shipped), on
`--official_device` ('auto': CUDA when our step runs on a GPU and PyTorch sees one, else the CPU),
beside our float32 setting.

Rows give images/s by wall time; the notes add seconds per step and each process's CPU seconds per
step (all threads), which is less sensitive to other jobs than wall time. Each row also carries its
numbers as fields (step_s, compile_s, flops, mfu, memory...) for scripts/device_check.sh's summary. On a
GPU, a second row per setting times 10 steps dispatched back to back (as the trainer runs them,
without waiting for each), against the step-by-step time of the turns, which the official step's
per-term `.item()` calls impose on it. Our step runs with star_jax's CPU tuning
(star_jax/cpu_tuning.py) as the trainer does; STAR_JAX_CPU_TUNING=0 times it with XLA's and glibc's
defaults.

  python scripts/benchmark.py train [--official /path/to/STAR] [--repeats 3] [--batch 32] [--dtypes float32,bfloat16]

(run it with a Python that has both star_jax and PyTorch for `--official`, a virtual environment with both installed).
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import jax
import numpy as np

import benchmarks
from benchmarks import official
from star_jax import config_lib, layouts
from star_jax.data import targets
from star_jax.training import state as state_lib
from star_jax.training import step as step_lib

LAYOUT = layouts.WFLW
SIGMA = 1.5
BLOCK = 3   # consecutive steps per turn (the first is not counted), see interleaved()
PIPELINED = 10   # steps dispatched back to back for the pipelined rate (GPU)
# Dense peak FLOP/s per device kind (matrix units, no sparsity), for the share of peak on a GPU.
# float32 matmuls and convolutions run as TF32 on these GPUs under JAX's default precision.
PEAK_FLOPS = {
    'H100': {'float32': 494.7e12, 'bfloat16': 989.4e12},   # SXM
    'H200': {'float32': 494.7e12, 'bfloat16': 989.4e12},
    'A100': {'float32': 156e12, 'bfloat16': 312e12},
}
DTYPES = ('float32', 'bfloat16')


@dataclasses.dataclass(frozen=True)
class Shape:
  """The network and input that are timed: the official WFLW model, or a small one for dry runs."""
  image: int
  maps: int
  nstack: int
  channels: int
  label: str


FULL = Shape(256, 64, 4, 256, 'WFLW 256px')
SMALL = Shape(64, 16, 4, 32, 'small 64px 4x32ch')   # the official code sizes CoordConv as 4 stacks


def shape_of(args) -> Shape:
  return SMALL if getattr(args, 'small', False) else FULL


def settings(args, backend: str) -> list[tuple[int, str]]:
  """(batch, dtype) pairs to time: `--batch` / `--dtypes` when given, else batch 8 float32 on a CPU
  and the official per-GPU batch 32 in float32 and bfloat16 on an accelerator."""
  cpu = backend == 'cpu'
  batch = getattr(args, 'batch', None) or (8 if cpu else 32)
  given = getattr(args, 'dtypes', None) or ''
  dtypes = [d.strip() for d in given.split(',') if d.strip()] or (['float32'] if cpu else list(DTYPES))
  bad = [d for d in dtypes if d not in DTYPES]
  if bad or int(batch) < 1:
    raise ValueError(f'--dtypes must be among {DTYPES} and --batch at least 1, got {given!r} and {batch}')
  return [(int(batch), d) for d in dtypes]


def wflw_config(dtype: str, shape: Shape = FULL):
  """configs/wflw.py (the official recipe) with the compute dtype set (and the small shape's sizes)."""
  config = config_lib.load_config('configs/wflw.py')
  config.model.dtype = dtype
  config.data.image_size, config.data.heatmap_size = shape.image, shape.maps
  config.model.nstack, config.model.channels = shape.nstack, shape.channels
  return config


def synthetic_batch(batch: int, seed: int = 0, shape: Shape = FULL) -> dict:
  """A WFLW training batch (numpy, channels-last) with targets made as the input pipeline makes them.

  'image' uint8 (B, S, S, 3); 'landmarks' (B, 98, 2) in [-1, 1]; 'pointmaps' (B, S/4, S/4, 98) and
  'edgemaps' (B, S/4, S/4, 9) from star_jax.data.targets, for face-like random points (an ellipse of
  jittered points around the crop centre); S = 256 for the full shape.
  """
  rng = np.random.default_rng(seed)
  n, image, maps = LAYOUT.num_points, shape.image, shape.maps
  images = rng.integers(0, 256, (batch, image, image, 3), dtype=np.uint8)
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  k = image / 256.0
  points, pmaps, emaps = [], [], []
  for _ in range(batch):
    radius = k * np.array([70.0, 90.0]) * (0.5 + 0.5 * rng.random((n, 1)))
    p = (image - 1) / 2 + radius * np.stack([np.cos(t), np.sin(t)], -1) + rng.normal(0, 3 * k, (n, 2))
    points.append(targets.normalize_landmarks(p, image))
    pmaps.append(targets.point_maps(p, image, maps, SIGMA))
    emaps.append(targets.edge_maps(p, LAYOUT.edges, image, maps))
  return {'image': images, 'landmarks': np.stack(points).astype(np.float32),
          'pointmaps': np.stack(pmaps).astype(np.float32), 'edgemaps': np.stack(emaps).astype(np.float32)}


def _flops(cost) -> float:
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get('flops', float('nan')))


def _memory(compiled) -> dict:
  """XLA's buffer assignment of a compiled program, in bytes (empty where the backend has none)."""
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if m is None:
    return {}
  out = {k: int(getattr(m, k + '_in_bytes', 0) or 0) for k in ('argument_size', 'output_size', 'alias_size',
                                                               'temp_size', 'peak_memory')}
  return out


def device_memory() -> dict:
  """The default device's allocator figures (`memory_stats()`: GPUs and TPUs), in bytes, or {}."""
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    stats = {}
  return {k: int(stats[k]) for k in ('peak_bytes_in_use', 'bytes_in_use', 'bytes_limit') if k in stats}


def our_step(config, batch_np: dict):
  """Compiles our train step for `batch_np`. Returns (run_one_step, info).

  `run_one_step()` advances the (donated) state by one step and blocks until it is done;
  `run_one_step.pipelined(n)` dispatches n steps back to back and blocks once, at the end.
  info: 'compile_s'; 'flops' per step, from XLA's cost analysis of the step before optimisation
  (counted as the program is written: on a GPU the optimised program's convolutions are library calls
  that the analysis of the compiled step may not count); 'flops_compiled', the compiled step's own
  count; 'memory', XLA's buffer assignment of the compiled step (bytes).
  """
  tx = state_lib.make_optimizer(config, 1000)
  graphs, state = state_lib.create_train_state(config, tx, rng_seed=0)
  batch = jax.device_put(batch_np)
  step = jax.jit(step_lib.make_train_step(graphs, tx, config), donate_argnums=(0,))
  t0 = time.perf_counter()
  lowered = step.lower(state, batch)
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  try:
    flops = _flops(lowered.cost_analysis())
  except Exception:  # pylint: disable=broad-except
    flops = float('nan')
  flops_compiled = _flops(compiled.cost_analysis())
  if not flops > 0:
    flops = flops_compiled
  holder = {'state': state}

  def run_one_step():
    holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready((holder['state'], metrics))
    return metrics

  def pipelined(n: int):
    metrics = None
    for _ in range(n):
      holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready((holder['state'], metrics))
    return metrics

  run_one_step.pipelined = pipelined
  info = {'compile_s': compile_s, 'flops': flops, 'flops_compiled': flops_compiled, 'memory': _memory(compiled)}
  return run_one_step, info


def _timed(fn) -> tuple[float, float]:
  """(wall s, this process's CPU s) of one call of `fn`."""
  t0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - t0, time.process_time() - c0


def interleaved(fns: dict, repeats: int, block: int = BLOCK) -> dict:
  """{name: (median wall s, median CPU s)} of functions that each time one call of themselves and
  return (wall s, CPU s).

  `repeats` rounds; in each, every function runs `block` times in a row and all but the first call
  of its block are kept. Rounds in turn make a load change on a shared machine hit all alike; blocks
  measure each side as training runs it, step after step: the first step after the other process's
  step pays for the memory that process left fragmented (with transparent huge pages the kernel
  compacts memory in the page-fault path; measured: 14 s instead of 5.6 s for ours, 8.7 s instead
  of 6.2 s for the official step when single steps alternate).
  """
  samples = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      for i in range(max(block, 2)):
        sample = fn()
        if i:
          samples[name].append(sample)
  return {name: (statistics.median(s[0] for s in v), statistics.median(s[1] for s in v))
          for name, v in samples.items()}


class OfficialWorker(benchmarks.WorkerProcess):
  """The official step in a child process (same Python), driven one step at a time.

  A separate process, not the same one: sharing a process with PyTorch slows our step down by
  half on this machine (XLA maps and faults in a fresh ~4.4 GB scratch buffer at every execution,
  and after PyTorch's step those page faults cost several times more), and the two frameworks'
  thread pools would share one heap. Each process reports its own wall and CPU time per step. On a
  GPU both processes use the same device, one step at a time.
  """

  def __init__(self, path: str, batch: int, shape: Shape = FULL, device: str = 'cpu'):
    super().__init__(['-m', 'benchmarks.train', '--official-worker', path, str(batch),
                      'small' if shape == SMALL else 'full', device])
    self.note = self._reply('ready')
    self.peak_bytes = 0

  def step(self, anomaly: bool) -> tuple[float, float]:
    """Runs one official step; returns its (wall s, CPU s) as the worker measured them."""
    wall, cpu, _, peak = self._ask(f'step {int(anomaly)}').split()
    self.peak_bytes = max(self.peak_bytes, int(peak))
    return float(wall), float(cpu)


def _worker_main(path: str, batch: int, shape: Shape, device: str):
  """The child side of OfficialWorker: 'ready NOTE', then 'done WALL CPU LOSS PEAK_BYTES' per 'step A'
  line (PEAK_BYTES: torch's peak CUDA memory, 0 on a CPU)."""
  import warnings  # pylint: disable=import-outside-toplevel
  warnings.simplefilter('ignore')
  try:
    step, note = official.train_step(path, synthetic_batch(batch, shape=shape), nstack=shape.nstack,
                                     image_size=shape.image, channels=shape.channels, device=device)
  except Exception as e:  # pylint: disable=broad-except
    print(f'error {type(e).__name__}: {e}', flush=True)
    return
  print(f'ready {note}', flush=True)
  for line in sys.stdin:
    command = line.split()
    if not command or command[0] == 'quit':
      break
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step(bool(int(command[1])))
    print(f'done {time.perf_counter() - t0} {time.process_time() - c0} {loss} {step.peak_bytes()}', flush=True)


def _peak(dtype: str) -> float:
  kind = jax.devices()[0].device_kind
  for key, peaks in PEAK_FLOPS.items():
    if key in kind:
      return peaks[dtype]
  return float('nan')


def official_device(args, backend: str) -> str:
  """The torch device for the official step: `--official_device`, or with 'auto' CUDA when our step
  runs on a GPU and PyTorch sees one (checked in the worker: it fails clearly if not), else the CPU."""
  given = (getattr(args, 'official_device', None) or 'auto').strip()
  if given != 'auto':
    return given
  return 'cuda' if backend == 'gpu' else 'cpu'


def _mib(n) -> str:
  return f'{n / 2 ** 20:.0f} MiB'


def run(args):
  backend = jax.default_backend()
  cpu = backend == 'cpu'
  repeats = benchmarks.repeats(args, full_network=True)
  shape = shape_of(args)
  official_path = getattr(args, 'official', '')
  torch_device = official_device(args, backend)
  rows = []
  for batch, dtype in settings(args, backend):
    batch_np = synthetic_batch(batch, shape=shape)
    config = wflw_config(dtype, shape)
    ours, info = our_step(config, batch_np)
    fns = {'ours': lambda ours=ours: _timed(ours)}
    worker = None
    if official_path and dtype == 'float32':
      try:
        worker = OfficialWorker(official_path, batch, shape, torch_device)
      except RuntimeError as e:
        rows.append({'name': f'official PyTorch train step b{batch} float32', 'value': float('nan'),
                     'unit': 'images/s', 'notes': f'skipped: {e}', 'official': True, 'batch': batch,
                     'dtype': 'float32', 'device': torch_device, 'error': str(e)})
      else:
        fns['official'] = lambda: worker.step(False)
        fns['official_anomaly'] = lambda: worker.step(True)
    try:
      times = interleaved(fns, repeats)
    finally:
      if worker is not None:
        worker.close()
    wall, cpu_s = times['ours']
    flops = info['flops']
    memory = dict(info['memory'], **device_memory())
    where = (f'{backend}, median of {repeats} x {BLOCK - 1} steps' +
             (f', in blocks of {BLOCK} in turns with the official' if worker else ''))
    note = (f'{wall:.3g} s/step wall, {cpu_s:.3g} s CPU; compile {info["compile_s"]:.0f} s; '
            f'{flops / 1e9:.0f} GFLOP/step')
    peak = float('nan') if cpu else _peak(dtype)
    mfu = flops / wall / peak
    if not cpu:
      note += f'; {mfu:.1%} of peak {dtype} FLOP/s'
    if memory.get('temp_size'):
      note += f'; XLA temp {_mib(memory["temp_size"])}'
    if memory.get('peak_bytes_in_use'):
      note += f', device peak {_mib(memory["peak_bytes_in_use"])}'
    label = shape.label
    fields = {'batch': batch, 'dtype': dtype, 'backend': backend, 'step_s': wall, 'cpu_s': cpu_s,
              'compile_s': info['compile_s'], 'flops': flops, 'flops_compiled': info['flops_compiled'],
              'peak_flops': peak, 'mfu': mfu, 'memory': memory, 'shape': label}
    rows.append({'name': f'train step {label} b{batch} {dtype}', 'value': batch / wall,
                 'unit': 'images/s', 'notes': f'{note}; {where}', 'ours': True, **fields})
    if not cpu:
      # Dispatched back to back, as the trainer runs its steps (no wait per step).
      ours.pipelined(2)
      runs = []
      for _ in range(3):
        t0 = time.perf_counter()
        ours.pipelined(PIPELINED)
        runs.append((time.perf_counter() - t0) / PIPELINED)
      piped = statistics.median(runs)
      rows.append({'name': f'train step {label} b{batch} {dtype}, pipelined', 'value': batch / piped,
                   'unit': 'images/s', 'ours': True, 'pipelined': True,
                   'notes': f'{piped:.3g} s/step over {PIPELINED} steps dispatched back to back (median of 3); '
                            f'{flops / piped / peak:.1%} of peak {dtype} FLOP/s',
                   **dict(fields, step_s=piped, mfu=flops / piped / peak)})
    if worker is not None:
      o_wall, o_cpu = times['official']
      a_wall, a_cpu = times['official_anomaly']
      common = {'official': True, 'batch': batch, 'dtype': 'float32', 'device': torch_device,
                'peak_bytes': worker.peak_bytes, 'shape': label}
      mem = f', torch peak {_mib(worker.peak_bytes)}' if worker.peak_bytes else ''
      rows.append({'name': f'official PyTorch train step b{batch} float32', 'value': batch / o_wall,
                   'unit': 'images/s',
                   'notes': f'{o_wall:.3g} s/step wall, {o_cpu:.3g} s CPU; anomaly detection off; {worker.note}{mem}, '
                            'own process', 'anomaly': False, 'step_s': o_wall, 'cpu_s': o_cpu, **common})
      rows.append({'name': f'official PyTorch train step b{batch}, as shipped', 'value': batch / a_wall,
                   'unit': 'images/s',
                   'notes': f'{a_wall:.3g} s/step wall, {a_cpu:.3g} s CPU; autograd anomaly detection on',
                   'anomaly': True, 'step_s': a_wall, 'cpu_s': a_cpu, **common})
      target = 1.5 if cpu else 2.0
      rows.append({'name': 'speed-up of our train step over official', 'value': o_wall / wall, 'unit': 'x',
                   'notes': f'wall time, float32 both, anomaly detection off (CPU time: {o_cpu / cpu_s:.2f}x; '
                            f'as shipped: {a_wall / wall:.2f}x); target >= {target}',
                   'speedup': True, 'target': target, 'as_shipped': a_wall / wall, 'batch': batch})
  return rows


if __name__ == '__main__':
  if len(sys.argv) == 6 and sys.argv[1] == '--official-worker':
    _worker_main(sys.argv[2], int(sys.argv[3]), SMALL if sys.argv[4] == 'small' else FULL, sys.argv[5])
  else:  # quick manual run: python -m benchmarks.train
    import types  # pylint: disable=import-outside-toplevel
    print(run(types.SimpleNamespace(repeats=1, official='')))
