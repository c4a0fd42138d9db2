"""End to end through the real train command on a tiny config: train, checkpoint, stop, resume.

Every run here is `python -m star_jax.train` in a subprocess (as a user runs it), on the tiny
synthetic dataset built once per session into a temporary TFDS folder.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import COMPILE_CACHE_ENV, REPO

TINY = [f'--config={REPO / "configs" / "synthetic.py"}:tiny']


@pytest.fixture(scope='module')
def tfds_dir(tiny_tfds_dir):
  return tiny_tfds_dir


def _env(devices: int = 1, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', **extra)
  # Runs of one shape share compiled programs (the train step takes most of a tiny run to compile).
  env.update(COMPILE_CACHE_ENV)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return env


def _cmd(workdir, tfds_dir, *extra):
  return [sys.executable, '-m', 'star_jax.train', *TINY, f'--workdir={workdir}',
          f'--config.data.data_dir={tfds_dir}', '--config.progress=False', *extra]


def _train(workdir, tfds_dir, *extra, devices=1, env=None):
  proc = subprocess.run(_cmd(workdir, tfds_dir, *extra), env=_env(devices, **(env or {})), cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _losses(workdir) -> dict[int, float]:
  """step -> train loss, the last record of each step (a resumed run logs its steps again)."""
  out = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    if 'train/loss' in record:
      out[record['step']] = record['train/loss']
  return out


def _steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').iterdir() if p.name.isdigit())


def test_train_stop_resume_gives_the_uninterrupted_losses(tfds_dir, tmp_path):
  # Uninterrupted: 8 steps.
  full = tmp_path / 'full'
  _train(full, tfds_dir, '--config.total_steps=8')
  full_losses = _losses(full)
  assert sorted(full_losses) == list(range(1, 9))
  assert all(np.isfinite(v) for v in full_losses.values())
  assert (full / 'config.json').exists() and list((full / 'tb').iterdir())
  metrics = json.loads((full / 'final_metrics.json').read_text())
  for key in ('model/nme', 'ema/nme', 'nme'):
    assert 0 < metrics[key] < 2, metrics  # NME of an untrained net: finite and of order 1

  # Interrupted after 5 steps (the run ends and saves), then resumed to 8.
  part = tmp_path / 'part'
  _train(part, tfds_dir, '--config.total_steps=5')
  assert 5 in _steps(part)
  _train(part, tfds_dir, '--config.total_steps=8')
  part_losses = _losses(part)
  for step in range(1, 9):
    # Same data order, same augmentation, same state: the same numbers.
    np.testing.assert_allclose(part_losses[step], full_losses[step], rtol=1e-5, err_msg=f'step {step}')


def test_sigterm_saves_and_resumes(tfds_dir, tmp_path):
  workdir = tmp_path / 'run'
  proc = subprocess.Popen(_cmd(workdir, tfds_dir, '--config.total_steps=400', '--config.checkpoint_every_epochs=100'),
                          env=_env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics_file = workdir / 'metrics.jsonl'
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics_file.exists() and len(metrics_file.read_text().splitlines()) >= 3):
    assert proc.poll() is None, proc.communicate()[1][-4000:]
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-4000:]
  steps = _steps(workdir)
  assert steps and steps[-1] < 400, steps
  assert 'SIGTERM' in err
  # Resume: continues from the saved step, does not start over.
  _train(workdir, tfds_dir, f'--config.total_steps={steps[-1] + 2}')
  assert _steps(workdir)[-1] == steps[-1] + 2


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tfds_dir, tmp_path):
  workdir = tmp_path / 'run'
  _train(workdir, tfds_dir, '--config.total_steps=4')
  # A changed learning rate on resume must be asked for (--allow_config_change).
  proc = subprocess.run(_cmd(workdir, tfds_dir, '--config.total_steps=8', '--config.lr=1e30', '--allow_config_change'),
                        env=_env(), cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode != 0
  assert 'loss became' in proc.stderr and 'last good checkpoint (step 4)' in proc.stderr, proc.stderr[-3000:]
  assert _steps(workdir)[-1] == 4


def _records(workdir, key) -> dict[int, float]:
  return {r['step']: r[key] for r in map(json.loads, (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines())
          if key in r}


def _assert_same_training(a, b):
  """Two runs of the same steps on differently sharded devices agree.

  With lr 0 the weights stay at their initial values, so every step compares the same function:
  the loss, the global-batch gradient's norm and the BatchNorm running statistics (which must be
  reduced over the global batch, not per device) agree up to the order of float32 reductions.
  Measured: 1.5e-3 relative on the gradient of the tiny net, which is badly conditioned at
  initialisation (BatchNorm over 4 values at the 1x1 bottom of the hourglass, instance norm of
  nearly flat maps amplify round-off); a per-device BatchNorm or gradient would be off by far more.
  CoordConv is off here: its boundary channels threshold the previous heatmap at 0.05, a jump that
  round-off can flip, so with it on the two runs are different functions of the weights.
  (With a real learning rate Adam turns round-off in near-zero gradients into +-lr steps, so
  trajectories drift apart slowly without either being wrong.)
  """
  for key in ('train/loss', 'train/grad_norm'):
    ra, rb = _records(a, key), _records(b, key)
    assert sorted(ra) == sorted(rb) == [1, 2, 3]
    rtol = 1e-4 if key == 'train/loss' else 1e-2
    np.testing.assert_allclose([rb[s] for s in (1, 2, 3)], [ra[s] for s in (1, 2, 3)], rtol=rtol, err_msg=key)
  from flax import nnx
  from star_jax import checkpoints
  ma = checkpoints.load_model(pathlib.Path(a) / 'checkpoints', weights='model').model
  mb = checkpoints.load_model(pathlib.Path(b) / 'checkpoints', weights='model').model
  stats_b = dict(nnx.to_flat_state(nnx.state(mb, nnx.BatchStat)))
  for path, value in nnx.to_flat_state(nnx.state(ma, nnx.BatchStat)):
    np.testing.assert_allclose(np.asarray(stats_b[path][...]), np.asarray(value[...]), rtol=1e-3, atol=1e-5,
                               err_msg='/'.join(map(str, path)))


def test_one_device_and_four_devices_agree(tfds_dir, tmp_path):
  one, four = tmp_path / 'one', tmp_path / 'four'
  _train(one, tfds_dir, '--config.total_steps=3', '--config.lr=0', '--config.model.add_coord=False', devices=1)
  _train(four, tfds_dir, '--config.total_steps=3', '--config.lr=0', '--config.model.add_coord=False', devices=4)
  _assert_same_training(one, four)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one_process(tfds_dir, tmp_path):
  # XLA's default CPU kernels (STAR_JAX_CPU_TUNING=0) on both sides. With star_jax's flags the
  # convolutions are Eigen's, whose summation order depends on the threads per process (1 x 4 devices
  # vs 2 x 2 devices): measured, the loss still agrees to 1e-4 but this badly conditioned tiny net
  # amplifies that round-off to 5% in one step's gradient norm. This test is about the collectives
  # and the global-batch BatchNorm, not the kernels (test_one_device_and_four_devices_agree runs tuned).
  untuned = {'STAR_JAX_CPU_TUNING': '0'}
  single, multi = tmp_path / 'single', tmp_path / 'multi'
  _train(single, tfds_dir, '--config.total_steps=3', '--config.lr=0', '--config.model.add_coord=False', devices=4,
         env=untuned)
  port = _free_port()
  procs = [
      subprocess.Popen(
          _cmd(multi, tfds_dir, '--config.total_steps=3', '--config.lr=0', '--config.model.add_coord=False', f'--coordinator=127.0.0.1:{port}', '--num_processes=2',
               f'--process_id={i}', '--cpu_collectives=gloo'),
          env=_env(2, **untuned), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)
  ]
  errs = [p.communicate(timeout=600)[1] for p in procs]
  for p, err in zip(procs, errs):
    assert p.returncode == 0, err[-4000:]
  _assert_same_training(single, multi)
