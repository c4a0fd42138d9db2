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
  faces = landmarker(FULL / 'einstein.jpg')             # the fixture's faces='all': both men
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


def test_one_face_choice_and_one_record_of_the_weights_in_the_api_predict_and_the_demo(tiny_wflw_checkpoint,
                                                                                     tmp_path, capsys):
  # einstein.jpg holds two faces; by default the API, predict and the demo all take the largest.
  default = landmarker_lib.FaceLandmarker.from_checkpoint(tiny_wflw_checkpoint)
  (api,) = default(FULL / 'einstein.jpg')
  assert default.faces == 'largest' and np.abs(np.subtract(api.box, (349, 273, 458, 382))).max() < 10  # Einstein
  out = tmp_path / 'out'
  assert predict.main(['predict', '--checkpoint', str(tiny_wflw_checkpoint), str(FULL / 'einstein.jpg'),
                       '--output', str(out)]) == 0
  record = json.loads((out / 'einstein.json').read_text())
  (face,) = record['faces']
  np.testing.assert_allclose(face['landmarks'], api.landmarks, atol=1e-3)
  # Each says which weights ran and why: the JSON, the first line printed, the API's record.
  described = default.describe()
  assert {k: record[k] for k in ('step', 'weights', 'chosen_by')} == {k: described[k] for k in ('step', 'weights',
                                                                                              'chosen_by')}
  assert described['chosen_by'] == 'the latest step (no step holds an evaluation to rank by), its only weights'
  assert capsys.readouterr().out.startswith(f'running {default.summary()}\n')
  assert default.summary() == (f'{tiny_wflw_checkpoint} (step 0, model weights: {described["chosen_by"]}), WFLW '
                               'layout')
  pytest.importorskip('flask', reason="the demo extra (pip install -e '.[demo]') is not installed")
  from star_jax import demo
  answer = demo.make_app(default).test_client().post('/predict', data={'image': (open(FULL / 'einstein.jpg', 'rb'),
                                                                                 'einstein.jpg')})
  shown = answer.get_json()
  assert len(shown['faces']) == 1 and shown['faces'][0]['box'] == face['box']
  assert {k: shown[k] for k in described} == described


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


# ---- Bounded work per image ---------------------------------------------------------------------

class _NoFaces:
  def detect(self, image):
    return []


class _SpyDetector:
  """Records the size of every image the detector sees."""

  def __init__(self, detector):
    self.detector, self.shapes = detector, []

  def detect(self, image):
    self.shapes.append(image.shape)
    return self.detector.detect(image)


def test_a_large_photo_is_searched_on_a_reduced_copy_and_landmarked_at_full_resolution(landmarker):
  small = _rgb(FULL / 'breakingbad.jpg')                                       # 1920 x 1080
  big = cv2.resize(small, (4800, 2700), interpolation=cv2.INTER_CUBIC)
  spy = _SpyDetector(landmarker.detector)
  detector, landmarker.detector = landmarker.detector, spy
  try:
    faces = landmarker(big)
    assert spy.shapes == [(1152, 2048, 3)]                                   # detected on 2048 px
    # The boxes are in the big photo's pixels: those found on the 1920 px photo, x 2.5.
    reference = landmarker.detect(small)
    assert spy.shapes[-1] == small.shape                                      # 1920 px: as it is
    assert len(faces) == len(reference) == 2
    for f, r in zip(faces, reference):
      np.testing.assert_allclose(f.box, np.array(r.box) * 2.5, atol=0.06 * (r.box[2] - r.box[0]) * 2.5)
    # The landmarks are those of the full-resolution crops of these boxes.
    given = landmarker(big, [f.face for f in faces])
    for f, g in zip(faces, given):
      np.testing.assert_allclose(f.landmarks, g.landmarks, atol=1e-4)
    landmarker.detect_max_side, spy.detector = None, _NoFaces()               # off: the whole photo
    assert landmarker.detect(big) == [] and spy.shapes[-1] == big.shape
  finally:
    landmarker.detector, landmarker.detect_max_side = detector, landmarker_lib.DETECT_MAX_SIDE


def test_the_api_raises_its_documented_errors_for_huge_files_and_stray_boxes(landmarker, tmp_path):
  from bigimages import write_flat_png
  from star_jax.inference import image_io

  huge = write_flat_png(tmp_path / 'huge.png', 20000, 20000)
  with pytest.raises(image_io.ImageTooLargeError, match=r'huge\.png: 20000 x 20000'):
    landmarker(huge)
  # A list stops before any work at its bad image, which it names.
  with pytest.raises(image_io.ImageTooLargeError, match=r'huge\.png'):
    landmarker([FULL / 'takeo.png', huge])
  huger = write_flat_png(tmp_path / 'huger.png', 40000, 40000)               # over OpenCV's own limit
  landmarker.max_pixels = None
  try:
    with pytest.raises(image_io.ImageError, match=r'huger\.png: OpenCV cannot decode'):
      landmarker(huger)
  finally:
    landmarker.max_pixels = landmarker_lib.DEFAULT_MAX_PIXELS
  image = _rgb(FULL / 'takeo.png')                                             # 150 x 225
  with pytest.raises(landmarker_lib.BoxOutsideImageError, match=r'box \(5000, 5000, 5100, 5100\) lies outside '
                     r'the image \(150 x 225 pixels\)'):
    landmarker(image, (5000, 5000, 5100, 5100))
  with pytest.raises(landmarker_lib.BoxOutsideImageError, match=r'takeo\.png'):
    landmarker(FULL / 'takeo.png', (-90, 10, -1, 100))
  # A face cut by the border is a face.
  (face,) = landmarker(image, (-20, 40, 100, 160), refine=False)
  assert face.landmarks.shape == (98, 2)
  with pytest.raises(ValueError, match='max_pixels must be a positive'):
    landmarker_lib.FaceLandmarker(lambda x: x, 64, max_pixels=0)


def test_points_300w_returns_a_wflw_networks_points_as_the_68_ibug_points():
  """End to end on a real photo with its 68-point annotation: an oracle network that answers, in the
  crop's frame, the annotation at the WFLW points that 300W's points come from (and the face's centre
  elsewhere); the landmarker with points='300W' must give back the annotation."""
  from star_jax import layouts
  from star_jax.data import annotations
  from star_jax.data import crop as crop_lib
  from star_jax.data import transforms

  truth = annotations.read_pts(FULL / 'einstein.pts', 68)
  box = tuple(float(v) for v in crop_lib.landmarks_box(truth))
  scale, center = crop_lib.box_rule(box)
  matrix = transforms.crop_matrix(scale, center, 64)
  crop_px = truth @ matrix[:2, :2].T + matrix[:2, 2]
  normalised = (2.0 * crop_px + 1.0) / 64 - 1.0                               # align_corners=False
  points98 = np.tile(normalised.mean(0), (98, 1))
  points98[list(layouts.WFLW_TO_300W)] = normalised
  covariances98 = np.tile(np.eye(2) * 1e-3, (98, 1, 1)) * (1 + np.arange(98))[:, None, None]

  def oracle(crops):
    n = len(crops)
    return {'landmarks': np.repeat(points98[None], n, 0).astype(np.float32),
            'covariances': np.repeat(covariances98[None], n, 0).astype(np.float32)}

  mapped = landmarker_lib.FaceLandmarker(oracle, 64, layout='WFLW', detector=None, points='300W')
  assert (mapped.layout, mapped.network_layout, mapped.describe()['mapped_from']) == ('300W', 'WFLW', 'WFLW')
  (face,) = mapped(FULL / 'einstein.jpg', box, refine=False)
  assert face.landmarks.shape == (68, 2) and face.covariances.shape == (68, 2, 2)
  np.testing.assert_allclose(face.landmarks, truth, atol=0.05)
  # Each point keeps its own covariance: the WFLW point's, mapped to image pixels.
  traces = np.trace(face.covariances, axis1=1, axis2=2)
  np.testing.assert_allclose(traces / traces[0], (1 + np.array(layouts.WFLW_TO_300W)) / (1 + layouts.WFLW_TO_300W[0]),
                             rtol=1e-4)
  native = landmarker_lib.FaceLandmarker(oracle, 64, layout='WFLW', detector=None)
  (all98,) = native(FULL / 'einstein.jpg', box, refine=False)
  np.testing.assert_array_equal(all98.landmarks[list(layouts.WFLW_TO_300W)], face.landmarks)
  with pytest.raises(ValueError, match='no mapping from the COFW layout'):
    landmarker_lib.FaceLandmarker(oracle, 64, layout='COFW', detector=None, points='300W')
  with pytest.raises(ValueError, match='needs the network'):
    landmarker_lib.FaceLandmarker(oracle, 64, detector=None, points='300W')
