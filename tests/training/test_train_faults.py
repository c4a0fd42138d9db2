"""Fault injection through the real train command: kill -9 mid-save, broken checkpoints, a full disk,
two runs on one workdir, a changed config.

The runs are the train command on the tiny synthetic dataset, checkpointing every epoch (8 steps):
its `main` called in this process, or `python -m star_jax.train` in a subprocess where the fault is
the process's (killed mid-save, a full disk, a second process). One uninterrupted 10-step run
(checkpoints 8 and 10) is made once per module; each test copies it and breaks something. Faults come
from tests/faults/sitecustomize.py, loaded into the subprocess through PYTHONPATH (production code has
no test hooks).
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, TINY_CONFIG, checkpoint_steps as _steps, command_env, metric_records, train_tiny

FAULTS = REPO / 'tests' / 'faults'


def _env(faults: dict | None = None) -> dict:
  env = command_env()
  if faults:
    env.update(faults)
    env['PYTHONPATH'] = os.pathsep.join(filter(None, [str(FAULTS), env.get('PYTHONPATH', '')]))
  return env


def _args(steps: int, *extra) -> list[str]:
  return ['--config.checkpoint_every_epochs=1', f'--config.total_steps={steps}', *extra]


def _cmd(workdir, tfds_dir, steps: int, *extra) -> list[str]:
  return [sys.executable, '-m', 'star_jax.train', TINY_CONFIG, f'--workdir={workdir}',
          f'--config.data.data_dir={tfds_dir}', '--config.progress=False', *_args(steps, *extra)]


def _train(workdir, tfds_dir, steps: int, *extra, status=0):
  """The train command in this process; `status` is the exit status it must end with."""
  proc = train_tiny(workdir, tfds_dir, *_args(steps, *extra))
  assert proc.returncode == status, proc.stderr[-4000:]
  return proc


def _train_process(workdir, tfds_dir, steps: int, *extra, faults=None, status=0) -> subprocess.CompletedProcess:
  """`python -m star_jax.train` in a subprocess, with the `faults` of tests/faults/sitecustomize.py."""
  proc = subprocess.run(_cmd(workdir, tfds_dir, steps, *extra), env=_env(faults), cwd=REPO, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == status, proc.stderr[-4000:]
  return proc


def _losses(workdir) -> dict[int, float]:
  """step -> train loss, the last record of each step (a resumed run logs its steps again)."""
  return metric_records(workdir, 'train/loss')


def _assert_same_losses(workdir, reference, steps):
  got, want = _losses(workdir), _losses(reference)
  for step in steps:
    np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f'step {step}')


@pytest.fixture(scope='module')
def tfds_dir(tiny_tfds_dir):
  return tiny_tfds_dir


@pytest.fixture(scope='module')
def reference(tfds_dir, tmp_path_factory):
  """An uninterrupted 10-step run: checkpoints 8 and 10, losses of steps 1-10."""
  workdir = tmp_path_factory.mktemp('reference') / 'run'
  _train(workdir, tfds_dir, 10)
  assert _steps(workdir) == [8, 10]
  return workdir


def _copy(reference, tmp_path, *, drop=()) -> pathlib.Path:
  workdir = tmp_path / 'run'
  shutil.copytree(reference, workdir)
  for step in drop:
    shutil.rmtree(workdir / 'checkpoints' / str(step))
  return workdir


def _no_traceback(stderr: str):
  """No traceback in the run's stderr (also none printed by Orbax's background reads of a checkpoint
  that failed to restore: checkpoints._run_sync_and_settle)."""
  assert 'Traceback' not in stderr and 'Exception ignored' not in stderr, stderr[-4000:]


def test_kill_9_during_a_save_then_resume_continues_from_the_last_complete_checkpoint(reference, tfds_dir, tmp_path):
  workdir = _copy(reference, tmp_path, drop=[10])             # the run stands at step 8
  marker = tmp_path / 'hanging'
  # The run hangs while writing step 10 (its temporary folder half written) and is killed there.
  proc = subprocess.Popen(
      _cmd(workdir, tfds_dir, 10), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=_env({'STAR_JAX_FAULT_HANG': f'{workdir}/checkpoints/10.orbax-checkpoint-tmp/config*/metadata',
                'STAR_JAX_FAULT_HANG_MARKER': str(marker)}))
  try:
    deadline = time.time() + 300
    while not marker.exists():
      assert proc.poll() is None, proc.communicate()[1][-4000:]
      assert time.time() < deadline, 'the run never reached the save of step 10'
      time.sleep(0.5)
    lock = json.loads((workdir / 'lock').read_text())
    assert lock['pid'] == proc.pid and lock['host'] and lock['started']
    # A second run on the running workdir stops at once, naming the first.
    second = _train(workdir, tfds_dir, 10, status=1)
    assert f'in use by process {proc.pid}' in second.stderr, second.stderr[-3000:]
    _no_traceback(second.stderr)
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
  assert (workdir / 'checkpoints' / '10.orbax-checkpoint-tmp').is_dir() and _steps(workdir) == [8]

  resumed = _train(workdir, tfds_dir, 10)
  err = resumed.stderr
  assert f'taking over the stale lock of process {proc.pid}' in err, err[-3000:]
  assert '10.orbax-checkpoint-tmp, left by a checkpoint save that never finished' in err
  assert 'resumed from step 8' in err
  assert _steps(workdir) == [8, 10] and not (workdir / 'lock').exists()
  assert not any('orbax-checkpoint-tmp' in p.name for p in (workdir / 'checkpoints').iterdir())
  _assert_same_losses(workdir, reference, [9, 10])


def _truncate_arrays(step_dir: pathlib.Path):
  """Cuts the largest array file of each array item of a step to 100 bytes (a torn copy)."""
  for item in ('model', 'ema', 'opt_state'):
    files = sorted((step_dir / item).rglob('ocdbt.process_*/d/*'), key=lambda p: p.stat().st_size)
    with open(files[-1], 'r+b') as f:
      f.truncate(100)


def test_truncated_latest_checkpoint_and_empty_step_folder_fall_back_and_finish(reference, tfds_dir, tmp_path):
  workdir = _copy(reference, tmp_path)
  _truncate_arrays(workdir / 'checkpoints' / '10')
  (workdir / 'checkpoints' / '12').mkdir()                   # newest, and empty
  proc = _train(workdir, tfds_dir, 10)
  err = proc.stderr
  for step in (12, 10):
    assert f'checkpoint step {step} in {workdir / "checkpoints"} does not restore' in err, err[-4000:]
  assert "Item \"config\" was not found" in err and 'OUT_OF_RANGE' in err    # each one's reason
  assert 'resumed from step 8' in err
  moved = sorted(p.name.split('-')[0] for p in (workdir / 'checkpoints_corrupt').iterdir())
  assert moved == ['10', '12']                              # kept, not deleted
  assert _steps(workdir) == [8, 10]                         # 10 trained again
  _assert_same_losses(workdir, reference, [9, 10])


def test_no_checkpoint_that_restores_is_an_error_naming_each_and_moving_nothing(reference, tfds_dir, tmp_path):
  workdir = _copy(reference, tmp_path)
  for step in (8, 10):
    _truncate_arrays(workdir / 'checkpoints' / str(step))
  # In a subprocess: its whole stderr, to its exit, holds no noise of the failed restores' background reads.
  proc = _train_process(workdir, tfds_dir, 12, status=1)
  err = proc.stderr
  assert f'error: no checkpoint in {workdir / "checkpoints"} restores; nothing was moved or deleted' in err, err[-3000:]
  assert '  step 10: ValueError: OUT_OF_RANGE' in err and '  step 8: ValueError: OUT_OF_RANGE' in err
  _no_traceback(err)
  assert _steps(workdir) == [8, 10] and not (workdir / 'checkpoints_corrupt').exists()


def test_enospc_in_the_checkpoint_writer_stops_and_keeps_the_last_checkpoint(reference, tfds_dir, tmp_path):
  from star_jax import checkpoints
  workdir = _copy(reference, tmp_path)
  full = {'STAR_JAX_FAULT_ENOSPC_OPEN': f'{workdir}/checkpoints/12.orbax-checkpoint-tmp/model*/_METADATA'}
  proc = _train_process(workdir, tfds_dir, 12, faults=full, status=1)
  err = proc.stderr
  assert 'error: cannot save checkpoint step 12' in err and 'No space left on device' in err, err[-4000:]
  assert f'Kept: checkpoint step 10 in {workdir / "checkpoints"}' in err
  _no_traceback(err)
  assert sorted(p.name for p in (workdir / 'checkpoints').iterdir()) == ['10', '8']   # no partial step left
  assert not (workdir / 'lock').exists()
  assert checkpoints.load_model(workdir).step == 10       # what was finished still loads
  assert max(_losses(workdir)) == 12                        # and the metrics of steps 11-12 are there


def test_enospc_in_the_metrics_writer_stops_and_leaves_whole_lines(reference, tfds_dir, tmp_path):
  workdir = _copy(reference, tmp_path)
  lines_before = (workdir / 'metrics.jsonl').read_text().splitlines()
  # The second line of this run (step 12) hits a full disk half way through.
  full = {'STAR_JAX_FAULT_ENOSPC_WRITE': f'{workdir}/metrics.jsonl@1'}
  proc = _train_process(workdir, tfds_dir, 12, faults=full, status=1)
  err = proc.stderr
  assert f'error: cannot write {workdir / "metrics.jsonl"} (No space left on device); the run stopped at step 12' \
      in err, err[-4000:]
  assert 'Kept: checkpoint step 10' in err and 'whole lines up to step 11' in err
  _no_traceback(err)
  text = (workdir / 'metrics.jsonl').read_text()
  assert text.endswith('\n')
  records = [json.loads(line) for line in text.splitlines()]   # every line whole
  assert len(records) == len(lines_before) + 1 and records[-1]['step'] == 11
  assert _steps(workdir) == [8, 10] and not (workdir / 'lock').exists()


def test_changed_lr_is_refused_and_accepted_with_allow_config_change(reference, tfds_dir, tmp_path):
  workdir = _copy(reference, tmp_path)
  config_before = (workdir / 'config.json').read_text()
  refused = _train(workdir, tfds_dir, 10, '--config.lr=0.01', status=1)
  assert 'error: the config differs from the one checkpoint step 10 was trained with' in refused.stderr
  assert 'lr: 0.001 -> 0.01' in refused.stderr and '--allow_config_change' in refused.stderr
  _no_traceback(refused.stderr)
  assert (workdir / 'config.json').read_text() == config_before and not (workdir / 'config_changes.jsonl').exists()

  # Free fields change without a word (here: keep_checkpoints, log_every_steps).
  accepted = _train(workdir, tfds_dir, 10, '--config.lr=0.01', '--allow_config_change', '--config.keep_checkpoints=5',
                    '--config.log_every_steps=3')
  assert 'resuming step 10 under a changed config (--allow_config_change): lr: 0.001 -> 0.01' in accepted.stderr
  change = json.loads((workdir / 'config_changes.jsonl').read_text())
  assert change['resumed_from_step'] == 10 and change['changes'] == {'lr': {'old': 0.001, 'new': 0.01}}
  assert json.loads((workdir / 'config.json').read_text())['lr'] == 0.01


def test_a_changed_model_is_refused_naming_the_config_fields(reference, tfds_dir, tmp_path):
  workdir = _copy(reference, tmp_path)
  proc = _train_process(workdir, tfds_dir, 12, '--config.model.channels=16', '--allow_config_change', status=1)
  err = proc.stderr
  assert f'error: {workdir / "checkpoints"} step 10 holds a different model than this config builds' in err, err[-3000:]
  assert 'model.channels: 32 -> 16' in err and 'stored (' in err
  _no_traceback(err)
  assert _steps(workdir) == [8, 10] and not (workdir / 'checkpoints_corrupt').exists()   # nothing moved


def test_a_second_train_on_a_held_workdir_is_refused_and_a_stale_lock_is_taken_over(reference, tfds_dir, tmp_path):
  from star_jax import files  # pylint: disable=import-outside-toplevel

  workdir = _copy(reference, tmp_path)
  before = _steps(workdir)
  with files.Lock.acquire(workdir):   # this process stands for a run in progress
    refused = _train_process(workdir, tfds_dir, 12, status=1)
  assert f'in use by process {os.getpid()} on host' in refused.stderr
  _no_traceback(refused.stderr)
  assert _steps(workdir) == before and not (workdir / 'lock').exists()

  # A lock left by a process that died (kill -9): the next run takes it over, says so, and finishes.
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  (workdir / 'lock').write_text(json.dumps({'pid': int(dead.stdout), 'host': __import__('socket').gethostname(),
                                            'started': 'earlier'}))
  taken = _train(workdir, tfds_dir, 12)
  assert f'process {int(dead.stdout)}' in taken.stderr and 'stale' in taken.stderr.lower(), taken.stderr[-3000:]
  assert _steps(workdir)[-1] == 12 and not (workdir / 'lock').exists()
