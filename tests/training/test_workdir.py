"""The workdir's safety rules: the lock, whole-file and whole-line writes (star_jax/files.py), config
comparison (star_jax/training/workdir.py); and the writers built on them. In-process and fast; the
real train command under the same faults is tests/training/test_train_faults.py."""

import errno
import json
import os
import socket
import struct
import subprocess
import sys

import pytest

from star_jax import files
from star_jax.training import workdir
from star_jax.training import writers


# ---- The lock ---------------------------------------------------------------------------------------

def test_lock_names_its_holder_refuses_a_second_and_leaves_nothing_behind(tmp_path):
  with files.Lock.acquire(tmp_path) as lock:
    info = json.loads((tmp_path / 'lock').read_text())
    assert info['pid'] == os.getpid() and info['host'] == socket.gethostname() and info['started']
    assert lock.info == info
    # Another open of the lock file is another holder as far as the kernel lock goes.
    with pytest.raises(files.BusyError, match=rf'in use by process {os.getpid()} on host'):
      files.Lock.acquire(tmp_path)
  assert not (tmp_path / 'lock').exists()
  files.Lock.acquire(tmp_path).release()                     # free again


def _dead_pid() -> int:
  proc = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
  return int(proc.stdout)


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
  pid = _dead_pid()
  (tmp_path / 'lock').write_text(json.dumps({'pid': pid, 'host': socket.gethostname(), 'started': 'then'}))
  with caplog.at_level('WARNING'):
    lock = files.Lock.acquire(tmp_path)
  assert f'taking over the stale lock of process {pid}' in caplog.text
  assert json.loads((tmp_path / 'lock').read_text())['pid'] == os.getpid()
  lock.release()


def test_lock_of_a_live_process_without_kernel_lock_is_refused(tmp_path, monkeypatch):
  # A filesystem without flock: the process id decides. This process is alive.
  monkeypatch.setattr(files.Lock, '_flock', staticmethod(lambda fd, path, what: False))
  (tmp_path / 'lock').write_text(json.dumps({'pid': os.getppid(), 'host': socket.gethostname()}))
  with pytest.raises(files.BusyError, match=f'in use by process {os.getppid()}'):
    files.Lock.acquire(tmp_path)
  (tmp_path / 'lock').write_text(json.dumps({'pid': _dead_pid(), 'host': socket.gethostname()}))
  files.Lock.acquire(tmp_path).release()


def test_lock_from_another_host_is_refused_with_what_to_do(tmp_path):
  (tmp_path / 'lock').write_text(json.dumps({'pid': 1, 'host': 'elsewhere', 'started': 'then'}))
  with pytest.raises(files.BusyError, match=r'another host.*delete .*lock'):
    files.Lock.acquire(tmp_path)


# ---- Whole files, whole lines -----------------------------------------------------------------------

def _fail_writes(monkeypatch):
  """os.write fails with ENOSPC after writing half of its bytes, as a filling disk does."""
  real_write = os.write

  def write(fd, data):
    real_write(fd, bytes(data)[:len(data) // 2])
    raise OSError(errno.ENOSPC, 'No space left on device')
  monkeypatch.setattr(os, 'write', write)


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path, monkeypatch):
  path = tmp_path / 'config.json'
  files.atomic_write_text(path, 'old')
  assert path.read_text() == 'old'
  monkeypatch.setattr(os, 'fsync', lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, 'No space left')))
  with pytest.raises(OSError, match='No space left'):
    files.atomic_write_text(path, 'new and longer')
  assert path.read_text() == 'old' and os.listdir(tmp_path) == ['config.json']   # no temporary left
  monkeypatch.undo()
  files.atomic_write_text(path, 'new')
  assert path.read_text() == 'new'


def test_append_file_cuts_back_a_failed_write_and_a_torn_last_line(tmp_path, monkeypatch, caplog):
  path = tmp_path / 'metrics.jsonl'
  f = files.AppendFile(path)
  f.append_line('{"step": 1}')
  _fail_writes(monkeypatch)
  with pytest.raises(OSError, match='No space'):
    f.append_line('{"step": 2, "a long line": "x"}')
  monkeypatch.undo()
  assert path.read_text() == '{"step": 1}\n'                # the half line was cut back off
  f.append_line('{"step": 3}')
  f.close()
  # A torn line left by a process killed mid-write (no chance to cut it) goes when the file is reopened.
  with open(path, 'a') as raw:
    raw.write('{"step": 4, "tor')
  with caplog.at_level('WARNING'):
    files.AppendFile(path).close()
  assert 'torn last line' in caplog.text
  assert path.read_text() == '{"step": 1}\n{"step": 3}\n'


def test_metric_writer_writes_whole_lines_and_readable_tensorboard_records(tmp_path):
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  writer = writers.MetricWriter(tmp_path)
  writer.write_scalars(1, {'train/loss': 2.5, 'train/grad_norm': 3.0})
  writer.write_scalars(2, {'eval/nme': 0.25})
  writer.close()
  lines = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [(r['step'], r.get('train/loss'), r.get('eval/nme')) for r in lines] == [(1, 2.5, None), (2, None, 0.25)]
  assert writer.last_step == 2
  # TFRecord framing (length, masked CRCs) of Event protos, as TensorBoard reads them.
  (events_file,) = (tmp_path / 'tb').iterdir()
  data, pos, events = events_file.read_bytes(), 0, []
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack('Q', header)
    assert struct.unpack('I', data[pos + 8:pos + 12])[0] == masked_crc32c(header)
    record = data[pos + 12:pos + 12 + length]
    assert struct.unpack('I', data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(record)
    events.append(event_pb2.Event.FromString(record))
    pos += 16 + length
  assert events[0].file_version == 'brain.Event:2'
  assert [(e.step, {v.tag: v.simple_value for v in e.summary.value}) for e in events[1:]] == [
      (1, {'train/loss': 2.5, 'train/grad_norm': 3.0}), (2, {'eval/nme': 0.25})]


# ---- Config changes ---------------------------------------------------------------------------------

def test_config_changes_ignore_free_fields_and_name_the_others():
  old = {'lr': 0.001, 'milestones': [200, 350], 'progress': True, 'total_steps': 5,
         'data': {'name': 'wflw', 'data_dir': '/a', 'num_workers': 0}, 'model': {'channels': 64}}
  new = {'lr': 0.001, 'milestones': (200, 350), 'progress': False, 'total_steps': 50,
         'data': {'name': 'wflw', 'data_dir': '/b', 'num_workers': 4, 'skip_bad_examples': True},
         'model': {'channels': 64}}
  assert workdir.config_changes(old, new) == {}            # tuples vs JSON lists; free fields
  new.update(lr=0.01, batch_size=8)
  new['model']['channels'] = 32
  changes = workdir.config_changes(old, new)
  assert changes == {'batch_size': ('<absent>', 8), 'lr': (0.001, 0.01), 'model.channels': (64, 32)}
  assert workdir.format_changes(changes) == "batch_size: '<absent>' -> 8; lr: 0.001 -> 0.01; model.channels: 64 -> 32"


def test_every_free_key_is_a_config_field():
  from conftest import load_config
  fields = workdir.flatten(load_config('synthetic', 'tiny').to_dict())
  assert set(workdir.FREE_KEYS) <= set(fields)


def test_fields_added_later_at_their_neutral_value_are_not_changes():
  old = {'lr': 0.001, 'data': {'name': 'synthetic_faces'}}     # a workdir written before the fields existed
  new = {'lr': 0.001, 'init_from': '', 'init_from_strict': True,
         'data': {'name': 'synthetic_faces', 'relabel_model': 'independent', 'annotators': 5, 'annotator_bias': 0.75}}
  assert workdir.config_changes(old, new) == {}
  new['data']['relabel_model'] = 'annotators'
  new['init_from'] = 'weights.pkl'
  assert workdir.config_changes(old, new) == {'data.relabel_model': ('<absent>', 'annotators'),
                                              'init_from': ('<absent>', 'weights.pkl')}
  from conftest import load_config
  fields = workdir.flatten(load_config('synthetic', 'tiny').to_dict())
  assert all(fields[k] == v for k, v in workdir.ADDED_FIELDS.items())   # the defaults are the neutral values
