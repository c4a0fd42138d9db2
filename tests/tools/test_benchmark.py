"""scripts/benchmark.py: the command line end to end (on the light loss section and the infer section's
--small network) and `--repeats`."""

import builtins
import dis
import importlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest

import benchmarks
from conftest import REPO

SECTIONS = ('loss', 'model', 'data', 'train', 'eval', 'export', 'video', 'infer', 'fidelity')


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


def _benchmark(*args, cwd, timeout=600):
  return subprocess.run([sys.executable, str(REPO / 'scripts' / 'benchmark.py'), *args], cwd=cwd,
                        capture_output=True, text=True, timeout=timeout)


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


@pytest.mark.parametrize('section', SECTIONS)
def test_every_section_binds_the_globals_and_attributes_it_uses(section):
  """The heavy sections are not run here (seconds to minutes per call; with the official code in
  test_every_section_runs_beside_the_official_code): check instead that every global name the
  section's functions (and the functions and lambdas inside them) load is bound, and that every
  attribute they take of one of the project's modules (`train_bench.SMALL`) exists, which catches a
  missing import or a renamed helper before a long benchmark fails on it."""
  module = importlib.import_module(f'benchmarks.{section}')
  top = compile(pathlib.Path(module.__file__).read_text(), module.__file__, 'exec')
  codes, missing, attributes = [c for c in top.co_consts if isinstance(c, types.CodeType)], set(), set()
  while codes:
    code = codes.pop()
    instructions = list(dis.get_instructions(code))
    for ins, after in zip(instructions, instructions[1:] + [None]):
      if ins.opname != 'LOAD_GLOBAL':
        continue
      if not hasattr(module, ins.argval) and not hasattr(builtins, ins.argval):
        missing.add(f'{code.co_name}: {ins.argval}')
      value = getattr(module, ins.argval, None)
      if (isinstance(value, types.ModuleType) and value.__name__.split('.')[0] in ('benchmarks', 'star_jax')
          and after is not None and after.opname in ('LOAD_ATTR', 'LOAD_METHOD') and not hasattr(value, after.argval)):
        attributes.add(f'{code.co_name}: {ins.argval}.{after.argval}')
    codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
  assert not missing, f'benchmarks/{section}.py uses undefined globals: {sorted(missing)}'
  assert not attributes, f'benchmarks/{section}.py uses attributes its modules do not have: {sorted(attributes)}'


# The official side of the infer section, when these point at a checkout of the official code and a
# Python with PyTorch (e.g. /path/to/STAR and /path/to/python-with-torch); else it is left out.
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
    for engine in engines + ['pipeline only', 'pipeline only, whole pyramid']:
      assert rows[f'end to end {engine} b{batch}']['value'] > 0
    if official:
      assert 'x the official' in rows[f'network jax f32 b{batch}']['notes']
  flops = rows['network FLOPs per face WFLW 256px 4 stacks 16 ch']
  assert 1 < flops['value'] < 10 and flops['unit'] == 'GFLOP'
  assert rows['matmul f32 512^3 jax']['value'] > 0
  assert 'onnx int8 over onnx f32, network b8' in rows
  first, second = (rows[f'predict one photo, {run} run WFLW 256px 4 stacks 16 ch'] for run in ('first', 'second'))
  assert first['unit'] == second['unit'] == 's' and first['value'] > 0 and second['value'] > 0
  assert 'x)' in second['notes']


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
def _official_missing() -> str:
  """Why the official code cannot run beside ours in this Python ('' when it can)."""
  if importlib.util.find_spec('torch') is None:
    return ('PyTorch is not installed in this Python (the official code runs on it; pip install torch, then set '
            'STAR_JAX_OFFICIAL_CHECKOUT)')
  if not OFFICIAL_CHECKOUT:
    return ('set STAR_JAX_OFFICIAL_CHECKOUT to a checkout of the official code (git clone '
            'https://github.com/ZhenglinZhou/STAR)')
  if importlib.util.find_spec('jax2onnx') is None or importlib.util.find_spec('onnxruntime') is None:
    return "the export and infer sections export ONNX: needs the 'export' extra"
  return ''


@pytest.mark.skipif(bool(_official_missing()), reason=_official_missing() or 'runs')
def test_every_section_runs_beside_the_official_code(tmp_path):
  """`benchmark.py all --official` on the small networks, once per section: every section finishes,
  and those with an official side (loss, model, data, train, infer, fidelity) run it, none skipped. The data
  section's official pipeline reads its TSV with pandas: without pandas it says so instead."""
  out = tmp_path / 'rows.json'
  proc = _benchmark('all', '--small', '--repeats', '1', '--batch', '2', '--official', OFFICIAL_CHECKOUT, '--json',
                    str(out), cwd=tmp_path, timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = json.loads(out.read_text())['rows']
  by_section = {s: {r['name']: r for r in rows if r['section'] == s} for s in SECTIONS}
  assert all(by_section.values()), {s: len(r) for s, r in by_section.items()}
  has_pandas = importlib.util.find_spec('pandas') is not None
  skipped = [r['name'] for r in rows if r['notes'].startswith('skipped') or 'error' in r]
  assert not skipped, skipped
  for row in rows:
    if not (row['section'] == 'data' and row['name'] == 'official AlignmentDataset.__getitem__' and not has_pandas):
      assert row['value'] == row['value'], row                      # not NaN: nothing left out

  loss = by_section['loss']
  assert loss['official STARLoss_v2 fwd+bwd (B32 N98 64x64)']['value'] > 0
  assert loss['speed-up of star_loss over official']['value'] > 0
  assert loss['gradient difference to official']['value'] < 1e-3       # the same loss on the same input
  model = by_section['model']
  assert model['StackedHGNet small 64px 4x32ch forward b2 float32']['value'] > 0
  assert model['official PyTorch forward b2 float32']['value'] > 0
  data = by_section['data']
  if has_pandas:
    assert data['official AlignmentDataset.__getitem__ (1 thread, CPU time)']['value'] > 0
    assert data['parity: max |landmark diff| (normalised)']['value'] < 1e-3   # the same crop, same random draws
  else:
    assert "No module named 'pandas'" in data['official AlignmentDataset.__getitem__']['notes']
  train = by_section['train']
  assert train['train step small 64px 4x32ch b2 float32']['value'] > 0
  assert train['official PyTorch train step b2 float32']['value'] > 0
  assert train['official PyTorch train step b2, as shipped']['value'] > 0
  assert train['speed-up of our train step over official']['value'] > 0
  assert [r['name'] for r in by_section['eval'].values()] == [
      f'eval forward + map back{cov}, WFLW 64px nstack 4 C32 float32 b8' for cov in ('', ' + covariances')]
  export = by_section['export']
  assert export['ONNX file size small 64px 4x32ch']['value'] > 0
  for batch in (1, 8):
    for engine in ('onnxruntime', 'onnxruntime 1 thread', 'onnxruntime int8', 'jax'):
      assert export[f'{engine} per image, batch {batch}']['value'] > 0
  video = by_section['video']
  assert len(video) == 8 and not any('full WFLW' in name for name in video)   # --small: the tiny network only
  assert video['video 640x480 predict command, tiny (input 64, 4 stacks x 32 channels)']['value'] > 0
  infer = by_section['infer']
  for batch in (1, 8):
    assert infer[f'network official b{batch}']['value'] > 0 and infer[f'end to end official b{batch}']['value'] > 0
    assert 'x the official' in infer[f'network jax f32 b{batch}']['notes']
  fidelity = by_section['fidelity']
  for name in ('official', 'official_threads', 'official_order', 'ours', 'ours_official'):
    assert len(fidelity[f'{name}: final loss (mean of the last 20 steps)']['curve']) == 40
    assert 0 <= fidelity[f'{name}: test NME']['value'] < 100
  assert fidelity['ours vs official: loss curve']['value'] < 0.5    # the same training, a few steps in
