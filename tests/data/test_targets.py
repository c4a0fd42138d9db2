"""Training targets (star_jax/data/targets.py): normalised landmarks, point maps and edge maps.

Golden values: tests/testdata/targets_golden.npz, from the official STAR code (stored NCHW-like:
(4, C, 64, 64); ours are channels-last; made by scripts/make_test_data.py).
"""

import math

import cv2
import numpy as np
import pytest

from conftest import DATA
from star_jax import layouts
from star_jax.data import targets as TG

DATASETS = ('WFLW', '300W', 'COFW')


@pytest.fixture(scope='module')
def golden():
  with np.load(DATA / 'targets_golden.npz') as f:
    return dict(f)


@pytest.mark.parametrize('ds', DATASETS)
def test_targets_match_golden(golden, ds):
  layout = layouts.get_layout(ds)
  for i, landmarks in enumerate(golden[f'{ds}/landmarks_256']):
    norm = TG.normalize_landmarks(landmarks, 256)
    np.testing.assert_allclose(norm, golden[f'{ds}/normalized'][i], atol=1e-6)
    points = TG.point_maps(landmarks, 256, 64, 1.5)
    assert points.shape == (64, 64, layout.num_points) and points.dtype == np.float32
    np.testing.assert_allclose(points, golden[f'{ds}/pointmaps'][i].transpose(1, 2, 0), atol=1e-5)
    edges = TG.edge_maps(landmarks, layout.edges, 256, 64)
    assert edges.shape == (64, 64, layout.num_edges) and edges.dtype == np.float32
    np.testing.assert_allclose(edges, golden[f'{ds}/edgemaps'][i].transpose(1, 2, 0), atol=1e-6)


def test_normalize_clips_and_maps_pixel_edges_to_unit():
  out = TG.normalize_landmarks(np.array([[-0.5, 255.5], [127.5, 127.5], [-40, 300]], np.float32), 256)
  np.testing.assert_allclose(out, [[-1, 1], [0, 0], [-1, 1]], atol=1e-7)


def _torch_bilinear_1d(signal, out_size):
  """torch.nn.functional.interpolate(mode='bilinear', align_corners=False) along axis 0, per
  PyTorch's documented source-index rule, written independently of targets.py."""
  n = signal.shape[0]
  out = []
  for i in range(out_size):
    src = max((i + 0.5) * n / out_size - 0.5, 0.0)
    lo = int(math.floor(src))
    hi = min(lo + 1, n - 1)
    out.append((1 - (src - lo)) * signal[lo] + (src - lo) * signal[hi])
  return np.stack(out)


@pytest.mark.parametrize('n_in,n_out', [(256, 64), (64, 16), (10, 4), (4, 8)])
def test_bilinear_resize_matrix(n_in, n_out):
  signal = np.random.default_rng(0).random((n_in, 3))
  np.testing.assert_allclose(TG.bilinear_resize_matrix(n_in, n_out) @ signal,
                             _torch_bilinear_1d(signal, n_out), atol=1e-6)
  if n_in == 4 * n_out:  # a 4x downscale averages the middle two of every four samples
    r = TG.bilinear_resize_matrix(n_in, n_out)
    assert r[1, 5] == r[1, 6] == 0.5 and r[1].sum() == 1.0


def _official_style_point_map(point, size, sigma):
  """One point map drawn as the official `_circle` describes (patch from int(p - 3 sigma), peak at
  patch index (6 sigma + 1) // 2, cut at the border), written the straightforward way."""
  img = np.zeros((size, size), np.float32)
  p = np.clip(point, 0, size - 1)
  tmp = 3 * sigma
  ul = [int(p[0] - tmp), int(p[1] - tmp)]
  br = [int(p[0] + tmp + 1), int(p[1] + tmp + 1)]
  patch = 2 * tmp + 1
  c = patch // 2
  for y in range(max(0, ul[1]), min(br[1], size)):
    for x in range(max(0, ul[0]), min(br[0], size)):
      gx, gy = x - ul[0], y - ul[1]
      if gx < math.ceil(patch) and gy < math.ceil(patch):
        img[y, x] = math.exp(-((gx - c) ** 2 + (gy - c) ** 2) / (2 * sigma ** 2))
  return img


@pytest.mark.parametrize('size,heat,sigma', [(256, 64, 1.5), (64, 16, 1.5 * 64 / 256), (64, 16, 2.2)])
def test_point_maps_equal_drawing_then_resizing(size, heat, sigma):
  rng = np.random.default_rng(1)
  points = np.concatenate([rng.uniform(-5, size + 5, (6, 2)),
                           [[0, 0], [size - 1, size - 1], [2.3, size - 3.7], [4.2, 4.7]]]).astype(np.float32)
  got = TG.point_maps(points, size, heat, sigma)
  for k, p in enumerate(points):
    full = _official_style_point_map(p, size, sigma)
    want = _torch_bilinear_1d(_torch_bilinear_1d(full, heat).T, heat).T
    np.testing.assert_allclose(got[..., k], want, atol=1e-6)


def _edge_map_reference(landmarks: np.ndarray, edges, image_size: int, heatmap_size: int) -> np.ndarray:
  """(h, h, E) float32: the straightforward official computation (a full float32 4x canvas per edge
  with 255 ink, INTER_AREA back to image_size, / 255, bilinear to heatmap_size). Slow; kept to test
  the fast `edge_maps` against."""
  big = image_size * TG.EDGE_DRAW_SCALE
  r = TG.bilinear_resize_matrix(image_size, heatmap_size)
  out = []
  for closed, indices in edges:
    canvas = np.zeros((big, big), np.float32)
    TG._draw(canvas, TG._curve_pixels(np.asarray(landmarks)[list(indices)], closed, image_size), closed, 255.0)
    full = cv2.resize(canvas, (image_size, image_size), interpolation=cv2.INTER_AREA) / np.float32(255)
    out.append(r @ full @ r.T)
  return np.stack(out, axis=-1).astype(np.float32)


@pytest.mark.parametrize('ds,size,heat', [('WFLW', 256, 64), ('COFW', 256, 64), ('300W', 64, 16),
                                         ('COFW', 32, 16), ('COFW', 48, 16), ('COFW', 60, 16)])  # 2x, 3x, 3.75x
def test_fast_edge_maps_equal_full_canvas_drawing(ds, size, heat):
  """The windowed drawing equals drawing on the full 4x canvas, also for curves cut by the border."""
  layout = layouts.get_layout(ds)
  rng = np.random.default_rng(2)
  for _ in range(2):
    centre = rng.uniform(0.2 * size, 0.8 * size, 2)
    landmarks = (centre + rng.normal(0, 0.35 * size, (layout.num_points, 2))).astype(np.float32)
    np.testing.assert_allclose(TG.edge_maps(landmarks, layout.edges, size, heat),
                               _edge_map_reference(landmarks, layout.edges, size, heat), atol=1e-6)


def test_fit_curve_interpolates_its_points():
  t = np.linspace(0, np.pi, 7)
  points = np.stack([100 + 50 * np.cos(t), 100 + 30 * np.sin(t)], -1)
  open_curve = TG.fit_curve(points, closed=False)
  assert open_curve.shape == (6 * 5 + 1, 2)
  np.testing.assert_allclose(open_curve[::5], points, atol=1e-9)
  closed_curve = TG.fit_curve(points, closed=True)
  assert closed_curve.shape == (7 * 5, 2)
  np.testing.assert_allclose(closed_curve[::5], points, atol=1e-9)


def test_degenerate_edges_fall_back_to_the_points():
  points = np.array([[10, 10], [10, 10], [10, 10], [10, 10], [20, 20]], np.float32)
  np.testing.assert_array_equal(TG.fit_curve(points, closed=False), points)
  landmarks = np.full((layouts.COFW.num_points, 2), 30.0, np.float32)   # every point at one spot
  maps = TG.edge_maps(landmarks, layouts.COFW.edges, 64, 16)
  assert np.isfinite(maps).all() and maps.max() > 0
