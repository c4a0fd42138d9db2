"""Speed of the full WFLW training step: images per second.

Ours is exactly what the trainer runs: `star_jax.training.step.make_train_step` (StackedHGNet 256 x 256, 4 stacks,
256 channels, AAM; STAR loss + AWing on point and edge maps for every stack; Adam; EMA of weights and
BatchNorm statistics), `jax.jit`-compiled with the state donated. On a CPU: batch 8, float32. On a GPU:
the official per-GPU batch 32 (global batch 128 over 4 GPUs) in float32 and bfloat16, with the share of
the GPU's peak FLOP/s (FLOPs counted by XLA's cost analysis of the compiled step).

With `--official PATH` (a checkout of ZhenglinZhou/STAR) and PyTorch importable, the official training
step runs side by side on the same batch in a child process, timed in turns with ours (blocks of
BLOCK consecutive steps, the first of each not counted; turns make a load change on a shared machine
hit both alike), as the official code ships (XLA flag and huge-page malloc of star_jax/cpu_tuning.py
are ours only): the official StackedHGNetV1 (its own
initialisation) in train mode, STARLoss_v2 on each stack's fusion heatmaps and AWingLoss on its point
and edge maps (classes loaded from PATH/lib/loss), weighted as the official config, `zero_grad`,
`backward`, Adam, then the EMA update of a second network. Timed with autograd anomaly detection off,
and as the official code ships it (anomaly detection on: `set_detect_anomaly(True)` in
`set_environment` and `detect_anomaly()` around `backward`).

Rows give images/s by wall time; the notes add seconds per step and each process's CPU seconds per
step (all threads), which is less sensitive to other jobs than wall time. Our step runs with
star_jax's CPU tuning (star_jax/cpu_tuning.py) as the trainer does; STAR_JAX_CPU_TUNING=0 times it
with XLA's and glibc's defaults.

  python scripts/benchmark.py train [--official /tmp/star_ref] [--repeats 3]

(run it with a Python that has both star_jax and PyTorch for `--official`, e.g. /work/torchvenv).
"""

from __future__ import annotations

import os
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

import benchmarks
from benchmarks import official
from star_jax import config_lib, cpu_tuning, layouts
from star_jax.data import targets
from star_jax.training import state as state_lib
from star_jax.training import step as step_lib

LAYOUT = layouts.WFLW
_REPO = pathlib.Path(__file__).resolve().parents[1]
IMAGE, MAPS, SIGMA = 256, 64, 1.5
BLOCK = 3   # consecutive steps per turn (the first is not counted), see interleaved()
# Dense peak FLOP/s per device kind (matrix units, no sparsity), for the share of peak on a GPU.
# float32 matmuls and convolutions run as TF32 on these GPUs under JAX's default precision.
PEAK_FLOPS = {
    'H100': {'float32': 494.7e12, 'bfloat16': 989.4e12},   # SXM
    'H200': {'float32': 494.7e12, 'bfloat16': 989.4e12},
    'A100': {'float32': 156e12, 'bfloat16': 312e12},
}


def wflw_config(dtype: str):
  """configs/wflw.py (the official recipe) with the compute dtype set."""
  config = config_lib.load_config('configs/wflw.py')
  config.model.dtype = dtype
  return config


def synthetic_batch(batch: int, seed: int = 0) -> dict:
  """A WFLW training batch (numpy, channels-last) with targets made as the input pipeline makes them.

  'image' uint8 (B, 256, 256, 3); 'landmarks' (B, 98, 2) in [-1, 1]; 'pointmaps' (B, 64, 64, 98) and
  'edgemaps' (B, 64, 64, 9) from star_jax.data.targets, for face-like random points (an ellipse of
  jittered points around the crop centre).
  """
  rng = np.random.default_rng(seed)
  n = LAYOUT.num_points
  images = rng.integers(0, 256, (batch, IMAGE, IMAGE, 3), dtype=np.uint8)
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  points, pmaps, emaps = [], [], []
  for _ in range(batch):
    radius = np.array([70.0, 90.0]) * (0.5 + 0.5 * rng.random((n, 1)))
    p = 127.5 + radius * np.stack([np.cos(t), np.sin(t)], -1) + rng.normal(0, 3, (n, 2))
    points.append(targets.normalize_landmarks(p, IMAGE))
    pmaps.append(targets.point_maps(p, IMAGE, MAPS, SIGMA))
    emaps.append(targets.edge_maps(p, LAYOUT.edges, IMAGE, MAPS))
  return {'image': images, 'landmarks': np.stack(points).astype(np.float32),
          'pointmaps': np.stack(pmaps).astype(np.float32), 'edgemaps': np.stack(emaps).astype(np.float32)}


def our_step(config, batch_np: dict):
  """Compiles our train step for `batch_np`. Returns (run_one_step, compile seconds, FLOPs per step).

  `run_one_step()` advances the (donated) state by one step and blocks until it is done.
  """
  tx = state_lib.make_optimizer(config, 1000)
  graphs, state = state_lib.create_train_state(config, tx, rng_seed=0)
  batch = jax.device_put(batch_np)
  step = jax.jit(step_lib.make_train_step(graphs, tx, config), donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float((cost or {}).get('flops', float('nan')))
  holder = {'state': state}

  def run_one_step():
    holder['state'], metrics = compiled(holder['state'], batch)
    jax.block_until_ready((holder['state'], metrics))
    return metrics

  return run_one_step, compile_s, flops


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


class OfficialWorker:
  """The official step in a child process (same Python), driven one step at a time.

  A separate process, not the same one: sharing a process with PyTorch slows our step down by
  half on this machine (XLA maps and faults in a fresh ~4.4 GB scratch buffer at every execution,
  and after PyTorch's step those page faults cost several times more), and the two frameworks'
  thread pools would share one heap. Each process reports its own wall and CPU time per step.
  """

  def __init__(self, path: str, batch: int):
    import subprocess  # pylint: disable=import-outside-toplevel
    import tempfile  # pylint: disable=import-outside-toplevel
    self._stderr = tempfile.TemporaryFile(mode='w+')
    env = cpu_tuning.untuned_environment()   # the official code runs as shipped
    env['PYTHONPATH'] = os.pathsep.join([str(_REPO)] + [p for p in [env.get('PYTHONPATH', '')] if p])
    self._proc = subprocess.Popen(
        [sys.executable, '-m', 'benchmarks.train', '--official-worker', path, str(batch)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True, env=env)
    self.note = self._reply('ready')

  def _reply(self, expected: str) -> str:
    line = self._proc.stdout.readline().strip()
    if not line.startswith(expected + ' '):
      self._stderr.seek(0)
      tail = (line + ' ' + self._stderr.read()[-2000:]).strip()
      self.close()
      raise RuntimeError(f'official worker failed: {tail}')
    return line[len(expected) + 1:]

  def step(self, anomaly: bool) -> tuple[float, float]:
    """Runs one official step; returns its (wall s, CPU s) as the worker measured them."""
    self._proc.stdin.write(f'step {int(anomaly)}\n')
    self._proc.stdin.flush()
    wall, cpu, _ = self._reply('done').split()
    return float(wall), float(cpu)

  def close(self):
    if self._proc.poll() is None:
      try:
        self._proc.stdin.write('quit\n')
        self._proc.stdin.flush()
        self._proc.wait(timeout=60)
      except (OSError, ValueError):
        self._proc.kill()
    self._stderr.close()


def _worker_main(path: str, batch: int):
  """The child side of OfficialWorker: 'ready NOTE', then 'done WALL CPU LOSS' per 'step A' line."""
  import warnings  # pylint: disable=import-outside-toplevel
  warnings.simplefilter('ignore')
  try:
    step, note = official.train_step(path, synthetic_batch(batch))
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
    print(f'done {time.perf_counter() - t0} {time.process_time() - c0} {loss}', flush=True)


def _peak(dtype: str) -> float:
  kind = jax.devices()[0].device_kind
  for key, peaks in PEAK_FLOPS.items():
    if key in kind:
      return peaks[dtype]
  return float('nan')


def run(args):
  backend = jax.default_backend()
  cpu = backend == 'cpu'
  repeats = benchmarks.repeats(args, full_network=True)
  settings = [(8, 'float32')] if cpu else [(32, 'float32'), (32, 'bfloat16')]
  official = getattr(args, 'official', '')
  rows = []
  for batch, dtype in settings:
    batch_np = synthetic_batch(batch)
    ours, compile_s, flops = our_step(wflw_config(dtype), batch_np)
    fns = {'ours': lambda ours=ours: _timed(ours)}
    worker = None
    if official and batch == 8:
      try:
        worker = OfficialWorker(official, batch)
      except RuntimeError as e:
        rows.append({'name': 'official PyTorch train step b8 float32', 'value': float('nan'),
                     'unit': 'images/s', 'notes': f'skipped: {e}'})
      else:
        fns['official'] = lambda: worker.step(False)
        fns['official_anomaly'] = lambda: worker.step(True)
    try:
      times = interleaved(fns, repeats)
    finally:
      if worker is not None:
        worker.close()
    wall, cpu_s = times['ours']
    where = (f'{backend}, median of {repeats} x {BLOCK - 1} steps' +
             (f', in blocks of {BLOCK} in turns with the official' if worker else ''))
    note = f'{wall:.2f} s/step wall, {cpu_s:.2f} s CPU; compile {compile_s:.0f} s; {flops / 1e9:.0f} GFLOP/step'
    if not cpu:
      note += f'; {flops / wall / _peak(dtype):.1%} of peak {dtype} FLOP/s'
    rows.append({'name': f'train step WFLW 256px b{batch} {dtype}', 'value': batch / wall,
                 'unit': 'images/s', 'notes': f'{note}; {where}'})
    if worker is not None:
      o_wall, o_cpu = times['official']
      a_wall, a_cpu = times['official_anomaly']
      rows.append({'name': f'official PyTorch train step b{batch} float32', 'value': batch / o_wall,
                   'unit': 'images/s',
                   'notes': f'{o_wall:.2f} s/step wall, {o_cpu:.2f} s CPU; anomaly detection off; {worker.note}, '
                            'own process'})
      rows.append({'name': f'official PyTorch train step b{batch}, as shipped', 'value': batch / a_wall,
                   'unit': 'images/s',
                   'notes': f'{a_wall:.2f} s/step wall, {a_cpu:.2f} s CPU; autograd anomaly detection on'})
      rows.append({'name': 'speed-up of our train step over official', 'value': o_wall / wall, 'unit': 'x',
                   'notes': f'wall time, anomaly detection off (CPU time: {o_cpu / cpu_s:.2f}x; '
                            f'as shipped: {a_wall / wall:.2f}x); target >= 1.5'})
  return rows


if __name__ == '__main__':
  if len(sys.argv) == 4 and sys.argv[1] == '--official-worker':
    _worker_main(sys.argv[2], int(sys.argv[3]))
  else:  # quick manual run: python -m benchmarks.train
    import types  # pylint: disable=import-outside-toplevel
    print(run(types.SimpleNamespace(repeats=1, official='')))
