"""The Python API, star_jax.FaceLandmarker (star_jax/inference/landmarker.py)."""

import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from conftest import DATA, tiny_wflw_config
from star_jax import predict
from star_jax.inference import face_detect
from star_jax.inference import landmarker as landmarker_lib

FULL = DATA / 'real_faces_full'
PKL = DATA / 'tiny_wflw_checkpoint.pkl'


def _rgb(path):
  return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


@pytest.fixture
def landmarker(tiny_landmarker):
  return tiny_landmarker


def test_importing_star_jax_does_not_import_the_api():
  code = ('import sys, star_jax; assert "jax" not in sys.modules and "cv2" not in sys.modules;'
          'assert "FaceLandmarker" in dir(star_jax); L = star_jax.FaceLandmarker;'
          'from star_jax.inference.landmarker import FaceLandmarker; assert L is FaceLandmarker; print("ok")')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.stdout.strip() == 'ok', out.stderr[-2000:]


def test_one_image_by_path_or_array_with_detection_or_boxes(landmarker):
  faces = landmarker(FULL / 'einstein.jpg')             # default faces='all': both men
  assert len(faces) == 2 and faces[0].score >= faces[1].score >= face_detect.DEFAULT_SCORE_THRESHOLD
  for f in faces:
    assert f.landmarks.shape == (98, 2) and f.covariances.shape == (98, 2, 2)
    assert f.box_source == 'detector' and f.refined
    # Covariances in image px^2: symmetric and positive definite.
    np.testing.assert_allclose(f.covariances, f.covariances.transpose(0, 2, 1), atol=1e-3)
    assert np.all(np.linalg.eigvalsh(f.covariances) > 0)
  image = _rgb(FULL / 'einstein.jpg')
  again = landmarker(image)
  np.testing.assert_allclose(again[0].landmarks, faces[0].landmarks, atol=1e-4)
  # Given boxes: one box, a list of boxes, Face objects; no detection, score None.
  boxes = [tuple(float(v) for v in f.box) for f in faces]
  two = landmarker(image, boxes, refine=False)
  assert [f.box for f in two] == boxes and all(f.box_source == 'user' and f.score is None for f in two)
  (one,) = landmarker(image, [face_detect.Face(boxes[1], 0.5)], refine=False)
  np.testing.assert_allclose(one.landmarks, two[1].landmarks, atol=1e-3)      # the same crop
  grey = landmarker(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), boxes[1])        # grey: 3 channels made
  assert grey[0].landmarks.shape == (98, 2)
  assert landmarker(np.full((120, 160, 3), 128, np.uint8)) == []              # no face: an empty list


def test_a_batch_of_images_gives_one_list_per_image(landmarker):
  images = [FULL / 'takeo.png', np.full((100, 100, 3), 50, np.uint8), _rgb(FULL / 'einstein.jpg')]
  out = landmarker(images, boxes=[None, None, (340, 270, 460, 390)], refine=False)
  assert [len(faces) for faces in out] == [1, 0, 1] and out[2][0].box_source == 'user'
  alone = landmarker(FULL / 'takeo.png', refine=False)
  np.testing.assert_allclose(out[0][0].landmarks, alone[0].landmarks, atol=1e-3)
  with pytest.raises(ValueError, match='one entry per image'):
    landmarker(images, boxes=[None])


def test_the_predict_command_writes_what_the_api_returns(landmarker, tiny_wflw_checkpoint, tmp_path):
  out = tmp_path / 'out'
  assert predict.main(['predict', '--checkpoint', str(tiny_wflw_checkpoint), str(FULL / 'takeo.png'), '--output',
                       str(out), '--show_ambiguity']) == 0
  (face,) = json.loads((out / 'takeo.json').read_text())['faces']
  landmarker.faces = 'largest'
  try:
    (api,) = landmarker(FULL / 'takeo.png')
  finally:
    landmarker.faces = 'all'
  assert face == json.loads(json.dumps(api.to_dict()))


def test_an_official_pkl_is_converted_in_memory(landmarker):
  from_pkl = landmarker_lib.FaceLandmarker.from_checkpoint(PKL, config=tiny_wflw_config(), detector=None)
  from_dir = landmarker
  assert (from_pkl.weights, from_pkl.layout, from_pkl.image_size) == ('net', 'WFLW', 64)
  box = (31.0, 66.0, 135.0, 169.0)
  a, b = from_pkl(FULL / 'takeo.png', box)[0], from_dir(FULL / 'takeo.png', box)[0]
  np.testing.assert_allclose(a.landmarks, b.landmarks, atol=1e-4)
  np.testing.assert_allclose(a.covariances, b.covariances, rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match='no detector'):
    from_pkl(FULL / 'takeo.png')


def test_the_config_of_an_official_pkl_defaults_by_its_number_of_points():
  assert landmarker_lib._resolve_config(None, 98).layout == 'WFLW'     # pylint: disable=protected-access
  assert landmarker_lib._resolve_config(None, 68).layout == '300W'     # pylint: disable=protected-access
  assert landmarker_lib._resolve_config(None, 29).layout == 'COFW'     # pylint: disable=protected-access
  assert landmarker_lib._resolve_config('cofw', 29).layout == 'COFW'   # pylint: disable=protected-access
  with pytest.raises(ValueError, match='pass config='):
    landmarker_lib._resolve_config(None, 21)                            # pylint: disable=protected-access
  with pytest.raises(ValueError, match='98 points but'):
    landmarker_lib._resolve_config('300w', 98)                          # pylint: disable=protected-access
  # The tiny file is 98 points: the default config (full-size WFLW) is chosen, and does not fit it.
  with pytest.raises(ValueError, match='does not fit the model of its config'):
    landmarker_lib.FaceLandmarker.from_checkpoint(PKL, detector=None)


def test_errors(tmp_path, landmarker):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    landmarker_lib.FaceLandmarker.from_checkpoint(tmp_path / 'missing')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    landmarker(tmp_path / 'missing.jpg')
  (tmp_path / 'bad.jpg').write_bytes(b'not an image')
  with pytest.raises(ValueError, match='cannot read'):
    landmarker(tmp_path / 'bad.jpg')
  with pytest.raises(ValueError, match='uint8'):
    landmarker(np.zeros((10, 10, 3), np.float32))
  with pytest.raises(ValueError, match='no area'):
    landmarker(np.zeros((10, 10, 3), np.uint8), (5, 5, 5, 9))
  with pytest.raises(ValueError, match='faces must be'):
    landmarker_lib.FaceLandmarker(lambda x: x, 64, faces='first')
