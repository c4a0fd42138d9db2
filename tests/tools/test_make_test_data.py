"""scripts/make_test_data.py, the generator of the golden files in tests/testdata, without PyTorch: its
command line and errors, the real faces (made without PyTorch) end to end with --check, and --check's
comparison of arrays. Rebuilding the other goldens needs PyTorch and the official code (see the
script); CI has neither."""

import importlib.util
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import DATA, REPO

SCRIPT = REPO / 'scripts' / 'make_test_data.py'


@pytest.fixture(scope='module')
def script():
  spec = importlib.util.spec_from_file_location('make_test_data', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def no_torch(monkeypatch):
  """`import torch` fails, as in CI."""
  monkeypatch.setitem(sys.modules, 'torch', None)


def _run(script, *args) -> int:
  return script.main(['make_test_data.py', *map(str, args)])


def test_help_runs_and_every_golden_file_has_a_generator(script):
  proc = subprocess.run([sys.executable, str(SCRIPT), '--help'], capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert '--official' in proc.stdout and '--reference' in proc.stdout and '--check' in proc.stdout
  made = {file for golden in script.GOLDENS.values() for file in golden.files}
  committed = {str(p.relative_to(DATA)) for p in DATA.rglob('*') if p.is_file() and p.name != 'README.md'}
  assert made == committed
  for name in script.GOLDENS:
    assert f'[{name}]' in proc.stdout             # each is documented


def test_official_must_be_a_checkout(script, tmp_path, capsys):
  assert _run(script, '--official', tmp_path, '--reference', tmp_path) == 1
  assert 'is not a checkout of the official STAR code' in capsys.readouterr().err


def test_missing_pytorch_is_a_clear_error(script, tmp_path, capsys, no_torch):
  (tmp_path / 'lib' / 'loss').mkdir(parents=True)
  (tmp_path / 'lib' / 'loss' / 'starLoss_v2.py').write_text('')
  assert _run(script, '--official', tmp_path, '--reference', tmp_path, '--only', 'losses') == 1
  assert 'PyTorch is not installed' in capsys.readouterr().err


@pytest.mark.parametrize('args, message', [
    (['--official', '/nowhere'], '--reference is required'),
    (['--reference', '/nowhere'], '--official is required'),
    (['--only', 'real_faces'], '--faces or --reference is required'),
    (['--reference', '/nowhere', '--only', 'losses,bogus'], '--only: unknown bogus'),
])
def test_usage_errors(script, capsys, args, message):
  assert _run(script, *args) == 2
  assert message in capsys.readouterr().err


def _write_pts(path, points):
  body = ''.join(f'{x:.6f} {y:.6f}\n' for x, y in points)
  path.write_text(f'version: 1\nn_points:  {len(points)}\n{{\n{body}}}')   # no final newline, as some are


def test_real_faces_without_pytorch_then_check(script, tmp_path, capsys, no_torch):
  rng = np.random.default_rng(0)
  faces, out = tmp_path / 'faces', tmp_path / 'out'
  faces.mkdir()
  sizes = {'breakingbad': (83, 50, 3), 'einstein': (41, 33), 'takeo': (30, 45, 3)}   # (w, h[, channels])
  for name, ext, _, _ in script.FACES:
    w, h, *c = sizes[name]
    cv2.imwrite(str(faces / f'{name}{ext}'), rng.integers(0, 256, (h, w, *c), dtype=np.uint8))
    # 1-based pixel coordinates: 0.5 and size + 0.5 are the image's outer edges.
    _write_pts(faces / f'{name}.pts', [(0.5, 0.5), (w + 0.5, h + 0.5), (w / 3, h / 4)])
  assert _run(script, '--only', 'real_faces', '--faces', faces, '--output', out) == 0
  for name, _, factor, out_ext in script.FACES:
    w, h, *c = sizes[name]
    image = cv2.imread(str(out / 'real_faces' / f'{name}{out_ext}'), cv2.IMREAD_UNCHANGED)
    assert image.shape == (h // factor, w // factor, *c)
    lines = (out / 'real_faces' / f'{name}.pts').read_text().split('\n')
    assert lines[:3] == ['version: 1', 'n_points:  3', '{'] and lines[-2:] == ['}', '']
    points = np.array([[float(v) for v in line.split()] for line in lines[3:6]])
    np.testing.assert_allclose(points[:2], [[0.5, 0.5], [w // factor + 0.5, h // factor + 0.5]], atol=1e-6)

  capsys.readouterr()
  assert _run(script, '--only', 'real_faces', '--faces', faces, '--output', out, '--check') == 0
  assert 'MISMATCH' not in capsys.readouterr().out
  (out / 'real_faces' / 'takeo.pts').write_text('changed')
  assert _run(script, '--only', 'real_faces', '--faces', faces, '--output', out, '--check') == 1
  report = capsys.readouterr().out
  assert 'real_faces/takeo.pts\n  bytes differ  MISMATCH' in report and 'real_faces/einstein.pts\n  bit-equal' in report


def test_check_compares_arrays_with_their_tolerances(script, tmp_path, capsys):
  committed = {'in': np.arange(4, dtype=np.float32), 'abs': np.ones(3), 'rel': np.full(2, 10.0, np.float32),
               'unread': np.zeros(2), 'same': np.arange(3)}
  tolerances = (('in', 'exact', 0.0), ('abs', 'abs', 1e-6), ('rel', 'rel', 1e-5), ('unread', 'unread', 0.0))
  np.savez(tmp_path / 'committed.npz', **committed)

  def check(**changes):
    np.savez(tmp_path / 'rebuilt.npz', **{**committed, **changes})
    return script._compare_npz(tmp_path / 'rebuilt.npz', tmp_path / 'committed.npz', tolerances)  # pylint: disable=protected-access

  assert check(abs=np.ones(3) + 5e-7, rel=np.full(2, 10.00005, np.float32), unread=np.ones(2))
  report = capsys.readouterr().out
  assert 'MISMATCH' not in report and 'reported only' in report and 'max |diff| 5e-07' in report
  assert not check(abs=np.ones(3) + 2e-6)
  assert not check(rel=np.full(2, 10.001, np.float32))
  assert not check(**{'in': np.arange(4, dtype=np.float32) + 1e-7})   # inputs must be bit-equal
  assert not check(same=np.arange(3) + 1)                              # no pattern: bit-equal
  assert not check(abs=np.ones(3, np.float32))                         # another dtype
  assert not check(extra=np.zeros(1))                                  # another key
  assert 'only in the rebuilt file' in capsys.readouterr().out
