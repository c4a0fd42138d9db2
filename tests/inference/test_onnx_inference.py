"""Inference without JAX: an exported ONNX file run by onnxruntime through FaceLandmarker and
`python -m star_jax.predict --model`, on real photos and a video, against the JAX path.

The JAX-free run is a subprocess whose interpreter cannot import JAX or its stack: a sitecustomize
module on PYTHONPATH puts a finder first on sys.meta_path that refuses jax, jaxlib, flax, orbax,
optax, chex, tensorflow and tensorflow_datasets (an ImportError, as on an install without them) and
logs every attempt, and at exit writes the top-level modules the process had loaded. The model is
the tiny model trained by the train command (conftest's trained_tiny: WFLW layout, input 64, 2
stacks), exported by the export command (its default step and weights: trained_tiny_onnx), and the
JAX path runs the same step and weights of its checkpoint.
"""

import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

import cv2
import numpy as np
import pytest

from conftest import DATA, REPO
from star_jax import export, predict
from star_jax.inference import landmarker as landmarker_lib
from star_jax.inference import onnx_model

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ('jax2onnx', 'onnx', 'onnxruntime')),
    reason="exporting needs the 'export' extra (jax2onnx, onnx, onnxruntime)")

BLOCKED = ('jax', 'jaxlib', 'flax', 'orbax', 'optax', 'chex', 'tensorflow', 'tensorflow_datasets')
LANDMARK_TOLERANCE_PX = 1e-2   # image pixels, between the ONNX and the JAX path
COV_RTOL = 1e-3

SITECUSTOMIZE = textwrap.dedent('''
    import atexit, os, sys

    BLOCKED = {blocked!r}
    LOG = os.environ['STAR_JAX_BLOCK_LOG']


    class _Blocker:
      def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in BLOCKED:
          with open(LOG, 'a') as f:
            f.write('attempt ' + name + '\\n')
          raise ImportError(f'{{name}} is blocked in this test (no JAX installed)')
        return None


    sys.meta_path.insert(0, _Blocker())


    @atexit.register
    def _loaded():
      with open(LOG, 'a') as f:
        f.write('loaded ' + ' '.join(sorted({{m.split('.')[0] for m in sys.modules}})) + '\\n')
    ''').format(blocked=BLOCKED)


@pytest.fixture(scope='module')
def tiny_onnx(trained_tiny_onnx):
  return trained_tiny_onnx[0]


@pytest.fixture(scope='module')
def checkpoint(trained_tiny):
  """The exported model's checkpoint: the training workdir, and the flags choosing what was exported."""
  return trained_tiny[0], ()     # the export's defaults are every reader's: no flags


@pytest.fixture(scope='module')
def jax_landmarker(checkpoint):
  """The JAX path of the exported model, through the API, with its defaults."""
  return landmarker_lib.FaceLandmarker.from_checkpoint(checkpoint[0])


@pytest.fixture(scope='module')
def inputs(tmp_path_factory):
  """A folder with two real photos (one face each) and a 6-frame MP4 of one of them moving."""
  folder = tmp_path_factory.mktemp('inputs')
  for name in ('takeo.png', 'breakingbad.jpg'):
    shutil.copy(DATA / 'real_faces' / name, folder / name)
  image = cv2.imread(str(DATA / 'real_faces' / 'breakingbad.jpg'))
  h, w = image.shape[:2]
  writer = cv2.VideoWriter(str(folder / 'clip.mp4'), cv2.VideoWriter_fourcc(*'mp4v'), 25.0, (w, h))
  for i in range(6):
    shift = np.float32([[1, 0, 2 * i], [0, 1, -i]])
    writer.write(cv2.warpAffine(image, shift, (w, h), borderMode=cv2.BORDER_REPLICATE))
  writer.release()
  return folder


def _without_jax(tmp_path, argv):
  """Runs `python -m star_jax.predict argv` where JAX cannot be imported; returns (process, log lines)."""
  site = tmp_path / 'blocker'
  site.mkdir(exist_ok=True)
  (site / 'sitecustomize.py').write_text(SITECUSTOMIZE)
  log = tmp_path / 'imports.log'
  log.unlink(missing_ok=True)
  env = dict(os.environ, STAR_JAX_BLOCK_LOG=str(log),
             PYTHONPATH=os.pathsep.join([str(site)] + [p for p in [os.environ.get('PYTHONPATH')] if p]))
  proc = subprocess.run([sys.executable, '-m', 'star_jax.predict', *argv], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)
  return proc, log.read_text().splitlines() if log.exists() else []


def _faces(record):
  return [(np.array(f['landmarks']), np.array(f['covariances'])) for f in record['faces']]


def _assert_close(onnx_faces, jax_faces, what):
  assert len(onnx_faces) == len(jax_faces) > 0, what
  for (lm, cov), (want_lm, want_cov) in zip(onnx_faces, jax_faces):
    assert np.abs(lm - want_lm).max() < LANDMARK_TOLERANCE_PX, what
    rel = np.linalg.norm(cov - want_cov, axis=(-2, -1)) / np.linalg.norm(want_cov, axis=(-2, -1))
    assert rel.max() < COV_RTOL, what


def test_predict_with_an_onnx_model_imports_no_jax_and_matches_the_jax_path(checkpoint, tiny_onnx, inputs, tmp_path):
  common = [str(inputs / 'takeo.png'), str(inputs / 'breakingbad.jpg'), str(inputs / 'clip.mp4'), '--show_ambiguity']
  proc, log = _without_jax(tmp_path, ['--model', str(tiny_onnx), '--output', str(tmp_path / 'onnx'),
                                      *common])
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert '2 image(s), 2 face(s) written' in proc.stdout and 'clip.mp4: 6 frames (6 with a face)' in proc.stdout
  # Nothing even tried to import JAX's stack, and it is not loaded at exit (the blocker did run: the
  # log has its exit line).
  assert not [line for line in log if line.startswith('attempt')], log
  (loaded,) = [line.split()[1:] for line in log if line.startswith('loaded')]
  assert 'onnxruntime' in loaded and 'star_jax' in loaded
  assert not set(loaded) & set(BLOCKED)

  # The JAX path on the same checkpoint, step and weights, in this process.
  assert predict.main(['predict', '--checkpoint', str(checkpoint[0]), *checkpoint[1], '--output',
                       str(tmp_path / 'jax'), *common]) == 0
  for stem in ('takeo', 'breakingbad'):
    got = json.loads((tmp_path / 'onnx' / f'{stem}.json').read_text())
    want = json.loads((tmp_path / 'jax' / f'{stem}.json').read_text())
    assert got['checkpoint'] == str(tiny_onnx) and got['layout'] == want['layout'] == 'WFLW'
    assert got['num_points'] == 98 and got['weights'] == want['weights'] and got['step'] == want['step']
    assert [f['box'] for f in got['faces']] == [f['box'] for f in want['faces']]
    assert [f['crop']['refined'] for f in got['faces']] == [f['crop']['refined'] for f in want['faces']]
    _assert_close(_faces(got), _faces(want), stem)
  got = json.loads((tmp_path / 'onnx' / 'clip_landmarks.json').read_text())
  want = json.loads((tmp_path / 'jax' / 'clip_landmarks.json').read_text())
  assert got['tracking'] == want['tracking'] and len(got['frames']) == len(want['frames']) == 6
  for g, w in zip(got['frames'], want['frames']):
    _assert_close(_faces(g), _faces(w), f'video frame {g["frame"]}')
  with open(tmp_path / 'onnx' / 'clip_landmarks.csv') as f:
    rows = list(csv.reader(f))
  assert len(rows) == 7 and len(rows[1]) == len(rows[0])


def test_the_api_runs_an_onnx_file_like_the_checkpoint(tiny_onnx, jax_landmarker, data_dir):
  image = str(data_dir / 'real_faces' / 'takeo.png')
  for onnx_landmarker in (landmarker_lib.FaceLandmarker.from_onnx(tiny_onnx),
                          landmarker_lib.FaceLandmarker.from_checkpoint(tiny_onnx)):
    assert (onnx_landmarker.image_size, onnx_landmarker.layout) == (64, 'WFLW')
    assert onnx_landmarker.describe() == dict(jax_landmarker.describe(), checkpoint=str(tiny_onnx))
    got, want = onnx_landmarker(image), jax_landmarker(image)
    _assert_close([(f.landmarks, f.covariances) for f in got], [(f.landmarks, f.covariances) for f in want], 'API')
  # Three faces at once: no padding to a power of two for a dynamic batch, the same answers.
  boxes = [f.box for f in want] * 3
  got = landmarker_lib.FaceLandmarker.from_onnx(tiny_onnx, covariances=False)(image, boxes)
  assert len(got) == 3 and got[0].covariances is None
  np.testing.assert_allclose(got[2].landmarks, got[0].landmarks, atol=1e-4)
  with pytest.raises(ValueError, match='step= do not apply to an ONNX model'):
    landmarker_lib.FaceLandmarker.from_checkpoint(tiny_onnx, step=3)


def _strip_metadata(source, target):
  import onnx  # pylint: disable=import-outside-toplevel
  model = onnx.load(str(source))
  del model.metadata_props[:]
  onnx.save(model, str(target))


def _identity_model(path, metadata):
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import TensorProto, helper  # pylint: disable=import-outside-toplevel
  x = helper.make_tensor_value_info('image', TensorProto.FLOAT, ['N', 64, 64, 3])
  y = helper.make_tensor_value_info('landmarks', TensorProto.FLOAT, ['N', 64, 64, 3])
  graph = helper.make_graph([helper.make_node('Identity', ['image'], ['landmarks'])], 'g', [x], [y])
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
  model.ir_version = 8
  helper.set_model_props(model, metadata)
  onnx.save(model, str(path))


def test_onnx_files_that_break_the_contract_get_one_line_errors(tiny_onnx, inputs, tmp_path, capsys):
  bare, identity, garbage = tmp_path / 'bare.onnx', tmp_path / 'identity.onnx', tmp_path / 'garbage.onnx'
  _strip_metadata(tiny_onnx, bare)
  _identity_model(identity, {'contract': 'x', 'image_size': '64', 'num_points': '98'})
  garbage.write_bytes(b'not an onnx file')
  expected = {
      bare: 'not a star_jax landmark model (export it with python -m star_jax.export): its metadata lacks '
            'contract, image_size, num_points',
      identity: "'landmarks' is tensor(float) (N, 64, 64, 3); the contract with the metadata's image_size 64 and "
                'num_points 98 is tensor(float) (N, 98, 2)',
      garbage: 'onnxruntime cannot load it as an ONNX model',
      tmp_path / 'missing.onnx': 'does not exist',
  }
  for path, message in expected.items():
    status = predict.main(['predict', '--model', str(path), str(inputs / 'takeo.png'), '--output',
                           str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert status == 1 and err.startswith('error: ') and message in err and err.count('\n') == 1, err
  with pytest.raises(onnx_model.OnnxModelError, match='its metadata lacks'):
    onnx_model.OnnxNetwork(bare)
  # Flags that only mean something for a checkpoint are refused, as is giving both or neither.
  for argv in (['--model', str(tiny_onnx), '--step', '3'], ['--model', str(tiny_onnx), '--checkpoint', str(tmp_path)],
               []):
    assert predict.main(['predict', *argv, str(inputs / 'takeo.png'), '--output', str(tmp_path / 'out')]) == 2
    err = capsys.readouterr().err
    assert err.startswith('error: ') and ('--model' in err.splitlines()[0] or '--step' in err.splitlines()[0])


def test_normalised_frame_round_trip():
  l = np.array([[[-1.0, 1.0], [0.25, -0.5]]], np.float32)
  cov = np.array([[[[1e-3, 2e-4], [2e-4, 5e-4]]] * 2], np.float32)
  back = onnx_model.to_normalized(*export.to_crop_pixels(l, cov, 256), 256)
  np.testing.assert_allclose(back[0], l, atol=1e-6)
  np.testing.assert_allclose(back[1], cov, rtol=1e-6)
