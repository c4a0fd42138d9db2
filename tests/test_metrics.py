"""Tests of star_jax.metrics against numbers computed by the official evaluation code.

tests/testdata/metrics_reference.npz (from the shared reference metrics.npz, official commit 9b12574;
rebuilt by scripts/make_test_data.py):
per dataset WFLW / 300W / COFW, the first 16 of its 200 (pred, gt) landmark sets, and per normalisation
'ocular' / 'pupil' the official NME of all 200 images, FR, AUC and the threshold used.
"""

import numpy as np
import pytest

from star_jax import layouts, metrics

DATASETS = ('WFLW', '300W', 'COFW')
NORMS = ('ocular', 'pupil')


@pytest.fixture
def ref(data_dir):
  with np.load(data_dir / 'metrics_reference.npz') as f:
    return dict(f)


@pytest.mark.parametrize('norm', NORMS)
@pytest.mark.parametrize('dataset', DATASETS)
def test_nme_matches_official(ref, dataset, norm):
  layout = layouts.get_layout(dataset)
  nmes = metrics.nme_per_image(ref[f'{dataset}/pred'], ref[f'{dataset}/gt'], layout, norm)
  assert nmes.dtype == np.float64 and nmes.shape == (16,)
  np.testing.assert_allclose(nmes, ref[f'{dataset}/{norm}/nme_per_image'][:16], rtol=0, atol=1e-9)


@pytest.mark.parametrize('norm', NORMS)
@pytest.mark.parametrize('dataset', DATASETS)
def test_fr_auc_match_official(ref, dataset, norm):
  # 300W's threshold 0.05 gives an even-length grid (502 points), where Simpson's rule variants differ.
  nmes = ref[f'{dataset}/{norm}/nme_per_image']
  fr, auc = metrics.fr_auc(nmes, float(ref[f'{dataset}/{norm}/threshold']))
  assert fr == pytest.approx(float(ref[f'{dataset}/{norm}/fr']), abs=1e-9)
  assert auc == pytest.approx(float(ref[f'{dataset}/{norm}/auc']), abs=1e-9)


def test_nme_in_float64_is_close_to_float32(ref):
  pred, gt = ref['300W/pred'], ref['300W/gt']
  nmes64 = metrics.nme_per_image(pred, gt, layouts.W300, 'pupil', dtype=np.float64)
  np.testing.assert_allclose(nmes64, ref['300W/pupil/nme_per_image'][:16], rtol=1e-5)
  assert not np.array_equal(nmes64, ref['300W/pupil/nme_per_image'][:16])   # really computed in float64


def test_nme_by_hand():
  layout = layouts.COFW                                   # pupils are points 16 and 17
  gt = np.zeros((1, 29, 2))
  gt[0, 17] = (4.0, 0.0)                                 # inter-pupil distance 4
  pred = gt.copy()
  pred[0, 3] += (3.0, 4.0)                               # one point off by 5
  np.testing.assert_allclose(metrics.nme_per_image(pred, gt, layout), [5 / 4 / 29])
  # 300W pupil norm is the distance between the means of points 36-41 and 42-47.
  gt = np.zeros((1, 68, 2))
  gt[0, 42:48] = (2.0, 0.0)
  gt[0, 36] = (0.0, 6.0)                                 # mean of 36-41 is (0, 1): distance sqrt(5)
  pred = gt + (1.0, 0.0)
  np.testing.assert_allclose(metrics.nme_per_image(pred, gt, layouts.W300, 'pupil'), [1 / np.sqrt(5)])


def test_fr_auc_by_hand():
  # NMEs spread uniformly on [0, 0.2): half fail at threshold 0.1; the CED rises linearly to 0.5,
  # so the AUC (area / threshold) is 0.25, up to the grid's resolution.
  nmes = (np.arange(1000) + 0.5) / 1000 * 0.2
  fr, auc = metrics.fr_auc(nmes, 0.1)
  assert fr == 0.5
  assert auc == pytest.approx(0.25, abs=1e-3)
  assert metrics.fr_auc(np.zeros(5), 0.1) == (0.0, 1.0)
  assert metrics.fr_auc(np.full(5, np.nan), 0.1) == (1.0, 0.0)     # NaN counts as a failure


def test_ced_counts_nme_at_or_below_each_grid_point():
  xs, ys = metrics.ced(np.array([0.0, 0.02, 0.02, 0.5]), 0.05, step=0.01)
  np.testing.assert_allclose(xs, [0.0, 0.01, 0.02, 0.03, 0.04, 0.05], atol=1e-12)
  np.testing.assert_allclose(ys, [0.25, 0.25, 0.75, 0.75, 0.75, 0.75])


def test_summarize_overall_and_per_attribute(ref):
  pred, gt = ref['WFLW/pred'], ref['WFLW/gt']
  nmes = metrics.nme_per_image(pred, gt, layouts.WFLW)
  flags = np.zeros((16, 6), int)
  flags[::2, 0] = 1                                      # pose: even images
  flags[:3, 4] = 1                                       # occlusion: the first three
  summary = metrics.summarize(pred, gt, layouts.WFLW, attributes=flags)
  assert summary['nme'] == pytest.approx(nmes.mean()) and summary['count'] == 16
  assert (summary['fr'], summary['auc']) == metrics.fr_auc(nmes, 0.1)
  assert summary['pose/nme'] == pytest.approx(nmes[::2].mean()) and summary['pose/count'] == 8
  assert (summary['occlusion/fr'], summary['occlusion/auc']) == metrics.fr_auc(nmes[:3], 0.1)
  assert summary['blur/count'] == 0 and np.isnan(summary['blur/nme'])
  # The same subsets given by name.
  by_name = metrics.summarize(pred, gt, layouts.WFLW, attributes={'pose': flags[:, 0]})
  assert by_name['pose/nme'] == summary['pose/nme'] and 'blur/nme' not in by_name
  # 300W's default threshold is 0.05.
  nmes300 = metrics.nme_per_image(ref['300W/pred'], ref['300W/gt'], layouts.W300)
  assert metrics.summarize(ref['300W/pred'], ref['300W/gt'], layouts.W300)['fr'] == metrics.fr_auc(nmes300, 0.05)[0]


def test_bad_input_is_reported(ref):
  pred, gt = ref['WFLW/pred'], ref['WFLW/gt']
  with pytest.raises(ValueError, match='98 points'):
    metrics.nme_per_image(pred[:, :68], gt[:, :68], layouts.WFLW)
  with pytest.raises(ValueError, match='both be'):
    metrics.nme_per_image(pred, gt[:4], layouts.WFLW)
  with pytest.raises(ValueError, match="norm must be 'ocular' or 'pupil'"):
    metrics.nme_per_image(pred, gt, layouts.WFLW, 'chin')
  with pytest.raises(ValueError, match='no attribute'):
    metrics.summarize(pred, gt, layouts.WFLW, attributes={'hat': np.ones(16)})
  with pytest.raises(ValueError, match=r'\(images, 6\)'):
    metrics.summarize(pred, gt, layouts.WFLW, attributes=np.ones((16, 2)))
