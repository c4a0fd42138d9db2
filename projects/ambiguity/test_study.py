"""The ambiguity study (projects/ambiguity: `python -m projects.ambiguity.run`) at its quick setting.

The relabelled training split must equal what the synthetic_faces builder writes at that level (the
study builds level 0 once and re-draws the labels); the script, run as a user runs it (`--quick`), must
write tables, JSON and plots covering every (variant, level, seed), through the ordinary trainer, and
resume; the statistics (mean and spread over seeds, paired differences, when a difference is called)
and the covariance-to-tangent measurements are checked on constructed inputs.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from projects.ambiguity import cells as cells_lib
from projects.ambiguity import scoring
from projects.ambiguity import study as study_lib
from projects.ambiguity import tables
from star_jax import config_lib
from star_jax import layouts
from star_jax.data import build
from star_jax.data import synthetic
from star_jax.models import decoding

REPO = pathlib.Path(__file__).resolve().parents[2]
# The compilation cache the tests' subprocesses share (tests/conftest.py, COMPILE_CACHE_ENV).
COMPILE_CACHE_ENV = {
    'JAX_COMPILATION_CACHE_DIR': os.environ.get('STAR_JAX_TEST_CACHE', '/tmp/star_jax_test_jax_cache'),
    'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0', 'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def load_config(name: str, arg: str = ''):
  """The study's config (projects/ambiguity/config.py:`arg`); `name` is 'ambiguity_study'."""
  assert name == 'ambiguity_study'
  return config_lib.load_config(str(REPO / 'projects' / 'ambiguity' / 'config.py') + (f':{arg}' if arg else ''))


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
  amb = scoring.ambiguous_points()
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
  parts = scoring.part_nmes(pred, gt, layouts.WFLW)
  assert parts['nme_ambiguous'] == pytest.approx(0.1 * 33 / 51)
  assert parts['nme_other'] == pytest.approx(0.0)


def test_study_config_and_cell_configs():
  study = load_config('ambiguity_study')
  assert tuple(study.levels) == (0.0, 2.0, 4.0, 8.0) and tuple(study.losses) == ('star', 'smoothl1', 'l2')
  assert tuple(study.seeds) == (0, 1) and tuple(study.ablations) == ('star_w0', 'star_v1')
  assert study.run.data.relabel_model == 'annotators' and study.ablation_level in study.levels
  cells = cells_lib.cells(study)
  assert len(cells) == 28 and len(set(cells)) == 28                     # 3 x 4 x 2 + 2 ablations x 2 seeds
  assert cells[:3] == [('star', 0.0, 0), ('smoothl1', 0.0, 0), ('l2', 0.0, 0)]
  # Level 0 and the ablation level (with the ablations) for both seeds first: a partial study is paired.
  assert [c[1] for c in cells] == [0.0] * 6 + [4.0] * 10 + [2.0] * 6 + [8.0] * 6
  assert cells[12:16] == [('star_w0', 4.0, 0), ('star_v1', 4.0, 0), ('star_w0', 4.0, 1), ('star_v1', 4.0, 1)]
  assert ('star_w0', 4.0, 1) in cells and ('star_v1', 4.0, 0) in cells
  config = cells_lib.run_config(study, 'star_w0', 2.0, 3)
  assert (config.loss.kind, config.loss.star_w, tuple(config.loss.weights), config.seed) == ('star', 0.0,
                                                                                            (1.0, 10.0, 10.0), 3)
  assert (config.data.relabel_ambiguity, config.model.decode) == (2.0, 'landmarks')
  assert config.milestone_unit == 'step' and not config.ema
  assert cells_lib.run_config(study, 'none', 0.0, 0).model.decode == 'pointmaps'
  assert cells_lib.run_config(study, 'star_v1', 0.0, 0).loss.star_w == study.run.loss.star_w == 1.0
  assert study.run.loss.kind == 'star'   # the study's own config is not changed by a cell
  # A cell's digest tells its config apart from any other cell's.
  digests = {cells_lib.config_digest(cells_lib.run_config(study, *cell)) for cell in cells}
  assert len(digests) == len(cells)
  full = load_config('ambiguity_study', 'full')
  assert len(full.seeds) == 3 and full.run.data.config == 'wflw98_amb0'  # the standard build
  quick = load_config('ambiguity_study', 'quick')
  assert len(cells_lib.cells(quick)) == 10
  for bad, message in ((('star', 'l3'), 'unknown loss'), (('star', 'star_w'), 'unknown loss')):
    study.losses = bad
    with pytest.raises(ValueError, match=message):
      cells_lib.check_study(study)
  study.losses = ('star',)
  study.ablation_level = 3.0
  with pytest.raises(ValueError, match='ablation_level'):
    cells_lib.check_study(study)
  assert cells_lib.variant_loss('star_v1_w0.5') == ('star_v1', 0.5)


def _cov_along(directions, major=4.0, minor=1.0):
  """(..., 2, 2) covariances with eigenvalues (major, minor), the major axis along `directions`."""
  d = directions / np.linalg.norm(directions, axis=-1, keepdims=True)
  n = np.stack([-d[..., 1], d[..., 0]], -1)
  return major * d[..., :, None] * d[..., None, :] + minor * n[..., :, None] * n[..., None, :]


def test_axis_statistics_measure_the_angle_to_the_true_tangent():
  faces = [synthetic.generate(0, 'test', i, image_size=128).clean_landmarks.astype(np.float64) for i in range(3)]
  gt_px = np.stack(faces)
  gt = gt_px / 64.0 - 1.0    # a scale and a shift, as the eval crop: directions are unchanged
  tangents = np.stack([synthetic.curve_tangents(p, layouts.WFLW) for p in gt_px])
  has = np.linalg.norm(tangents, axis=-1) > 0.5
  safe = np.where(has[..., None], tangents, np.array([1.0, 0.0]))
  # Along the tangent on the contour and brows, across it elsewhere; an axis has no direction, so a
  # flipped sign changes nothing.
  along = _cov_along(-safe)
  across = _cov_along(np.stack([-safe[..., 1], safe[..., 0]], -1), major=9.0)
  cov = np.where(scoring.ambiguous_points()[None, :, None, None], along, across)
  stats = scoring.axis_statistics(cov, gt, gt_px, layouts.WFLW)
  groups = stats['groups']
  for name in ('contour', 'brows'):
    assert groups[name]['angle_median'] == pytest.approx(0.0, abs=1e-4)
    assert groups[name]['aligned'] == 1.0 and groups[name]['angle_hist'][0] == 1.0
    assert groups[name]['anisotropy_median'] == pytest.approx(4.0)
  others = groups['others']
  assert others['angle_median'] == pytest.approx(90.0, abs=1e-4) and others['aligned'] == 0.0
  assert others['anisotropy_median'] == pytest.approx(9.0)
  assert others['count'] == 3 * (47 - 2)                                  # the pupils have no tangent
  iod = np.linalg.norm(gt[:, 60] - gt[:, 72], axis=-1)
  assert groups['contour']['std_major'] == pytest.approx(np.median(2.0 / iod))
  points = stats['points']
  assert points['angle_median'][96] is None and points['angle_median'][0] == pytest.approx(0.0, abs=1e-4)
  assert points['anisotropy_median'][60] == pytest.approx(9.0)
  # A 30-degree turn of every axis reads as 30 degrees, in either direction of rotation.
  turn = np.radians(30.0)
  rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
  turned = scoring.axis_statistics(_cov_along(safe @ rot.T), gt, gt_px, layouts.WFLW)['groups']
  assert turned['contour']['angle_median'] == pytest.approx(30.0, abs=1e-3)
  turned = scoring.axis_statistics(_cov_along(safe @ rot), gt, gt_px, layouts.WFLW)['groups']
  assert turned['brows']['angle_median'] == pytest.approx(30.0, abs=1e-3)


def test_error_split_measures_the_error_along_and_across_the_tangent():
  faces = [synthetic.generate(0, 'test', i, image_size=128).clean_landmarks.astype(np.float64) for i in range(3)]
  gt_px = np.stack(faces)
  gt = gt_px / 64.0 - 1.0    # a scale and a shift, as the eval crop: directions are unchanged
  tangents = np.stack([synthetic.curve_tangents(p, layouts.WFLW) for p in gt_px])
  normals = np.stack([-tangents[..., 1], tangents[..., 0]], -1)
  iod = np.linalg.norm(gt[:, 60] - gt[:, 72], axis=-1)[:, None, None]
  # 3 % of the IOD along the curve (either way) and 1 % across it, at every point with a tangent.
  sign = np.where(np.arange(98) % 2 == 0, 1.0, -1.0)[None, :, None]
  pred = gt + iod * (0.03 * sign * tangents + 0.01 * normals)
  split = scoring.error_split(pred, gt, gt_px, layouts.WFLW)
  assert set(split) == {'contour', 'brows', 'others'} and split['others']['count'] == 3 * 45
  for group in split.values():
    assert group['tangential'] == pytest.approx(0.03) and group['normal'] == pytest.approx(0.01)
  # Exact predictions have no error either way; a pure tangential shift has no normal part.
  assert scoring.error_split(gt, gt, gt_px, layouts.WFLW)['contour'] == {'tangential': 0.0, 'normal': 0.0,
                                                                          'count': 3 * 33}
  along = scoring.error_split(gt + iod * 0.02 * tangents, gt, gt_px, layouts.WFLW)['brows']
  assert along['tangential'] == pytest.approx(0.02) and along['normal'] == pytest.approx(0.0, abs=1e-12)


def _run_script(out, tfds_dir, *extra):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1',
             # Compile fast (this is about plumbing, not speed) and share programs between test runs.
             XLA_FLAGS='--xla_backend_optimization_level=0', **COMPILE_CACHE_ENV)
  return subprocess.run([sys.executable, '-m', 'projects.ambiguity.run', '--quick',
                         f'--config.run.data.data_dir={tfds_dir}', '--output', str(out), *extra], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


def test_script_end_to_end_at_the_quick_setting(tfds_dir, tmp_path):
  out = tmp_path / 'study'
  proc = _run_script(out, tfds_dir)
  assert proc.returncode == 0, proc.stderr[-4000:]

  doc = json.loads((out / 'results.json').read_text())
  runs = doc['runs']
  assert sorted((r['variant'], r['level'], r['seed']) for r in runs) == sorted(
      [(v, lv, s) for s in (0, 1) for lv in (0.0, 4.0) for v in ('star', 'l2')] + [('star_w0', 4.0, 0), ('star_w0', 4.0, 1)])
  for r in runs:
    for key in ('nme', 'nme_ambiguous', 'nme_other', 'nme_contour', 'nme_eyes', 'fr', 'auc', 'final_train_loss',
                'train_seconds', 'wall_seconds'):
      assert r[key] is not None and math.isfinite(r[key]), (r['variant'], r['level'], key)
    assert 0 < r['nme'] < 5 and not r['diverged'] and r['noise_model'] == 'annotators'
    # The overall NME is the point-count-weighted mean of the two parts (same IOD, same images).
    assert r['nme'] == pytest.approx((51 * r['nme_ambiguous'] + 47 * r['nme_other']) / 98, rel=1e-4)
    groups = r['covariance']['groups']
    assert set(groups) == {'contour', 'brows', 'others'} and groups['others']['count'] == 8 * 45
    assert 0 <= groups['contour']['angle_median'] <= 90 and groups['brows']['anisotropy_median'] >= 1
    assert sum(groups['contour']['angle_hist']) == pytest.approx(1.0)
    split = r['error_split']
    assert set(split) == {'contour', 'brows', 'others'}
    # Along and across are the two components of each point's error: their norm bounds it from below.
    assert split['contour']['tangential'] + split['contour']['normal'] >= r['nme_contour'] * (1 - 1e-6)
  assert (r['star_w'] == 0.0) == (r['variant'] == 'star_w0')
  assert set(doc['compile_seconds']) == {'star', 'l2', 'star_w0'}
  assert doc['dataset']['num_train'] == 16 and doc['dataset']['num_test'] == 8
  assert doc['noise'] == {'model': 'annotators', 'annotators': 5, 'annotator_bias': 0.75}
  # Two seeds: the aggregate of a (loss, level) is the mean and half the difference of its runs.
  star0 = [r['nme'] for r in runs if (r['variant'], r['level']) == ('star', 0.0)]
  assert doc['nme']['star']['0'] == pytest.approx([np.mean(star0), abs(star0[0] - star0[1]) / 2])
  # Each cell is an ordinary training workdir, and the trainer's own evaluation agrees with the study's.
  cell = out / 'runs' / 'star_amb0_seed0'
  first = next(r for r in runs if (r['variant'], r['level'], r['seed']) == ('star', 0.0, 0))
  assert (cell / 'checkpoints').is_dir() and (cell / 'cell.json').exists()
  assert json.loads((cell / 'final_metrics.json').read_text())['model/nme'] == pytest.approx(first['nme'], rel=1e-5)

  table = (out / 'results.md').read_text()
  for title in ('**NME (%), all 98 points**', '**Harm: NME at the level', '**STAR minus baseline',
                '**Eigenvalue restriction and STAR version at level 4**', '**Predicted covariance against'):
    assert title in table
  assert '| loss | level 0 | level 4 |' in table
  row = table.split('**NME (%), all 98 points**')[1].split('| star (')[1].split(' | ')[1]
  assert row == f"{100 * doc['nme']['star']['0'][0]:.2f} ± {100 * doc['nme']['star']['0'][1]:.2f}"
  assert table in proc.stdout  # the tables are printed too
  for name in ('nme_vs_ambiguity.png', 'axis_angles.png', 'covariance_vs_ambiguity.png'):
    png = (out / name).read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n' and 10_000 < len(png) < 300_000, name

  # The error split is scored again from the checkpoints, as each cell recorded it.
  split = _run_script(out, tfds_dir, '--error_split')
  assert split.returncode == 0, split.stderr[-4000:]
  assert '**Test error along / across the true tangent**' in (out / 'error_split.md').read_text()
  again_split = json.loads((out / 'error_split.json').read_text())
  rescored = next(x for x in again_split if (x['variant'], x['level']) == ('star', 0.0))['seeds']['0']
  for group, values in first['error_split'].items():
    assert rescored[group]['tangential'] == pytest.approx(values['tangential'], rel=1e-5)

  # Run again: every cell is finished, so nothing trains and the results are the same.
  again = _run_script(out, tfds_dir)
  assert again.returncode == 0, again.stderr[-4000:]
  assert again.stdout.count('done earlier') == 10
  assert json.loads((out / 'results.json').read_text())['runs'] == runs
  # A changed study in the same folder does not reuse cells made with another config.
  changed = _run_script(out, tfds_dir, '--config.run.data.annotators=3')
  assert changed.returncode == 1 and 'another config' in changed.stderr


def test_statistics_pair_seeds_and_call_only_differences_beyond_the_spread():
  records = []
  for variant, level, seed, nme in (('star', 0.0, 0, 0.05), ('star', 0.0, 1, 0.07), ('star', 4.0, 0, 0.08),
                                    ('star', 4.0, 1, 0.08), ('l2', 0.0, 0, 0.06), ('l2', 0.0, 1, 0.06),
                                    ('l2', 4.0, 0, None), ('l2', 4.0, 1, 0.09), ('star_w0', 4.0, 0, 0.09),
                                    ('star_w0', 4.0, 1, 0.10)):
    records.append({'variant': variant, 'loss': variant.split('_w')[0], 'level': level, 'seed': seed, 'nme': nme,
                    'nme_ambiguous': nme, 'nme_other': nme, 'train_seconds': 1.0})
  seeds = [0, 1]
  assert tables.mean_spread(tables.seed_values(records, 'star', 0.0, 'nme', seeds)) == pytest.approx((0.06, 0.01))
  assert math.isnan(tables.mean_spread(tables.seed_values(records, 'l2', 4.0, 'nme', seeds))[0])
  # Harm of STAR, paired by seed: +0.03 and +0.01: both seeds agree, so it is called.
  assert tables.paired_difference(records, ('star', 4.0), ('star', 0.0), 'nme', seeds) == pytest.approx(
      (0.02, 0.01, True))
  # STAR minus L2 at level 0: -0.01 and +0.01: within the spread, not called.
  mean, spread, called = tables.paired_difference(records, ('star', 0.0), ('l2', 0.0), 'nme', seeds)
  assert (mean, spread, called) == (pytest.approx(0.0), pytest.approx(0.01), False)
  # One seed is never called, however large the difference.
  assert not tables.paired_difference(records, ('star_w0', 4.0), ('star', 4.0), 'nme', [0])[2]
  table = tables.aggregate(records, ['star', 'l2'], [0.0, 4.0], 'nme')
  assert table['star']['0'] == pytest.approx((0.06, 0.01)) and math.isnan(table['l2']['4'][0])
  assert tables.json_table(table)['l2']['4'] == [None, None]
  grid = {'levels': [0.0, 4.0], 'losses': ['star', 'l2'], 'seeds': seeds, 'ablations': ['star_w0'],
          'ablation_level': 4.0}
  md = tables.markdown_tables(records, grid)
  assert '| star (STAR (v2) + AWing) | 6.00 ± 1.00 | 8.00 ± 0.00 |' in md
  assert '| l2 (L2 coords + AWing) | 6.00 ± 0.00 | diverged |' in md
  assert '| star | all | **+2.00 ± 1.00** |' in md                      # called: bold
  star_minus_l2 = next(line for line in md.splitlines() if line.startswith('| star − l2 | all |'))
  assert star_minus_l2.endswith('0.00 ± 1.00 | diverged | diverged |')     # per level, and the harm difference
  assert '| star_w0 (STAR (v2) + AWing, w = 0) | 9.50 ± 0.50 |' in md and '**+1.50 ± 0.50**' in md


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


def test_replot_rewrites_tables_and_plots_from_the_json(tmp_path):
  runs = []
  for loss, base in (('star', 0.05), ('none', 0.8)):
    for level, nme in ((0.0, base), (2.0, base + 0.01), (4.0, base + 0.02)):
      hist = [0.5, 0.2, 0.1, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01]
      cov = {'groups': {g: {'angle_median': 10.0 + level, 'aligned': 0.7, 'angle_hist': hist,
                            'anisotropy_median': 2.0 + level, 'std_major': 0.05, 'std_minor': 0.02, 'count': 10}
                        for g in scoring.GROUPS}, 'points': {}}
      runs.append({'variant': loss, 'loss': loss, 'level': level, 'seed': 0, 'nme': nme, 'nme_ambiguous': nme,
                   'nme_other': nme, 'train_seconds': 2.0, 'wall_seconds': 3.0, 'covariance': cov})
  doc = {'levels': [0.0, 2.0, 4.0], 'losses': ['star', 'none'], 'seeds': [0], 'ablations': [], 'ablation_level': 0.0,
         'runs': runs, 'total_seconds': 60.0, 'device': 'test', 'dataset': {'seconds': 1.0},
         'compile_seconds': {'star': 1.0, 'none': 1.0}}
  (tmp_path / 'results.json').write_text(json.dumps(doc))
  study_lib.replot(tmp_path, log=lambda _: None)
  md = (tmp_path / 'results.md').read_text()
  assert '| star (STAR (v2) + AWing) | 5.00 | 6.00 | 7.00 |' in md
  assert '| star | all | +1.00 | +2.00 |' in md
  assert '| star | 4 | 14 | 0.70 | 6.0 |' in md
  for name in ('nme_vs_ambiguity.png', 'axis_angles.png', 'covariance_vs_ambiguity.png'):
    assert (tmp_path / name).read_bytes()[:4] == b'\x89PNG'  # with an off-scale loss
  with pytest.raises(FileNotFoundError, match='run the study first'):
    study_lib.replot(tmp_path / 'nothing')


def _fake_record(study, variant, level, seed, nme):
  hist = [0.5, 0.2, 0.1, 0.05, 0.05, 0.04, 0.03, 0.02, 0.01]
  cov = {'groups': {g: {'angle_median': 20.0, 'aligned': 0.6, 'angle_hist': hist, 'anisotropy_median': 3.0,
                        'std_major': 0.05, 'std_minor': 0.02, 'count': 10} for g in scoring.GROUPS}, 'points': {}}
  digest = cells_lib.config_digest(cells_lib.run_config(study, variant, level, seed))
  return {'variant': variant, 'loss': cells_lib.variant_loss(variant)[0], 'level': level, 'seed': seed, 'nme': nme,
          'nme_ambiguous': nme, 'nme_other': nme, 'covariance': cov, 'compile_seconds': 5.0, 'train_seconds': 2.0,
          'wall_seconds': 3.0, 'config_digest': digest}


def test_partial_outputs_show_the_finished_levels_and_name_the_missing_cells(tmp_path):
  study = load_config('ambiguity_study', 'quick')
  with pytest.raises(FileNotFoundError, match='no level'):
    study_lib.partial_outputs(study, tmp_path)
  # Level 0 finished for both seeds and both losses, one cell of level 4: level 0 is shown, level 4 named.
  done = [(v, 0.0, s) for s in (0, 1) for v in ('star', 'l2')] + [('star', 4.0, 0)]
  for k, (variant, level, seed) in enumerate(done):
    cell = tmp_path / 'runs' / cells_lib.cell_name(variant, level, seed)
    cell.mkdir(parents=True)
    (cell / 'cell.json').write_text(json.dumps(_fake_record(study, variant, level, seed, 0.05 + 0.01 * k)))
  doc = study_lib.partial_outputs(study, tmp_path, log=lambda _: None)
  assert doc['levels'] == [0.0] and doc['ablations'] == [] and len(doc['runs']) == 4
  assert doc['partial']['finished'] == 5 and 'l2_amb4_seed0' in doc['partial']['missing']
  md = (tmp_path / 'results.md').read_text()
  assert md.startswith('**Partial results: 5 of 10 cells finished.**') and '| loss | level 0 |' in md
  assert (tmp_path / 'nme_vs_ambiguity.png').read_bytes()[:4] == b'\x89PNG'
  # A finished cell of another config is an error, not silently shown.
  stale = tmp_path / 'runs' / 'star_amb0_seed0' / 'cell.json'
  stale.write_text(json.dumps(dict(json.loads(stale.read_text()), config_digest='0' * 16)))
  with pytest.raises(study_lib.StaleCellError, match='another config'):
    study_lib.partial_outputs(study, tmp_path)


def test_a_cell_stopped_by_sigterm_stops_the_study_without_a_record(tmp_path, monkeypatch):
  from star_jax.training import loop
  study = load_config('ambiguity_study', 'quick')
  workdir = tmp_path / 'runs' / 'star_amb0_seed0'
  # The trainer stopped early (SIGTERM): it saved step 2 of 3 and returned no evaluation.
  (workdir / 'checkpoints' / '2').mkdir(parents=True)
  monkeypatch.setattr(loop, 'train_and_evaluate', lambda config, workdir: {})
  with pytest.raises(study_lib.CellInterruptedError, match='step 2 of 3'):
    study_lib.run_cell(study, 'star', 0.0, 0, tmp_path, log=lambda _: None)
  assert not (workdir / 'cell.json').exists()
