"""End to end tests of the evaluate command (star_jax/evaluate.py, scripts/evaluate.py) on the tiny
synthetic dataset, and of the report helpers (star_jax/evaluation/report.py)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import DATA, OFFICIAL_TINY_FLAGS, REPO, TINY_CONFIG as TINY, load_config, metric_records
from star_jax import evaluate
from star_jax.evaluation import report


def _config(name: str, arg: str = 'tiny'):
  return load_config(name, arg)


@pytest.fixture(scope='module')
def tfds_dir(tiny_tfds_dir):
  """The tiny synthetic dataset (wflw98_tiny: 16 test faces)."""
  return tiny_tfds_dir


@pytest.fixture(scope='module')
def checkpoint(tmp_path_factory):
  """A freshly initialised model of configs/synthetic.py:tiny, saved with 'model' and a different 'ema'."""
  import jax
  from flax import nnx
  from star_jax import models
  from star_jax import checkpoints

  config = _config('synthetic')
  model = models.create_model(config, nnx.Rngs(0))
  ema = models.create_model(config, nnx.Rngs(1))
  directory = tmp_path_factory.mktemp('ckpt') / 'run'
  checkpoints.save_model_checkpoint(directory, model=model, config=config, ema=ema, step=7)
  jax.clear_caches()
  return directory


def _run(*args) -> int:
  """evaluate.main in this process, on configs/synthetic.py:tiny unless `args` name another --config."""
  config = [] if any(a.startswith('--config=') for a in args) else [TINY]
  return evaluate.main(['evaluate.py', *config, *args])


def test_evaluate_writes_a_consistent_report(checkpoint, tfds_dir, tmp_path, capsys):
  out = tmp_path / 'report'
  assert _run(f'--checkpoint={checkpoint}', f'--config.data.data_dir={tfds_dir}', f'--output={out}',
              '--noprogress', '--config.eval_batch_size=6') == 0
  printed = capsys.readouterr().out
  assert sorted(p.name for p in out.iterdir()) == ['ced.png', 'metrics.json', 'predictions.json', 'report.md']
  assert (out / 'report.md').read_text() in printed
  report = json.loads((out / 'metrics.json').read_text())
  info, rows = report['info'], report['rows']
  assert (info['step'], info['weights'], info['num_images'], info['norm']) == (7, 'ema', 16, 'ocular')
  assert info['images_per_second_model'] > 0 and report['published'] == {}  # synthetic: no paper numbers
  assert [r['subset'] for r in rows] == ['all', 'pose', 'expression', 'illumination', 'makeup', 'occlusion',
                                         'blur']

  # Per-image predictions, in split order with their names and the original pixel ground truth.
  from star_jax.data import build
  import ml_collections
  source = build.load_source(ml_collections.ConfigDict(
      {'name': 'synthetic_faces', 'config': 'wflw98_tiny', 'data_dir': str(tfds_dir), 'manual_dir': ''}), 'test')
  images = json.loads((out / 'predictions.json').read_text())['images']
  assert [im['image_name'] for im in images] == [source[i]['image_name'].decode() for i in range(16)]
  gt = np.array([im['ground_truth'] for im in images])
  np.testing.assert_allclose(gt, np.stack([source[i]['landmarks'] for i in range(16)]), atol=1e-3)
  pred = np.array([im['landmarks'] for im in images])
  assert pred.shape == (16, 98, 2) and np.all(np.isfinite(pred))

  # The table agrees with the per-image NMEs: overall and per attribute subset (flag == 1).
  nmes = np.array([im['nme'] for im in images])
  flags = np.stack([source[i]['attributes'] for i in range(16)])
  assert rows[0]['nme'] == pytest.approx(100 * nmes.mean(), rel=1e-6) and rows[0]['num_images'] == 16
  for k, row in enumerate(rows[1:]):
    members = flags[:, k] == 1
    assert row['num_images'] == members.sum()
    if members.any():
      assert row['nme'] == pytest.approx(100 * nmes[members].mean(), rel=1e-6)
  # An untrained network: NME of order 1, every image a failure at 0.1.
  assert 5 < rows[0]['nme'] < 300 and rows[0]['fr'] == 100.0 and rows[0]['auc'] == 0.0

  # The image-frame NME from the pixel predictions matches the report's.
  from star_jax import layouts
  from star_jax import metrics
  nme_image = metrics.nme_per_image(pred, gt, layouts.WFLW).mean()
  assert report['summary']['nme_image'] == pytest.approx(nme_image, rel=1e-3)


def test_evaluate_predictions_are_the_networks_on_the_official_crop(checkpoint, tfds_dir, tmp_path):
  # Redo image 3 by hand: the record's crop, the network (EMA weights), and back to image pixels.
  from star_jax import models
  from star_jax.data import build
  from star_jax import checkpoints
  from star_jax.data import transforms
  import ml_collections

  out = tmp_path / 'report'
  assert _run(f'--checkpoint={checkpoint}', f'--config.data.data_dir={tfds_dir}', f'--output={out}',
              '--noprogress', '--config.data.max_eval_examples=4', '--weights=model') == 0
  images = json.loads((out / 'predictions.json').read_text())['images']
  assert len(images) == 4 and json.loads((out / 'metrics.json').read_text())['info']['weights'] == 'model'
  source = build.load_source(ml_collections.ConfigDict(
      {'name': 'synthetic_faces', 'config': 'wflw98_tiny', 'data_dir': str(tfds_dir), 'manual_dir': ''}), 'test')
  record = source[3]
  loaded = checkpoints.load_model(checkpoint, weights='model')
  model, config = loaded.model, loaded.config
  size = config.data.image_size
  matrix = transforms.crop_matrix(float(record['scale']), record['center'], size)
  crop = transforms.warp(record['image'], matrix, size)
  normalised = np.asarray(model(models.preprocess(crop[None]))[-1]['landmarks'])
  expected = transforms.map_back(normalised, matrix[None], size)[0]
  np.testing.assert_allclose(np.array(images[3]['landmarks']), expected, atol=2e-2)


def test_evaluate_converts_a_pytorch_checkpoint_on_the_fly(tfds_dir, tmp_path):
  # The tiny official network (4 stacks, 32 channels, input 64), straight from its .pkl.
  out = tmp_path / 'report'
  assert _run(f'--pytorch={DATA / "tiny_wflw_checkpoint.pkl"}',
              *OFFICIAL_TINY_FLAGS, f'--config.data.data_dir={tfds_dir}',
              f'--output={out}', '--noprogress', '--config.data.max_eval_examples=2') == 0
  info = json.loads((out / 'metrics.json').read_text())['info']
  assert info['weights'] == 'net' and info['pytorch'].endswith('tiny_wflw_checkpoint.pkl')
  assert info['num_images'] == 2


@pytest.mark.parametrize('args, message', [
    (['--checkpoint={missing}'], 'does not exist'),
    (['--checkpoint={empty}'], 'no checkpoint'),
    ([], 'exactly one of --checkpoint'),
    (['--checkpoint={ckpt}', f'--config={REPO / "configs" / "cofw.py"}:tiny'], 'COFW layout (29 points)'),
    (['--checkpoint={ckpt}', '--config.data.image_size=128'], '--config.data.image_size=64'),
    (['--checkpoint={ckpt}', f'--config={REPO / "configs" / "wflw.py"}:tiny', '--config.data.data_dir={empty}'],
     'python -m star_jax.data.build --dataset wflw'),
])
def test_evaluate_errors(args, message, checkpoint, tmp_path, capsys):
  (tmp_path / 'empty').mkdir()
  paths = {'missing': tmp_path / 'missing', 'empty': tmp_path / 'empty', 'ckpt': checkpoint}
  assert _run(*[a.format(**paths) for a in args]) == 1
  err = capsys.readouterr().err
  assert err.startswith('error: ') and message in err


def test_command_line_exits_non_zero_with_the_message(tmp_path):
  proc = subprocess.run([sys.executable, str(REPO / 'scripts' / 'evaluate.py'), TINY,
                         f'--checkpoint={tmp_path / "nope"}'], capture_output=True, text=True, cwd=REPO,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), timeout=120)
  assert proc.returncode == 1 and f'checkpoint directory {tmp_path / "nope"} does not exist' in proc.stderr


def test_published_numbers_and_table():
  wflw, w300, cofw, synthetic = (_config(n, '') for n in ('wflw', '300w', 'cofw', 'synthetic'))
  assert report.published_numbers(wflw, 'ocular') == {'all': {'nme': 4.02, 'fr': 2.32, 'auc': 0.605}}
  assert report.published_numbers(w300, 'ocular') == {
      'all': {'nme': 2.87}, 'common': {'nme': 2.52}, 'challenge': {'nme': 4.32}}
  assert report.published_numbers(cofw, 'pupil') == {'all': {'nme': 4.62}}
  assert report.published_numbers(cofw, 'ocular') == {'all': {'nme': 3.21}}
  assert report.published_numbers(wflw, 'pupil') == {}
  assert report.published_numbers(synthetic, 'ocular') == {}  # WFLW layout, but not the WFLW data

  from star_jax import layouts
  summary = {'nme': 0.0291, 'fr': 0.0036, 'auc': 0.4412, 'count': 689,
             'common/nme': 0.0255, 'common/fr': 0.0, 'common/auc': 0.5, 'common/count': 554,
             'challenge/nme': float('nan'), 'challenge/fr': float('nan'), 'challenge/auc': float('nan'),
             'challenge/count': 0}
  rows = report.subset_rows(summary, layouts.W300)
  assert [(r['subset'], r['num_images']) for r in rows] == [('all', 689), ('common', 554), ('challenge', 0)]
  assert rows[0]['nme'] == pytest.approx(2.91) and rows[0]['fr'] == pytest.approx(0.36)
  table = report.markdown_table(rows, report.published_numbers(w300, 'ocular'), 0.05)
  lines = table.splitlines()
  assert lines[0] == ('| subset | images | NME % | FR@0.05 % | AUC@0.05 | paper NME % | paper FR@0.05 % | '
                      'paper AUC@0.05 |')
  assert lines[2] == '| all | 689 | 2.910 | 0.36 | 0.4412 | 2.87 |  |  |'
  assert lines[4] == '| challenge | 0 | n/a | n/a | n/a | 4.32 |  |  |'


# ---- A checkpoint written by the trainer (conftest.trained_tiny): evaluate and predict end to end ---

def test_evaluate_and_predict_a_training_workdir(trained_tiny, tfds_dir, tmp_path, capsys):
  from star_jax import predict
  from star_jax.data import synthetic

  workdir = trained_tiny[0]
  # The trainer's checkpoint (with its optimizer state and data iterator) loads by its workdir, and
  # our evaluation reproduces the trainer's own evaluation of the weights that won its best step (the
  # official model selection: the better of the weights and their EMA at each evaluation, the lowest
  # of those over the run, the earliest on a tie).
  evaluations, winners = metric_records(workdir, 'eval/nme'), metric_records(workdir, 'eval/best_weights')
  best = min(sorted(evaluations), key=evaluations.get)
  out = tmp_path / 'report'
  assert _run(f'--checkpoint={workdir}', f'--config.data.data_dir={tfds_dir}', f'--output={out}',
              '--noprogress') == 0
  rows = json.loads((out / 'metrics.json').read_text())['rows']
  assert rows[0]['nme'] == pytest.approx(100 * evaluations[best], rel=1e-5)
  info = json.loads((out / 'metrics.json').read_text())['info']
  assert (info['step'], info['weights'], info['best_by_protocol']) == (best, winners[best], True)
  # The predict command runs on it too.
  face = synthetic.generate(0, 'test', 0)
  image = tmp_path / 'face.png'
  import cv2
  cv2.imwrite(str(image), cv2.cvtColor(face.image, cv2.COLOR_RGB2BGR))
  assert predict.main(['predict', '--checkpoint', str(workdir), str(image), '--output', str(tmp_path / 'pred'),
                       '--box', ','.join(str(float(v)) for v in face.box)]) == 0
  record = json.loads((tmp_path / 'pred' / 'face.json').read_text())
  assert np.array(record['faces'][0]['landmarks']).shape == (98, 2)
  # And on a real photograph, with the face found by the detector.
  assert predict.main(['predict', '--checkpoint', str(workdir), str(REPO / 'tests' / 'testdata' / 'real_faces' / 'takeo.png'),
                       '--output', str(tmp_path / 'real'), '--show-ambiguity']) == 0
  record = json.loads((tmp_path / 'real' / 'takeo.json').read_text())
  assert len(record['faces']) == 1 and np.array(record['faces'][0]['landmarks']).shape == (98, 2)
  assert (tmp_path / 'real' / 'takeo_landmarks.jpg').exists()


# ---- 300VW: scores per category and each video's temporal stability -------------------------------

@pytest.fixture(scope='module')
def vw_data(tmp_path_factory):
  """The tiny 300VW-style build (datasets/the300vw/fake_data.py: 3 test videos of 3, 3 and 2 frames)."""
  from star_jax.data import build
  from star_jax_datasets.the300vw import fake_data
  root = tmp_path_factory.mktemp('300vw')
  videos = fake_data.write(root / 'raw', REPO / 'tests' / 'testdata' / 'real_faces')
  build.build('the300vw', manual_dir=str(root / 'raw'), data_dir=str(root / 'data'))
  return root / 'data', videos


def test_evaluate_300vw_per_category_and_per_video(vw_data, tmp_path):
  import jax
  from flax import nnx
  from star_jax import models
  from star_jax.evaluation import temporal
  from star_jax.layouts import W300VW
  from star_jax import checkpoints

  data_dir, videos = vw_data
  # A 300W model (here untrained) runs under the 300VW config: the same points.
  config = _config('300w')
  checkpoint = tmp_path / 'ckpt'
  checkpoints.save_model_checkpoint(checkpoint, model=models.create_model(config, nnx.Rngs(0)), config=config)
  jax.clear_caches()
  out = tmp_path / 'report'
  assert _run(f'--config={REPO / "configs" / "300vw.py"}:tiny', f'--checkpoint={checkpoint}',
              f'--config.data.data_dir={data_dir}', f'--output={out}', '--noprogress') == 0
  doc = json.loads((out / 'metrics.json').read_text())
  assert [(r['subset'], r['num_images']) for r in doc['rows']] == [
      ('all', 8), ('category1', 3), ('category2', 3), ('category3', 2)]
  assert doc['published'] == {} and 'not in this code base' in (out / 'report.md').read_text()
  # Predictions in frame pixels, keyed by video and frame.
  images = json.loads((out / 'predictions.json').read_text())
  assert images['coordinates'] == '0-based video frame pixels (x, y)'
  keys = [(im['video'], im['frame']) for im in images['images']]
  assert keys == [(v, f) for v in ('114', '203', '410') for f in range(1, videos[v]['frames'] + 1)]
  gt = np.array([im['ground_truth'] for im in images['images']])
  np.testing.assert_allclose(gt, np.concatenate([videos[v]['landmarks'] for v in ('114', '203', '410')]), atol=2e-3)
  # Temporal stability: one row per video, recomputed from the predictions; category means.
  rows = doc['temporal']['videos']
  assert [(r['video'], r['subset'], r['frames'], r['pairs']) for r in rows] == [
      ('114', 'category1', 3, 2), ('203', 'category2', 3, 2), ('410', 'category3', 2, 1)]
  pred = np.array([im['landmarks'] for im in images['images']])
  again = temporal.per_video(pred, gt, [k[0] for k in keys], [k[1] for k in keys], W300VW)
  for row, want in zip(rows, again):
    assert row['jitter'] == pytest.approx(want['jitter'], abs=1e-4) and row['jitter'] > 0
    assert row['nme_change'] == pytest.approx(want['nme_change'], abs=1e-4)
  assert [s['subset'] for s in doc['temporal']['summary']] == ['all', 'category1', 'category2', 'category3']
  assert '## Temporal stability' in (out / 'report.md').read_text()


def test_temporal_stability_measures_the_change_of_the_error():
  from star_jax.evaluation import temporal
  from star_jax.layouts import W300

  rng = np.random.default_rng(0)
  gt = rng.uniform(0, 100, (6, 68, 2))
  gt[:, 36], gt[:, 45] = (10.0, 50.0), (30.0, 50.0)                  # inter-ocular distance 20 px
  videos, frames = ['a'] * 4 + ['b'] * 2, [1, 2, 3, 5, 7, 8]
  # A constant offset follows the face: error constant, no jitter.
  rows = temporal.per_video(gt + (2.0, -1.0), gt, videos, frames, W300)
  assert [(r['frames'], r['pairs']) for r in rows] == [(4, 2), (2, 1)]     # frames 3 -> 5 are not a pair
  assert all(r['jitter'] == pytest.approx(0, abs=1e-9) and r['nme_change'] == pytest.approx(0, abs=1e-9)
             for r in rows)
  assert rows[0]['nme'] == pytest.approx(np.sqrt(5) / 20)
  # One frame off by 4 px in x: the error vector moves by 4 px into that frame and back out of it.
  pred = gt.copy()
  pred[1] += (4.0, 0.0)
  row = temporal.per_video(pred, gt, videos, frames, W300)[0]
  assert row['jitter'] == pytest.approx(4 / 20)                          # (0.2 + 0.2) / 2 pairs
  assert row['nme_change'] == pytest.approx(4 / 20)
  summary = temporal.summarize(temporal.per_video(pred, gt, videos, frames, W300))
  assert summary[0]['videos'] == 2 and summary[0]['jitter'] == pytest.approx(0.1)   # mean over videos
