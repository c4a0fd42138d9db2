"""What float32 training reaches: ours against the official trainer over 200 steps, and the official
trainer against itself.

A tiny network (64 px input, 16 x 16 maps, 4 stacks of depth 4, 32 channels, CoordConv, AAM, 98 points;
the official code sizes its hourglass CoordConv channels as input / nstack, so it needs 4 stacks at this
input) trains for STEPS steps of batch 16 from one set of initial weights (the official
initialisation, torch.manual_seed(0), converted to ours) on the same batches: synthetic faces
(star_jax.data.synthetic, seed 0: TRAIN_FACES training faces, TEST_FACES test faces with exact labels),
each cut out by the evaluation crop (no augmentation, so that both see the very same pixels) with its
targets made once by star_jax.data.targets (landmarks in [-1, 1], point maps, edge maps) and fed to
both trainers; epochs visit the faces in an order drawn from a seed. Both run in float32 with the
official settings: Adam lr 1e-3 (no decay within 200 steps), EMA decay 0.5 ** (16 / 10000), STAR loss
(smooth-L1, w 1) and AWing, weights 2^i / 2^(S-1) x (1, 10, 10).

Runs (the official trainer: benchmarks.official.Trainer, the official pieces in a child process with
PyTorch, as shipped; ours: training.step.make_train_step, jit-compiled, star_jax's CPU tuning):
  official          data order 0, 1 torch thread
  official_threads  the same with 2 threads: the official trainer's run-to-run difference from
                    summation order alone
  official_order    data order 1 (1 thread): its difference from the order of the batches
  ours              data order 0 (the defaults)
  ours_official     data order 0, with the options that reproduce the official behaviour
                    (loss.star_isotropic 'official')
Rows: per run the mean training loss over the last 20 steps and the test NME (inter-ocular, the
network after the last step in eval mode, last stack's soft-argmax landmarks); per comparison with
`official` the relative difference of that final loss, the mean relative difference of the loss
curves (20-step running means) and the NME difference in points. Each run's loss curve is in its row
('curve'). scripts/fidelity_plot.py draws them. `--small` runs SMALL_STEPS steps on SMALL_TRAIN_FACES
faces (a smoke test of the same code; its figures say nothing).

  python scripts/benchmark.py fidelity --official /path/to/STAR --official_python /path/to/python-with-torch
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

from star_jax import layouts

STEPS = 200
BATCH = 16
IMAGE, MAPS, NSTACK, CHANNELS = 64, 16, 4, 32
TRAIN_FACES, TEST_FACES = 800, 200
# --small (smoke tests): a few steps on a few faces, the same code path.
SMALL_STEPS, SMALL_TRAIN_FACES, SMALL_TEST_FACES = 2 * 20, 64, 16
SMOOTH = 20           # running mean of the loss curves, and the final loss's window
LAYOUT = layouts.WFLW
REPO = pathlib.Path(__file__).resolve().parents[1]


# ---- The data: one set of batches for every run --------------------------------------------------------

def _faces(split: str, count: int) -> dict[str, np.ndarray]:
  """Synthetic faces cut out by the evaluation crop: uint8 RGB (count, 64, 64, 3), landmarks in crop px
  and the targets (landmarks in [-1, 1], point maps (count, 16, 16, 98), edge maps (count, 16, 16, 9))."""
  from star_jax.data import synthetic, targets, transforms  # pylint: disable=import-outside-toplevel
  images, points = [], []
  for i in range(count):
    sample = synthetic.generate(0, split, i, layout='WFLW', image_size=256)
    crop = transforms.center_crop(sample.image, sample.landmarks, sample.scale, sample.center, IMAGE)
    images.append(crop.image)
    points.append(crop.landmarks)
  points = np.stack(points).astype(np.float32)
  return {
      'image': np.stack(images),
      'landmarks_px': points,
      'landmarks': np.stack([targets.normalize_landmarks(p, IMAGE) for p in points]),
      'pointmaps': np.stack([targets.point_maps(p, IMAGE, MAPS, 1.5) for p in points]).astype(np.float32),
      'edgemaps': np.stack([targets.edge_maps(p, LAYOUT.edges, IMAGE, MAPS) for p in points]).astype(np.float32),
  }


def batch_order(order_seed: int, steps: int = STEPS, faces: int = TRAIN_FACES) -> np.ndarray:
  """(steps, BATCH) indices of the training faces: epochs in a permutation drawn from `order_seed`."""
  rng = np.random.default_rng(order_seed)
  epochs = -(-steps * BATCH // faces)
  return np.concatenate([rng.permutation(faces) for _ in range(epochs)])[:steps * BATCH].reshape(steps, BATCH)


# ---- The official side (child process, PyTorch) -------------------------------------------------------

def official_worker(official_path: str, data_file: str, out_file: str, threads: int, order_seed: int,
                    init_file: str) -> None:
  """Runs the official trainer (float32) over the batches `order/<order_seed>` of the data; writes its per-step losses and
  test landmarks to `out_file`. With no `init_file` yet on disk, first draws the initial weights (the
  official initialisation, torch.manual_seed(0)) and writes them there."""
  import torch  # pylint: disable=import-outside-toplevel
  import warnings  # pylint: disable=import-outside-toplevel

  from benchmarks import official  # pylint: disable=import-outside-toplevel
  warnings.filterwarnings('ignore', message='torch.meshgrid')
  torch.set_num_threads(threads)
  if not os.path.exists(init_file):
    torch.manual_seed(0)
    net = official.network(official_path, LAYOUT, image_size=IMAGE, nstack=NSTACK, channels=CHANNELS)
    np.savez(init_file, **{k: v.numpy() for k, v in net.state_dict().items()})
  with np.load(init_file) as f:
    init = {k: torch.from_numpy(f[k]) for k in f.files}
  with np.load(data_file) as f:
    data = {k: f[k] for k in f.files}
  trainer = official.Trainer(official_path, init, image_size=IMAGE, nstack=NSTACK, nlevels=4, channels=CHANNELS,
                             batch_size=BATCH, dtype=torch.float32)
  def inputs(images_rgb):
    # The official data pipeline's arithmetic, in float32: BGR, (pixel - 127.5) * float32(1 / 127.5).
    bgr = images_rgb[..., ::-1].transpose(0, 3, 1, 2).astype(np.float32)
    return torch.from_numpy(np.ascontiguousarray((bgr - 127.5) * (1 / 127.5)))

  losses, start = [], time.perf_counter()
  for idx in data[f'order/{order_seed}']:
    labels = trainer.labels(data['train/landmarks'][idx], data['train/pointmaps'][idx].transpose(0, 3, 1, 2),
                            data['train/edgemaps'][idx].transpose(0, 3, 1, 2))
    _, total = trainer.step(inputs(data['train/image'][idx]), labels)
    losses.append(total)
  seconds = time.perf_counter() - start
  trainer.net.eval()
  with torch.no_grad():
    _, _, landmarks = trainer.net(inputs(data['test/image']))
  np.savez(out_file, losses=np.asarray(losses), test_landmarks=landmarks.numpy(), seconds=seconds)


def _run_official(args, folder: pathlib.Path, name: str, threads: int, order_seed: int) -> dict:
  from star_jax import cpu_tuning  # pylint: disable=import-outside-toplevel
  env = cpu_tuning.untuned_environment()
  env['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in [env.get('PYTHONPATH', '')] if p])
  out = folder / f'{name}.npz'
  code = (f'from benchmarks import fidelity; fidelity.official_worker({str(args.official)!r}, '
          f'{str(folder / "data.npz")!r}, {str(out)!r}, {threads}, {order_seed}, {str(folder / "init.npz")!r})')
  proc = subprocess.run([args.official_python or sys.executable, '-c', code], env=env, capture_output=True,
                        text=True, check=False)
  if proc.returncode != 0:
    raise RuntimeError(f'official run {name} failed: {proc.stderr[-3000:]}')
  with np.load(out) as f:
    return {k: f[k] for k in f.files}


# ---- Our side ----------------------------------------------------------------------------------------

def _config(isotropic: str):
  from star_jax import config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.load_config(str(REPO / 'configs' / 'synthetic.py'))
  c.data.image_size, c.data.heatmap_size = IMAGE, MAPS
  c.model.nstack, c.model.nlevels, c.model.channels, c.model.dtype = NSTACK, 4, CHANNELS, 'float32'
  c.batch_size = BATCH
  c.milestones = ()                 # no decay within 200 steps (the official decays per epoch, at 200)
  c.ema_decay = -1.0                # the official 0.5 ** (batch / 10000)
  c.loss.star_isotropic = isotropic
  return c


def _run_ours(data: dict, init: dict, order_seed: int, isotropic: str, train_faces: int) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from star_jax import convert_pytorch, models  # pylint: disable=import-outside-toplevel
  from star_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  from star_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel
  config = _config(isotropic)
  tx = state_lib.make_optimizer(config, train_faces // BATCH)
  graphs, state = state_lib.create_train_state(config, tx, rng_seed=0)
  model = nnx.merge(graphs.train, state.params, state.batch_stats)
  convert_pytorch.load_into_model(init, model)
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  state = state.replace(params=params, batch_stats=batch_stats, opt_state=tx.init(params),
                        ema_params=jax.tree.map(lambda a: a.copy(), params),
                        ema_batch_stats=jax.tree.map(lambda a: a.copy(), batch_stats))
  train_step = jax.jit(step_lib.make_train_step(graphs, tx, config), donate_argnums=(0,))
  losses, start = [], None
  for i, idx in enumerate(data[f'order/{order_seed}']):
    batch = {k: data[f'train/{k}'][idx] for k in ('image', 'landmarks', 'pointmaps', 'edgemaps')}
    state, metrics = train_step(state, batch)
    losses.append(float(metrics['loss']))
    if i == 0:
      start = time.perf_counter()   # after the compilation
  seconds = (time.perf_counter() - start) * len(losses) / (len(losses) - 1)
  predict = jax.jit(models.make_predict_fn(graphs.eval))
  landmarks = np.asarray(predict(state.params, state.batch_stats, data['test/image'])['landmarks'])
  return {'losses': np.asarray(losses), 'test_landmarks': landmarks, 'seconds': seconds}


# ---- The section -----------------------------------------------------------------------------------

def _nme(landmarks: np.ndarray, data: dict) -> float:
  """Mean inter-ocular NME (%) of (T, 98, 2) landmarks in [-1, 1] against the exact test labels. Both are
  in the same normalised frame (the soft-argmax grid of the maps and the targets' [-1, 1]), so the
  ratio needs no conversion to pixels."""
  from star_jax import metrics  # pylint: disable=import-outside-toplevel
  return 100.0 * float(np.mean(metrics.nme_per_image(landmarks, data['test/landmarks'], LAYOUT, 'ocular')))


def _smooth(curve: np.ndarray) -> np.ndarray:
  return np.convolve(curve, np.ones(SMOOTH) / SMOOTH, mode='valid')


def run(args) -> list[dict]:
  if not args.official:
    return [{'name': 'skipped: the fidelity section needs --official PATH (and PyTorch)', 'value': float('nan'),
             'unit': '', 'notes': 'it compares our training with the official trainer'}]
  steps, train_faces, test_faces = ((SMALL_STEPS, SMALL_TRAIN_FACES, SMALL_TEST_FACES)
                                     if getattr(args, 'small', False) else (STEPS, TRAIN_FACES, TEST_FACES))
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    folder = pathlib.Path(tmp)
    data = {f'train/{k}': v for k, v in _faces('train', train_faces).items()}
    data.update({f'test/{k}': v for k, v in _faces('test', test_faces).items()})
    data.update({f'order/{seed}': batch_order(seed, steps, train_faces) for seed in (0, 1)})
    np.savez(folder / 'data.npz', **data)
    runs = {'official': _run_official(args, folder, 'official', 1, 0)}
    with np.load(folder / 'init.npz') as f:
      init = {k: f[k] for k in f.files}
    runs['official_threads'] = _run_official(args, folder, 'official_threads', 2, 0)
    runs['official_order'] = _run_official(args, folder, 'official_order', 1, 1)
    runs['ours'] = _run_ours(data, init, 0, 'pin', train_faces)
    runs['ours_official'] = _run_ours(data, init, 0, 'official', train_faces)
  what = {'official': 'official trainer (1 thread, order 0)', 'official_threads': 'official trainer, 2 threads',
          'official_order': 'official trainer, data order 1', 'ours': 'ours (defaults)',
          'ours_official': "ours, loss.star_isotropic='official'"}
  nme = {name: _nme(r['test_landmarks'], data) for name, r in runs.items()}
  final = {name: float(r['losses'][-SMOOTH:].mean()) for name, r in runs.items()}
  for name, r in runs.items():
    rows.append({'name': f'{name}: final loss (mean of the last {SMOOTH} steps)', 'value': final[name], 'unit': 'loss',
                 'notes': f'{what[name]}; {steps} steps in {float(r["seconds"]):.0f} s', 'curve': r['losses'].tolist()})
    rows.append({'name': f'{name}: test NME', 'value': nme[name], 'unit': '%',
                 'notes': f'{what[name]}; inter-ocular, {test_faces} synthetic test faces'})
  reference = _smooth(runs['official']['losses'])
  for name in ('official_threads', 'official_order', 'ours', 'ours_official'):
    curve = _smooth(runs[name]['losses'])
    rows.append({'name': f'{name} vs official: final loss', 'value': abs(final[name] / final['official'] - 1),
                 'unit': 'rel', 'notes': f'{final[name]:.4f} vs {final["official"]:.4f}'})
    rows.append({'name': f'{name} vs official: loss curve', 'value': float(np.mean(np.abs(curve / reference - 1))),
                 'unit': 'rel', 'notes': f'mean over steps of |a / b - 1| of the {SMOOTH}-step running means; '
                 f'largest {float(np.max(np.abs(curve / reference - 1))):.3g}'})
    rows.append({'name': f'{name} vs official: test NME', 'value': nme[name] - nme['official'], 'unit': 'points',
                 'notes': f'{nme[name]:.3f} vs {nme["official"]:.3f} %'})
  return rows
