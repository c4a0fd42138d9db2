"""Tests of the predict command (star_jax.predict), its library (star_jax.inference), the face detector
and the drawing (star_jax.drawing)."""

import json
import os
import pathlib
import shutil

import cv2
import numpy as np
import pytest

from conftest import REPO, load_config
from star_jax import drawing as plots
from star_jax import predict
from star_jax.data import crop as crop_lib
from star_jax.data import transforms
from star_jax.inference import face_detect
from star_jax.inference import predictor

def _read_pts(path: pathlib.Path) -> np.ndarray:
  """iBUG .pts (1-based) -> (N, 2) 0-based pixels."""
  lines = path.read_text().splitlines()
  start = lines.index('{') + 1
  return np.array([[float(v) for v in line.split()] for line in lines[start:lines.index('}')]]) - 1.0


def _rgb(path: pathlib.Path) -> np.ndarray:
  return cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)


# ---- Geometry with an oracle "network" ----------------------------------------------------------

def _dot_image(points, size=(240, 320), sigma=3.0):
  """Black RGB image with one Gaussian dot per channel at `points` (3, 2)."""
  h, w = size
  ys, xs = np.mgrid[0:h, 0:w]
  image = np.zeros((h, w, 3), np.float64)
  for c, (x, y) in enumerate(points):
    image[..., c] = 255.0 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma ** 2))
  return np.round(image).astype(np.uint8)


def _centroid_oracle(crops: np.ndarray) -> dict:
  """A 'network' that finds each channel's dot in the crop: (B, 3, 2) in [-1, 1] (align_corners=False,
  the frame in which the official tester reads the network's output)."""
  s = crops.shape[1]
  weights = crops.astype(np.float64)
  total = np.maximum(weights.sum(axis=(1, 2)), 1e-9)                    # (B, 3)
  grid = np.arange(s, dtype=np.float64)
  x = np.einsum('bhwc,w->bc', weights, grid) / total
  y = np.einsum('bhwc,h->bc', weights, grid) / total
  crop_px = np.stack([x, y], -1)
  return {'landmarks': ((2.0 * crop_px + 1.0) / s - 1.0).astype(np.float32)}


def test_crop_predict_map_back_recovers_points():
  # Dots spread like a face's extent inside a 120 px box; the crop (64 px) shrinks them ~2x.
  points = np.array([[130.0, 95.0], [205.5, 120.25], [160.75, 190.5]])
  image = _dot_image(points)
  box = (110.0, 80.0, 230.0, 200.0)
  results = [predictor.FaceResult(face_detect.Face(box), 'user')]
  predictor.predict_faces([image], [results], _centroid_oracle, image_size=64, batch_size=2, refine=False)
  r = results[0]
  # The crop, the normalisation and the way back must agree to a fraction of a pixel; any half-pixel
  # convention slip (align_corners, the (S-1)/2 centre) would cost ~1 image px here.
  np.testing.assert_allclose(r.landmarks, points, atol=0.3)
  assert not r.refined
  assert r.scale == pytest.approx(120 / 200 * 1.05)
  assert r.center == pytest.approx((170.0, 140.0))


def test_refinement_crops_by_the_first_pass_landmarks():
  points = np.array([[130.0, 95.0], [205.5, 120.25], [160.75, 190.5]])
  results = [predictor.FaceResult(face_detect.Face((110.0, 80.0, 230.0, 200.0)), 'user')]
  predictor.predict_faces([_dot_image(points)], [results], _centroid_oracle, image_size=64, batch_size=2,
                        refine=True)
  r = results[0]
  # The second crop is the demo's rule on the bounding box of the first pass's (accurate) landmarks.
  scale, center = crop_lib.box_rule(crop_lib.landmarks_box(points))
  assert r.refined
  assert r.scale == pytest.approx(scale, rel=5e-3) and r.center == pytest.approx(center, abs=0.3)
  assert np.all(np.isfinite(r.landmarks))


def test_run_batched_pads_to_one_shape_and_keeps_order():
  seen = []

  def fn(images):
    seen.append(images.shape)
    return {'landmarks': images[:, 0, 0, :1, None].astype(np.float32) + np.zeros((len(images), 2, 2), np.float32)}

  crops = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((5, 4, 4, 3), np.uint8)
  out = predictor.run_batched(fn, crops, batch_size=3)
  assert seen == [(3, 4, 4, 3), (3, 4, 4, 3)]
  np.testing.assert_array_equal(out['landmarks'][:, 0, 0], np.arange(5))


def test_covariances_to_image_is_the_jacobian_sandwich_of_map_back():
  # Any affine crop matrix: the covariance in image px is J cov J^T with J the Jacobian of
  # map_back (normalised -> image px), measured here on map_back itself (affine, so exact).
  size = 64
  matrix = transforms.rotate_scale_matrix(0.4, 0.37, (3.0, -2.0), (150.0, 90.0), (31.5, 31.5))[None]
  cov = np.array([[[[0.004, 0.0015], [0.0015, 0.001]]]])                  # (1, 1, 2, 2) normalised
  probe = np.array([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])
  mapped = transforms.map_back(probe, matrix, size)[0].astype(np.float64)
  jac = np.stack([mapped[1] - mapped[0], mapped[2] - mapped[0]], axis=1)  # columns: d/dx, d/dy
  got = predictor.covariances_to_image(cov, matrix, size)[0, 0]
  np.testing.assert_allclose(got, jac @ cov[0, 0] @ jac.T, rtol=1e-4)
  # Pure scale: normalised -> crop px is x S/2, crop -> image px is / 0.37.
  np.testing.assert_allclose(np.trace(got), np.trace(cov[0, 0]) * (size / 2 / 0.37) ** 2, rtol=1e-5)


def test_refined_crop_guards_against_bad_landmarks():
  pts = np.array([[10.0, 20.0], [110.0, 20.0], [60.0, 140.0]])
  scale, center = predictor.refined_crop(pts, previous_scale=0.5)
  assert scale == pytest.approx(100 / 200 * 1.05) and center == pytest.approx((60.0, 80.0))
  assert predictor.refined_crop(np.full((3, 2), 7.0), 0.5) is None            # collapsed points
  assert predictor.refined_crop(pts, previous_scale=5.0) is None              # 10x smaller than the face
  assert predictor.refined_crop(np.array([[np.nan, 1.0], [2.0, 3.0]]), 0.5) is None


# ---- Boxes, detector, drawing -------------------------------------------------------------------

def test_parse_box_and_the_box_rule():
  assert face_detect.parse_box('10,20.5, 110,220') == (10.0, 20.5, 110.0, 220.0)
  for bad in ('10,20,30', 'a,b,c,d', '10,20,5,40', '1,2,3,inf'):
    with pytest.raises(ValueError, match='box'):
      face_detect.parse_box(bad)
  # The official demo: scale = min(w, h) / 200 x 1.05 around the box centre.
  scale, center = crop_lib.box_rule((10, 20, 110, 220))
  assert scale == pytest.approx(0.525) and center == pytest.approx((60.0, 120.0))
  with pytest.raises(ValueError, match='no area'):
    crop_lib.box_rule((10, 20, 10, 40))


def _iou(a, b):
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
  return inter / (area(a) + area(b) - inter)


def test_haar_detector_finds_the_face_and_nothing_in_a_blank_image(data_dir):
  detector = face_detect.HaarFaceDetector()
  image = _rgb(data_dir / 'real_faces' / 'takeo.png')
  faces = detector.detect(image)
  assert len(faces) == 1
  truth = crop_lib.landmarks_box(_read_pts(data_dir / 'real_faces' / 'takeo.pts'))
  assert _iou(faces[0].box, truth) > 0.4
  assert detector.detect(np.full((120, 160, 3), 127, np.uint8)) == []
  many = [face_detect.Face((0, 0, 10, 10)), face_detect.Face((0, 0, 20, 20))]
  assert face_detect.select(sorted(many, key=lambda f: -f.area), 'largest') == [many[1]]
  assert len(face_detect.select(many, 'all')) == 2


def test_covariance_ellipse_axes_and_angle():
  rot = np.array([[np.cos(0.5), -np.sin(0.5)], [np.sin(0.5), np.cos(0.5)]])
  cov = rot @ np.diag([16.0, 4.0]) @ rot.T
  (a, b), angle = plots.covariance_ellipse(cov, n_std=2.0)
  assert (a, b) == pytest.approx((8.0, 4.0))
  assert np.deg2rad(angle) % np.pi == pytest.approx(0.5)


def test_drawing_marks_the_right_pixels():
  image = np.zeros((60, 80, 3), np.uint8)
  out = plots.draw_landmarks(image, np.array([[20.0, 30.0]]), radius=2.0)
  assert tuple(out[30, 20]) == plots.POINT_COLOR and out[5, 70].sum() == 0 and image.sum() == 0
  # A horizontal ellipse of semi-axes 12 x 3 around (40, 30): its outline passes (52, 30), not (40, 42).
  out = plots.draw_ellipses(image, np.array([[40.0, 30.0]]), np.array([[[144.0, 0.0], [0.0, 9.0]]]))
  assert out[29:32, 51:54].sum() > 0 and out[40:44, 38:43].sum() == 0


# ---- The command, end to end --------------------------------------------------------------------

@pytest.fixture(scope='module')
def tiny_checkpoint(tmp_path_factory):
  """The tiny official WFLW network (tests/data/tiny_wflw_checkpoint.pkl, input 64, 4 stacks, 32
  channels, random weights) converted to a star_jax checkpoint."""
  from star_jax import convert_pytorch

  config = load_config('wflw', 'tiny')
  config.model.nstack, config.model.channels = 4, 32
  out = tmp_path_factory.mktemp('ckpt') / 'tiny_wflw'
  convert_pytorch.convert_checkpoint(str(REPO / 'tests' / 'data' / 'tiny_wflw_checkpoint.pkl'), config, str(out))
  return out


@pytest.fixture
def photos(tmp_path, data_dir):
  """A folder with the three real photos, an unreadable 'image' and a blank one (no face)."""
  folder = tmp_path / 'photos'
  folder.mkdir()
  for name in ('takeo.png', 'einstein.jpg', 'breakingbad.jpg'):
    shutil.copy(data_dir / 'real_faces' / name, folder / name)
  (folder / 'corrupt.jpg').write_bytes(b'this is not a JPEG')
  cv2.imwrite(str(folder / 'blank.png'), np.full((90, 120, 3), 200, np.uint8))
  (folder / 'notes.txt').write_text('not an image, not listed')
  return folder


@pytest.fixture(scope='module')
def _loaded_models():
  return {}


@pytest.fixture
def spy(monkeypatch, _loaded_models):
  """Records the network functions the command builds, and loads each checkpoint only once per module
  (loading the tiny model takes seconds; the first test still goes through the real loader)."""
  from star_jax.training import checkpoints

  real_load, real_make = checkpoints.load_model, predictor.network_fn
  made = []

  def load(directory, **kwargs):
    key = (str(directory), tuple(sorted(kwargs.items())))
    if key not in _loaded_models:
      _loaded_models[key] = real_load(directory, **kwargs)
    return _loaded_models[key]

  def make(model, with_covariance, **kwargs):
    fn = real_make(model, with_covariance, **kwargs)
    made.append(fn)
    return fn

  monkeypatch.setattr(checkpoints, 'load_model', load)
  monkeypatch.setattr(predictor, 'network_fn', make)
  return made


def test_predict_command_on_a_folder(tiny_checkpoint, photos, tmp_path, capsys, spy):
  out = tmp_path / 'out'
  status = predict.main(['predict', '--checkpoint', str(tiny_checkpoint), str(photos), '--output', str(out),
                         '--norefine', '--batch_size', '2'])
  assert status == 0
  err = capsys.readouterr().err
  assert 'corrupt.jpg: cannot read' in err
  assert 'blank.png: no face found' in err and 'einstein.jpg: no face found' in err
  assert sorted(p.name for p in out.iterdir()) == [
      'breakingbad.json', 'breakingbad_landmarks.jpg', 'takeo.json', 'takeo_landmarks.jpg']
  record = json.loads((out / 'breakingbad.json').read_text())
  assert record['layout'] == 'WFLW' and record['num_points'] == 98
  assert (record['width'], record['height']) == (240, 135)
  (face,) = record['faces']
  assert face['box_source'] == 'detector' and 'covariances' not in face and not face['crop']['refined']
  # The command's landmarks are the network's output on the RGB crop of the detected box (not BGR,
  # not another crop), mapped back to image pixels: redo it by hand with the same network function.
  image = _rgb(photos / 'breakingbad.jpg')
  scale, center = crop_lib.box_rule(face['box'])
  matrix = transforms.crop_matrix(scale, center, 64)
  crop = transforms.warp(image, matrix, 64)
  (network,) = spy
  normalised = network(np.stack([crop, np.zeros_like(crop)]))['landmarks'][:1]
  expected = transforms.map_back(normalised, matrix[None], 64)[0]
  np.testing.assert_allclose(np.array(face['landmarks']), expected, atol=2e-3)
  bgr = network(np.stack([crop[..., ::-1], np.zeros_like(crop)]))['landmarks'][:1]
  assert np.abs(transforms.map_back(bgr, matrix[None], 64)[0] - expected).max() > 0.1  # the check can fail
  picture = cv2.imread(str(out / 'breakingbad_landmarks.jpg'))
  assert picture.shape == image.shape and np.abs(picture.astype(int) - image[..., ::-1]).max() > 100


def test_predict_command_with_box_and_ambiguity(tiny_checkpoint, photos, tmp_path, data_dir, spy):
  # Einstein's face is too small for the cascade in this copy: give its box (from the annotation).
  out = tmp_path / 'out'
  box = tuple(round(v, 1) for v in crop_lib.landmarks_box(_read_pts(data_dir / 'real_faces' / 'einstein.pts')))
  status = predict.main(['predict', '--checkpoint', str(tiny_checkpoint), str(photos / 'einstein.jpg'), '--output',
                         str(out), '--box', ','.join(map(str, box)), '--show-ambiguity'])
  assert status == 0
  (face,) = json.loads((out / 'einstein.json').read_text())['faces']
  assert face['box_source'] == 'user' and face['box'] == list(map(float, box))
  covs = np.array(face['covariances'])
  assert covs.shape == (98, 2, 2)
  np.testing.assert_allclose(covs, covs.transpose(0, 2, 1), atol=1e-3)
  assert np.all(np.linalg.eigvalsh(covs) > 0)


def test_predict_command_errors(tmp_path, photos, capsys):
  assert predict.main(['predict', '--checkpoint', str(tmp_path / 'missing'), str(photos), '--output',
                       str(tmp_path / 'o')]) == 1
  err = capsys.readouterr().err
  assert err.startswith('error: ') and 'missing' in err and 'does not exist' in err
  assert predict.main(['predict', '--checkpoint', str(tmp_path), str(photos), '--output', str(tmp_path / 'o'),
                       '--box', '1,2,3']) == 2
  assert 'four numbers' in capsys.readouterr().err


# ---- A trained checkpoint (opt-in, clearly marked) ----------------------------------------------
# STAR_JAX_TRAINED_CHECKPOINT: a checkpoint directory, or training workdir, of configs/synthetic.py
# trained for real (e.g. `python -m star_jax.train --config configs/synthetic.py --workdir runs/synthetic`);
# STAR_JAX_TRAINED_USE_EMA=0 for its raw weights (the EMA lags behind for the first ~1000 steps).
# Checks that the prediction path puts the landmarks on the faces, starting from the face box, on
# synthetic test faces with exact points, and writes the pictures (tmp_path) for a look.
TRAINED = os.environ.get('STAR_JAX_TRAINED_CHECKPOINT', '')


@pytest.mark.skipif(not TRAINED, reason='set STAR_JAX_TRAINED_CHECKPOINT to a trained configs/synthetic.py run')
def test_trained_checkpoint_puts_the_landmarks_on_synthetic_faces(tmp_path):
  from star_jax import layouts
  from star_jax import metrics
  from star_jax.data import synthetic
  from star_jax.training import checkpoints

  use_ema = os.environ.get('STAR_JAX_TRAINED_USE_EMA', '1') != '0'
  loaded = checkpoints.load_model(TRAINED, weights=None if use_ema else 'model')
  config = loaded.config
  layout = layouts.get_layout(config.layout)
  fn = predictor.network_fn(loaded.model, with_covariance=True)
  samples = [synthetic.generate(0, 'test', i, layout=layout.name) for i in range(8)]
  gt = np.stack([s.clean_landmarks for s in samples])
  for refine, limit in ((False, 0.08), (True, 0.1)):
    # The synthetic box is the landmarks' own box, i.e. already the demo's crop: refining can only
    # add the first pass's error, so it gets a little more room.
    faces = [[predictor.FaceResult(face_detect.Face(tuple(float(v) for v in s.box)), 'user')] for s in samples]
    predictor.predict_faces([s.image for s in samples], faces, fn, int(config.data.image_size), 8, refine=refine)
    nme = metrics.nme_per_image(np.stack([f[0].landmarks for f in faces]), gt, layout)
    for i, (s, f) in enumerate(zip(samples, faces)):
      picture = predictor.draw(s.image, f, show_ambiguity=True)
      cv2.imwrite(str(tmp_path / f'face{i}_refine{int(refine)}.png'), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    assert np.median(nme) < limit, (refine, nme, tmp_path)
