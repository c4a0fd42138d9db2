"""The README recipe "Your own data", end to end on a tiny folder of real photos with 68-point .pts
files: fine-tune the (tiny) official WFLW checkpoint with configs/own.py:finetune (building the
dataset on the way), evaluate, predict, export."""

import json

import numpy as np
import pytest

from conftest import REPO, run_command
from star_jax import evaluate
from star_jax import export
from star_jax import predict
from star_jax import train
from star_jax_datasets.own_faces import fake_data

REAL_FACES = REPO / 'tests' / 'testdata' / 'real_faces'
OWN = f'--config={REPO / "configs" / "own.py"}:tiny'
# The official network's tiny twin (4 stacks, 32 channels, 64 px, WFLW's 98 points; tests/testdata).
WFLW_PKL = REPO / 'tests' / 'testdata' / 'tiny_wflw_checkpoint.pkl'


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """Six photos with .pts files and a layout file of the same 68 points (a copy of 300W's)."""
  root = tmp_path_factory.mktemp('own')
  fake_data.write_images(root / 'faces', REAL_FACES)
  (root / 'my68.json').write_text(json.dumps({'base': '300W', 'name': 'my68'}))
  return root


def test_finetune_evaluate_predict_export_on_your_own_photos(folder, tmp_path, capsys, monkeypatch):
  data = [f'--config.data.manual_dir={folder / "faces"}', f'--config.data.data_dir={tmp_path / "tfds"}',
          f'--config.layout={folder / "my68.json"}', '--config.data.own.test_fraction=0.34']
  workdir = tmp_path / 'run'
  # 98 official points into 68 of ours: all but the heads comes from the checkpoint (here the first
  # two of its four stacks: the tiny config's network, quicker to compile).
  monkeypatch.chdir(tmp_path)
  proc = run_command(train.main, f'{OWN},finetune', f'--workdir={workdir}', *data, f'--config.init_from={WFLW_PKL}',
                     '--config.init_from_strict=False', '--config.progress=False', '--config.total_steps=1',
                     '--config.ema=False')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'initialised from {WFLW_PKL} (official)' in proc.stderr and 'out_heatmaps' in proc.stderr
  assert (tmp_path / 'tfds' / 'own_faces' / 'default' / '1.0.0').is_dir()   # built on the way

  out = tmp_path / 'report'
  assert evaluate.main(['evaluate', OWN, f'--checkpoint={workdir}', *data, f'--output={out}', '--noprogress']) == 0
  doc = json.loads((out / 'metrics.json').read_text())
  assert doc['info']['layout'] == 'my68' and doc['info']['num_points'] == 68 and doc['published'] == {}
  assert [(r['subset'], r['num_images']) for r in doc['rows']] == [('all', 2)]   # no attribute subsets
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert doc['rows'][0]['nme'] == pytest.approx(100 * final['model/nme'], rel=1e-5)

  # The checkpoint carries its layout: predict and export need neither the layout file nor the dataset.
  (folder / 'my68.json').rename(folder / 'moved.json')
  try:
    assert predict.main(['predict', '--checkpoint', str(workdir), str(folder / 'faces' / 'takeo.png'),
                         '--output', str(tmp_path / 'pred'), '--box', '10,20,70,100']) == 0
    assert export.main(['export', '--checkpoint', str(workdir), '--output', str(tmp_path / 'mine.stablehlo'),
                        '--format', 'stablehlo', '--platforms', 'cpu']) == 0
  finally:
    (folder / 'moved.json').rename(folder / 'my68.json')
  record = json.loads((tmp_path / 'pred' / 'takeo.json').read_text())
  assert record['layout'] == 'my68' and np.array(record['faces'][0]['landmarks']).shape == (68, 2)
  assert 'my68 68 points, input 64x64' in capsys.readouterr().out
  exported = export.load_stablehlo(tmp_path / 'mine.stablehlo')
  assert exported(np.zeros((1, 64, 64, 3), np.float32))[0].shape == (1, 68, 2)


def test_a_malformed_annotation_stops_training_with_its_file_and_line(tmp_path, capsys):
  fake_data.write_images(tmp_path / 'faces', REAL_FACES)
  pts = tmp_path / 'faces' / 'takeo_shifted.pts'
  lines = pts.read_text().splitlines()
  pts.write_text('\n'.join(lines[:20] + ['7.5'] + lines[21:]) + '\n')
  assert train.main(['train', OWN, f'--workdir={tmp_path / "run"}', f'--config.data.manual_dir={tmp_path / "faces"}',
                     f'--config.data.data_dir={tmp_path / "tfds"}']) == 1
  err = capsys.readouterr().err
  assert f'error: {pts}:21: expected a point "x y", got \'7.5\'' in err
