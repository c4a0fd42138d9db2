"""scripts/benchmark.py: the command line end to end (on the light loss section and the infer section's
--small network) and `--repeats`."""

import builtins
import dis
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

import benchmarks
from conftest import REPO


def test_repeats_given_are_used_as_given():
  assert benchmarks.repeats(types.SimpleNamespace(repeats=5)) == 5
  # Explicit values are honoured for the full-network sections too (they used to be capped at 3).
  assert benchmarks.repeats(types.SimpleNamespace(repeats=7), full_network=True) == 7


def test_repeats_default_depends_on_the_section_on_a_cpu():
  args = types.SimpleNamespace(repeats=None)
  assert benchmarks.repeats(args) == benchmarks.DEFAULT_REPEATS
  assert benchmarks.repeats(args, full_network=True) == benchmarks.DEFAULT_REPEATS_FULL_NETWORK_CPU
  assert benchmarks.repeats(types.SimpleNamespace()) == benchmarks.DEFAULT_REPEATS   # no attribute


def test_repeats_below_one_is_an_error():
  with pytest.raises(ValueError, match='--repeats'):
    benchmarks.repeats(types.SimpleNamespace(repeats=0))


def _benchmark(*args, cwd):
  return subprocess.run([sys.executable, str(REPO / 'scripts' / 'benchmark.py'), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=600)


def test_loss_section_runs_and_writes_its_rows(tmp_path):
  out = tmp_path / 'rows.json'
  proc = _benchmark('loss', '--repeats', '2', '--json', str(out), cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report['jax'] and 'cpu' in report['device']
  (row,) = report['rows']                       # no --official: our row only
  assert row['section'] == 'loss' and row['unit'] == 'ms'
  assert 0 < row['value'] < 60_000
  assert 'median of 2' in row['notes']
  assert row['name'] in proc.stdout             # the table on stdout


def test_bad_repeats_is_refused_before_any_work(tmp_path):
  proc = _benchmark('loss', '--repeats', '0', '--json', str(tmp_path / 'rows.json'), cwd=tmp_path)
  assert proc.returncode == 2
  assert '--repeats must be at least 1, got 0' in proc.stderr
  assert not (tmp_path / 'rows.json').exists()


@pytest.mark.parametrize('section', ['loss', 'model', 'data', 'train', 'eval', 'export', 'video', 'infer', 'fidelity'])
def test_every_section_binds_the_globals_its_run_uses(section):
  """The heavy sections are not run here (seconds to minutes per call): check instead that every
  global name `run` (and the functions and lambdas inside it) loads is bound, which catches a missing
  import before a long benchmark fails on it."""
  module = importlib.import_module(f'benchmarks.{section}')
  codes, loaded = [module.run.__code__], set()
  while codes:
    code = codes.pop()
    loaded |= {ins.argval for ins in dis.get_instructions(code) if ins.opname == 'LOAD_GLOBAL'}
    codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
  missing = sorted(n for n in loaded if not hasattr(module, n) and not hasattr(builtins, n))
  assert not missing, f'benchmarks/{section}.py run() uses undefined globals: {missing}'


# The official side of the infer section, when these point at a checkout of the official code and a
# Python with PyTorch (e.g. /tmp/star_ref and /work/torchvenv/bin/python); else it is left out.
OFFICIAL_CHECKOUT = os.environ.get('STAR_JAX_OFFICIAL_CHECKOUT', '')
OFFICIAL_PYTHON = os.environ.get('STAR_JAX_OFFICIAL_PYTHON', '')


@pytest.mark.skipif(importlib.util.find_spec('jax2onnx') is None or importlib.util.find_spec('onnxruntime') is None,
                    reason="the infer section exports ONNX: needs the 'export' extra")
def test_infer_section_small_runs_every_engine_in_turns(tmp_path):
  out = tmp_path / 'rows.json'
  official = ['--official', OFFICIAL_CHECKOUT, '--official_python', OFFICIAL_PYTHON] if OFFICIAL_CHECKOUT else []
  proc = _benchmark('infer', '--small', '--repeats', '1', '--json', str(out), *official, cwd=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {r['name']: r for r in json.loads(out.read_text())['rows']}
  engines = ['jax f32', 'jax bf16', 'onnx'] + (['official'] if official else [])
  for batch in (1, 8):
    for engine in engines + ['onnx int8']:
      row = rows[f'network {engine} b{batch}']
      assert row['unit'] == 'ms/face' and row['value'] > 0 and 'of the matmul peak' in row['notes']
    for engine in engines + ['pipeline only']:
      assert rows[f'end to end {engine} b{batch}']['value'] > 0
    if official:
      assert 'x the official' in rows[f'network jax f32 b{batch}']['notes']
  flops = rows['network FLOPs per face WFLW 256px 4 stacks 16 ch']
  assert 1 < flops['value'] < 10 and flops['unit'] == 'GFLOP'
  assert rows['matmul f32 512^3 jax']['value'] > 0
  assert 'onnx int8 over onnx f32, network b8' in rows


# ---- The fidelity section (its runs take minutes: its pieces here) ------------------------------------

def test_fidelity_section_without_the_official_code_says_so():
  from benchmarks import fidelity  # pylint: disable=import-outside-toplevel
  (row,) = fidelity.run(types.SimpleNamespace(official='', official_python=''))
  assert row['name'].startswith('skipped') and '--official' in row['name']


def test_fidelity_batches_visit_every_face_once_per_epoch():
  from benchmarks import fidelity  # pylint: disable=import-outside-toplevel
  order = fidelity.batch_order(0)
  assert order.shape == (fidelity.STEPS, fidelity.BATCH)
  flat = order.ravel()
  epoch = fidelity.TRAIN_FACES
  assert sorted(flat[:epoch]) == list(range(epoch)) and sorted(flat[epoch:2 * epoch]) == list(range(epoch))
  np.testing.assert_array_equal(fidelity.batch_order(0), order)          # the same batches for every run
  assert not np.array_equal(fidelity.batch_order(1), order)              # another data order


def test_fidelity_plot_draws_the_curves_and_refuses_other_rows(tmp_path):
  rng = np.random.default_rng(0)
  rows = [{'section': 'fidelity', 'name': f'{name}: final loss', 'value': 1.0, 'unit': 'loss', 'notes': '',
           'curve': (100 * np.exp(-np.arange(200) / 80) + rng.normal(0, 1, 200)).tolist()}
          for name in ('official', 'official_threads', 'ours')]
  good, bad = tmp_path / 'good.json', tmp_path / 'bad.json'
  good.write_text(json.dumps({'rows': rows}))
  bad.write_text(json.dumps({'rows': [dict(rows[0], section='loss')]}))
  script = [sys.executable, str(REPO / 'scripts' / 'fidelity_plot.py')]
  proc = subprocess.run(script + ['--json', str(good), '--output', str(tmp_path / 'curves.png')],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert (tmp_path / 'curves.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  proc = subprocess.run(script + ['--json', str(bad), '--output', str(tmp_path / 'no.png')],
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1 and 'no fidelity rows' in proc.stderr and not (tmp_path / 'no.png').exists()
