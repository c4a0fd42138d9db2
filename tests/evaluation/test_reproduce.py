"""scripts/reproduce.py: the published table next to ours, on dummy builds of the real formats.

The real figures need the real data; here the table, the differences and the verdict logic are
checked end to end (dataset built from a dummy manual folder, an official tiny .pkl converted on the
fly or one of our checkpoints, evaluation, table) and against the evaluate command's own numbers.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from conftest import DATA, OFFICIAL_TINY_FLAGS as TINY_OFFICIAL, REPO, command_env, load_config, load_script, run_command
from star_jax import evaluate, layouts
from star_jax.evaluation import reproduce

def test_rows_verdicts_and_table():
  wflw = load_config('wflw')
  rng = np.random.default_rng(0)
  gt = rng.uniform(-0.8, 0.8, (40, 98, 2))
  gt[:, 60], gt[:, 72] = (-0.5, 0.0), (0.5, 0.0)           # IOD 1
  pred = gt + 0.0402 * np.array([1.0, 0.0])                # every point off by 4.02 % of the IOD
  results = {'pred': pred, 'gt': gt, 'attributes': np.zeros((40, 6), np.int32)}
  table = reproduce.rows(results, layouts.WFLW, wflw)
  assert [(r.norm, r.subset, r.metric) for r in table] == [('ocular', 'all', 'nme'), ('ocular', 'all', 'fr'),
                                                           ('ocular', 'all', 'auc')]
  nme, fr, auc = table
  assert nme.ours == pytest.approx(4.02) and nme.verdict == 'reproduced' and abs(nme.difference) < 1e-9
  assert fr.ours == 0.0 and fr.difference == pytest.approx(-2.32) and fr.verdict == 'differs'
  assert auc.verdict == 'differs' and not reproduce.all_reproduced(table)
  # The tolerance is the paper's rounding: 4.0249 rounds to 4.02, 4.0251 does not.
  assert reproduce.Row('ocular', 'all', 'nme', 4.02, 4.0249, 0.005).verdict == 'reproduced'
  assert reproduce.Row('ocular', 'all', 'nme', 4.02, 4.0251, 0.005).verdict == 'differs'
  assert reproduce.Row('pupil', 'common', 'nme', 3.5, None, 0.005).verdict == 'no data'
  md = reproduce.markdown(table).splitlines()
  assert md[2] == '| ocular | all | NME % | 4.02 | 4.020 | +0.000 | 0.005 | reproduced |'
  # 300W: both normalisations, three subsets each; COFW: one NME per normalisation; synthetic: none.
  w300 = [(r.norm, r.subset) for r in reproduce.rows(
      {'pred': pred[:, :68], 'gt': gt[:, :68], 'attributes': np.ones((40, 2), np.int32)}, layouts.W300,
      load_config('300w'))]
  assert w300 == [(n, s) for n in ('ocular', 'pupil') for s in ('all', 'common', 'challenge')]
  assert reproduce.rows(results, layouts.WFLW, load_config('synthetic')) == []


@pytest.fixture(scope='module')
def script():
  return load_script('reproduce')


def _run(script, *args):
  """scripts/reproduce.py's main in this process."""
  return run_command(script.main, *args)


def test_reproduce_wflw_from_a_pkl_end_to_end(script, tmp_path):
  from star_jax_datasets.wflw import fake_data
  fake_data.write(tmp_path / 'raw', num_train=2, num_test=3)
  common = ['--dataset', 'wflw', '--manual_dir', tmp_path / 'raw', '--data_dir', tmp_path / 'tfds',
            '--pytorch', DATA / 'tiny_wflw_checkpoint.pkl', '--config', REPO / 'configs' / 'wflw.py:tiny',
            *TINY_OFFICIAL, '--config.eval_batch_size=3']
  proc = _run(script, *common, '--output', tmp_path / 'out')
  # Random tiny weights are far from the published 4.02: the table says so, and the exit status too.
  assert proc.returncode == 3, proc.stderr[-3000:]
  doc = json.loads((tmp_path / 'out' / 'reproduce.json').read_text())
  assert doc['num_images'] == 3 and [r['metric'] for r in doc['rows']] == ['nme', 'fr', 'auc']
  nme = doc['rows'][0]
  assert nme['published'] == 4.02 and nme['difference'] == pytest.approx(nme['ours'] - 4.02)
  assert nme['verdict'] == 'differs' and '| ocular | all | NME % | 4.02 |' in proc.stdout
  assert (doc['weights'], doc['best_by_protocol']) == ('net', True) and 'official tester' in doc['chosen_by']
  # Ours is what the evaluate command reports for the same checkpoint and data (the official tester's
  # choice of weights, 'net').
  evaluated = run_command(evaluate.main, f'--config={REPO / "configs" / "wflw.py"}:tiny', *TINY_OFFICIAL,
                          f'--config.data.data_dir={tmp_path / "tfds"}', '--config.eval_batch_size=3',
                          f'--pytorch={DATA / "tiny_wflw_checkpoint.pkl"}', f'--output={tmp_path / "eval"}',
                          '--noprogress')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  row = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())['rows'][0]
  assert nme['ours'] == pytest.approx(row['nme'], rel=1e-6)
  # A tolerance wide enough accepts it: exit 0, every row reproduced.
  wide = _run(script, *common, '--output', tmp_path / 'wide', '--tolerance', 'nme=1000,fr=1000,auc=1000')
  assert wide.returncode == 0 and 'every published row reproduced' in wide.stdout
  assert _run(script, *common, '--output', tmp_path / 'x', '--tolerance', 'mse=1').returncode == 2


def test_reproduce_300w_from_our_checkpoint(script, tmp_path):
  from star_jax.models import create_model
  from star_jax import checkpoints
  from star_jax_datasets.the300w import fake_data
  fake_data.write(tmp_path / 'raw', DATA / 'real_faces')
  config = load_config('300w', 'tiny')
  checkpoints.save_model_checkpoint(tmp_path / 'ckpt', model=create_model(config, nnx.Rngs(0)), config=config, step=3)
  proc = _run(script, '--dataset', '300w', '--manual_dir', tmp_path / 'raw', '--data_dir', tmp_path / 'tfds',
              '--checkpoint', tmp_path / 'ckpt', '--config', REPO / 'configs' / '300w.py:tiny', '--output',
              tmp_path / 'out')
  assert proc.returncode == 3, proc.stderr[-3000:]
  rows = json.loads((tmp_path / 'out' / 'reproduce.json').read_text())['rows']
  assert [(r['norm'], r['subset']) for r in rows] == [(n, s) for n in ('ocular', 'pupil')
                                                      for s in ('all', 'common', 'challenge')]
  assert {r['published'] for r in rows} == {2.87, 2.52, 4.32, 4.03, 3.50, 6.22}
  # What was scored, and how it was chosen: no evaluation recorded, so the latest step and its only weights.
  assert '(step 3, model weights; the latest step' in (tmp_path / 'out' / 'reproduce.md').read_text()
  doc = json.loads((tmp_path / 'out' / 'reproduce.json').read_text())
  assert (doc['step'], doc['weights'], doc['best_by_protocol']) == (3, 'model', None)
  # Bad input: a clear message, no traceback (the script run as a user runs it).
  bad = subprocess.run([sys.executable, str(REPO / 'scripts' / 'reproduce.py'), '--dataset', '300w', '--pytorch',
                        str(tmp_path / 'none.pkl'), '--output', str(tmp_path / 'o'), '--data_dir', str(tmp_path / 'tfds'),
                        '--config', str(REPO / 'configs' / '300w.py:tiny')], cwd=REPO, env=command_env(),
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and 'none.pkl does not exist' in bad.stderr and 'Traceback' not in bad.stderr
