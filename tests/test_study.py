"""The ambiguity study (scripts/ambiguity_study.py, star_jax/experiments/ambiguity.py) at a tiny setting.

The relabelled training split must equal what the synthetic_faces builder writes at that level (the
study builds level 0 once and re-draws the labels); the script, run as a user runs it, must write a
table, JSON and plot covering every (loss, level), through the ordinary trainer, and resume.
"""

import json
import math
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import COMPILE_CACHE_ENV, REPO, load_config
from star_jax import layouts
from star_jax.data import build
from star_jax.data import synthetic
from star_jax.experiments import ambiguity
from star_jax.models import decoding


@pytest.fixture(scope='module')
def tfds_dir(tmp_path_factory):
  return tmp_path_factory.mktemp('tfds')


def _data(data_dir, config: str, relabel: float = -1.0):
  return ml_collections.ConfigDict({'name': 'synthetic_faces', 'config': config, 'data_dir': str(data_dir),
                                    'manual_dir': '', 'relabel_ambiguity': relabel})


def test_relabelled_source_equals_a_build_at_that_level(tfds_dir):
  # Named configs beyond the registered ones: 98 points, level A, 6 train / 2 test faces of 128 px.
  source = build.load_source(_data(tfds_dir, 'wflw98_amb0_6x2_128px', relabel=4.0), 'train')
  built = build.load_source(_data(tfds_dir, 'wflw98_amb4_6x2_128px'), 'train')
  assert isinstance(source, synthetic.RelabelledSource)
  assert len(source) == len(built) == 6
  moved = []
  for i in range(len(built)):
    mine, theirs = source[i], built[i]
    # Labels re-drawn from the float32 exact points: equal to the builder's up to float32 rounding.
    np.testing.assert_allclose(mine['landmarks'], theirs['landmarks'], atol=2e-3)
    np.testing.assert_array_equal(mine['image'], theirs['image'])
    np.testing.assert_array_equal(mine['clean_landmarks'], theirs['clean_landmarks'])
    moved.append(np.abs(theirs['landmarks'] - theirs['clean_landmarks']).max())
  assert min(moved) > 0.5  # level 4 really moves points (in px of a 128 px image)
  # Level 0 gives the exact labels; the test split and relabel < 0 are the build's own records.
  exact = build.load_source(_data(tfds_dir, 'wflw98_amb0_6x2_128px', relabel=0.0), 'train')
  np.testing.assert_array_equal(exact[2]['landmarks'], exact[2]['clean_landmarks'])
  test = build.load_source(_data(tfds_dir, 'wflw98_amb0_6x2_128px', relabel=4.0), 'test')
  assert not isinstance(test, synthetic.RelabelledSource)
  assert not isinstance(build.load_source(_data(tfds_dir, 'wflw98_amb0_6x2_128px'), 'train'),
                        synthetic.RelabelledSource)
  with pytest.raises(ValueError, match='unknown synthetic_faces config'):
    build.load_source(_data(tfds_dir, 'wflw98_ambX'), 'train')


def test_relabelled_noise_is_tangential_and_largest_on_the_contour(tfds_dir):
  level0 = build.load_source(_data(tfds_dir, 'wflw98_amb0_6x2_128px'), 'train')
  source = synthetic.RelabelledSource(level0, 2.0, seed=0, image_size=128)
  record = source[0]
  clean = record['clean_landmarks'].astype(np.float64)
  delta = record['landmarks'] - clean
  tangent = synthetic.curve_tangents(clean, layouts.WFLW)
  cross = delta[:, 0] * tangent[:, 1] - delta[:, 1] * tangent[:, 0]
  np.testing.assert_allclose(cross, 0, atol=1e-3)
  amb = ambiguity.ambiguous_points()
  assert amb[:33].all() and amb[33:51].all() and not amb[51:].any()  # contour and brows
  assert np.abs(delta[96:]).max() == 0  # pupils carry no noise
  with pytest.raises(ValueError, match='level'):
    synthetic.RelabelledSource(level0, -1.0, seed=0, image_size=128)


def test_part_nmes_split_the_error_by_ambiguity():
  rng = np.random.default_rng(0)
  gt = rng.uniform(-0.8, 0.8, (3, 98, 2))
  gt[:, 60], gt[:, 72] = (-0.5, 0.0), (0.5, 0.0)  # IOD 1
  pred = gt.copy()
  pred[:, :33, 0] += 0.1                          # only the contour is off, by 0.1 IOD
  parts = ambiguity.part_nmes(pred, gt, layouts.WFLW)
  assert parts['nme_ambiguous'] == pytest.approx(0.1 * 33 / 51)
  assert parts['nme_other'] == pytest.approx(0.0)


def test_study_config_and_cell_configs():
  study = load_config('ambiguity_study')
  assert tuple(study.levels) == (0.0, 2.0, 4.0) and tuple(study.losses) == ('star', 'smoothl1', 'none')
  config = ambiguity.run_config(study, 'none', 2.0, 3)
  assert (config.loss.kind, tuple(config.loss.weights), config.seed) == ('none', (1.0, 10.0, 10.0), 3)
  assert (config.data.image_size, config.data.heatmap_size, config.data.sigma) == (64, 16, 1.5)
  assert (config.data.relabel_ambiguity, config.model.decode) == (2.0, 'pointmaps')
  assert config.milestones == (267, 360) and config.milestone_unit == 'step' and not config.ema
  assert ambiguity.run_config(study, 'star', 0.0, 0).model.decode == 'landmarks'
  assert study.run.loss.kind == 'star'   # the study's own config is not changed by a cell
  full = load_config('ambiguity_study', 'full')
  assert len(full.seeds) == 3 and full.run.data.config == 'wflw98_amb0'  # the standard build
  study.losses = ('star', 'l3')
  with pytest.raises(ValueError, match='unknown loss'):
    ambiguity.check_study(study)


def _run_script(out, tfds_dir):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             # Compile fast (this is about plumbing, not speed) and share programs between test runs.
             XLA_FLAGS='--xla_backend_optimization_level=0', **COMPILE_CACHE_ENV)
  return subprocess.run([sys.executable, 'scripts/ambiguity_study.py', '--config', 'configs/ambiguity_study.py:tiny',
                         f'--config.run.data.data_dir={tfds_dir}', '--output', str(out)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def test_script_end_to_end_at_a_tiny_setting(tfds_dir, tmp_path):
  out = tmp_path / 'study'
  proc = _run_script(out, tfds_dir)
  assert proc.returncode == 0, proc.stderr[-4000:]

  doc = json.loads((out / 'results.json').read_text())
  runs = doc['runs']
  assert sorted((r['loss'], r['level']) for r in runs) == [('l2', 0.0), ('l2', 4.0), ('star', 0.0), ('star', 4.0)]
  for r in runs:
    for key in ('nme', 'nme_ambiguous', 'nme_other', 'fr', 'auc', 'final_train_loss', 'train_seconds'):
      assert r[key] is not None and math.isfinite(r[key]), (r['loss'], r['level'], key)
    assert 0 < r['nme'] < 5 and not r['diverged']
    # The overall NME is the point-count-weighted mean of the two parts (same IOD, same images).
    assert r['nme'] == pytest.approx((51 * r['nme_ambiguous'] + 47 * r['nme_other']) / 98, rel=1e-4)
  assert set(doc['compile_seconds']) == {'star', 'l2'}
  assert doc['dataset']['num_train'] == 16 and doc['dataset']['num_test'] == 8
  # One seed: the aggregate of a (loss, level) is that run's NME, with zero spread.
  star0 = next(r for r in runs if (r['loss'], r['level']) == ('star', 0.0))
  assert doc['nme']['star']['0'] == [star0['nme'], 0.0]
  # Each cell is an ordinary training workdir, and the trainer's own evaluation agrees with the study's.
  cell = out / 'runs' / 'star_amb0_seed0'
  assert (cell / 'checkpoints').is_dir() and (cell / 'cell.json').exists()
  assert json.loads((cell / 'final_metrics.json').read_text())['model/nme'] == pytest.approx(star0['nme'], rel=1e-5)

  table = (out / 'results.md').read_text()
  rows = [line for line in table.splitlines() if line.startswith('| star (') or line.startswith('| l2 (')]
  assert len(rows) == 6  # 2 losses x 3 tables (all points, contour + brows, the others)
  assert '| loss | level 0 | level 4 | increase 0 → 4 |' in table
  assert table.split('**NME (%), all 98 points**')[1].split('| star (')[1].split(' | ')[1] == \
      f"{100 * doc['nme']['star']['0'][0]:.2f}"
  assert table in proc.stdout  # the table is printed too
  png = (out / 'nme_vs_ambiguity.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n' and len(png) > 10_000

  # Run again: every cell is finished, so nothing trains and the results are the same.
  again = _run_script(out, tfds_dir)
  assert again.returncode == 0, again.stderr[-4000:]
  assert again.stdout.count('done earlier') == 4
  assert json.loads((out / 'results.json').read_text())['runs'] == runs


def test_tables_average_seeds_and_mark_a_diverged_run():
  grid = {'levels': [0.0, 4.0], 'losses': ['star', 'l2'], 'seeds': [0, 1]}
  records = []
  for loss, level, seed, nme in (('star', 0.0, 0, 0.05), ('star', 0.0, 1, 0.07), ('star', 4.0, 0, 0.08),
                                 ('star', 4.0, 1, 0.08), ('l2', 0.0, 0, 0.06), ('l2', 0.0, 1, 0.06),
                                 ('l2', 4.0, 0, None), ('l2', 4.0, 1, 0.09)):
    records.append({'loss': loss, 'level': level, 'seed': seed, 'nme': nme, 'nme_ambiguous': nme,
                    'nme_other': nme, 'train_seconds': 1.0})
  table = ambiguity.aggregate(records, grid, 'nme')
  assert table['star']['0'] == pytest.approx((0.06, 0.01))
  assert math.isnan(table['l2']['4'][0])
  assert ambiguity._json_table(table)['l2']['4'] == [None, None]
  md = ambiguity.markdown_tables(records, grid)
  assert '| star (STAR (v2) + AWing) | 6.00 ± 1.00 | 8.00 ± 0.00 | +2.00 |' in md
  assert '| l2 (L2 coords + AWing) | 6.00 ± 0.00 | diverged | n/a |' in md


def test_decode_pointmaps_finds_peaks_to_sub_pixel():
  h = w = 16
  truth = np.array([[5.0, 7.0], [5.3, 7.6], [0.0, 15.0], [14.6, 0.2]])  # (x, y) map px; corners too
  ys, xs = np.mgrid[0:h, 0:w]
  maps = np.stack([np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / 2.0) for x, y in truth], -1)[None]  # sigma 1
  maps = maps + 0.01  # a background a plain soft-argmax would be pulled to the centre by
  decoded = np.asarray(decoding.decode_pointmaps(maps.astype(np.float32)))[0]
  px = (decoded + 1) / 2 * (w - 1)                                       # back to map px
  np.testing.assert_allclose(px[0], truth[0], atol=1e-5)                 # centred on a pixel: exact
  err = np.abs(px - truth).max(axis=1)
  assert err[1] < 0.3 and err[3] < 0.3                                   # sub-pixel elsewhere
  assert err[2] < 0.5  # on the corner the window is cut to 2 x 2 pixels, pulling the centroid inwards
  assert np.abs(px[1] - truth[1]).max() < np.abs(np.round(truth[1]) - truth[1]).max()  # beats argmax


def test_replot_rewrites_table_and_plot_from_the_json(tmp_path):
  runs = [{'loss': loss, 'level': level, 'seed': 0, 'nme': nme, 'nme_ambiguous': nme, 'nme_other': nme,
           'train_seconds': 2.0}
          for loss, base in (('star', 0.05), ('none', 0.8)) for level, nme in ((0.0, base), (2.0, base + 0.01),
                                                                                (4.0, base + 0.02))]
  doc = {'levels': [0.0, 2.0, 4.0], 'losses': ['star', 'none'], 'seeds': [0], 'runs': runs,
         'total_seconds': 60.0, 'device': 'test', 'dataset': {'seconds': 1.0},
         'compile_seconds': {'star': 1.0, 'none': 1.0}}
  (tmp_path / 'results.json').write_text(json.dumps(doc))
  ambiguity.replot(tmp_path, log=lambda _: None)
  md = (tmp_path / 'results.md').read_text()
  assert '| star (STAR (v2) + AWing) | 5.00 | 6.00 | 7.00 | +2.00 |' in md
  assert (tmp_path / 'nme_vs_ambiguity.png').read_bytes()[:4] == b'\x89PNG'  # with an off-scale loss
  with pytest.raises(FileNotFoundError, match='run the study first'):
    ambiguity.replot(tmp_path / 'nothing')
