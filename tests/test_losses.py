"""Tests of star_jax.losses: parity with the official PyTorch losses, the closed-form 2x2 eigensolver,
gradient safety, invariances and the multi-stack combination.

tests/testdata/losses_star_reference.npz holds arrays computed by the official code (commit 9b12574,
float32, NCHW; from the shared reference losses.npz, rebuilt by scripts/make_test_data.py):
  h16/*: the whole `b3_n5_h16` case (3 x 5 maps of 16x16): values and heatmap gradients of
    STARLoss_v2 (smoothl1, l1, l2, smoothl1 with w=0.5), STARLoss (v1) and AWingLoss.
  h64/*: two maps of the `b2_n24_h64` case (64x64): map (1, 11), the worst-conditioned one (its
    eigenvalues differ by 3%), and map (0, 0), as a batch of 1 x 2 maps. Every STAR term depends on its
    own map only and the loss averages over maps, so their gradients are the official ones x 48 / 2.
tests/testdata/losses_hard_cases.npz (scripts/make_test_data.py, [loss_hard_cases]): the official STARLoss_v2
(smoothl1, l1, l2, wing) and AWingLoss in float64 on the maps an untrained network produces and the
corners of the loss (nearly uniform maps, nearly isotropic and singular covariances, a single pixel, an
all-zero map, targets outside the crop), per map, with how much the official result moves when the map
moves by one float64 ulp (the case's conditioning).
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO

from star_jax import losses
from star_jax.models import decoding

RTOL = 1e-5


@pytest.fixture
def ref(data_dir):
  with np.load(data_dir / 'losses_star_reference.npz') as f:
    return dict(f)


def nhwc(x):
  return np.ascontiguousarray(np.asarray(x).transpose(0, 2, 3, 1))


def assert_grad_close(actual, expected):
  """Relative 1e-5, with an absolute floor of 1e-5 x the largest gradient entry.

  The floor is needed: the official float32 gradients are themselves ~5e-6 (of the largest entry) away
  from a float64 evaluation on maps whose covariance is nearly isotropic (eigenvector derivatives scale
  with 1 / eigenvalue gap), so tiny entries cannot be matched to 1e-5 of their own size.
  """
  expected = np.asarray(expected)
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=RTOL, atol=RTOL * np.abs(expected).max())


STAR_CASES = {
    'star_v2_smoothl1': functools.partial(losses.star_loss),
    'star_v2_l1': functools.partial(losses.star_loss, dist='l1'),
    'star_v2_l2': functools.partial(losses.star_loss, dist='l2'),
    'star_v2_smoothl1_w0.5': functools.partial(losses.star_loss, w=0.5),
    'star_v1_smoothl1': functools.partial(losses.star_loss_v1),
}


# ------------------------------------------------------------------------------------------------
# Parity with the official losses
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', sorted(STAR_CASES))
def test_star_matches_official_16x16(ref, name):
  fn = jax.jit(jax.value_and_grad(STAR_CASES[name]))
  value, grad = fn(jnp.asarray(nhwc(ref['h16/heatmap'])), jnp.asarray(ref['h16/target']))
  np.testing.assert_allclose(float(value), float(ref[f'h16/{name}/value']), rtol=RTOL)
  assert_grad_close(grad, nhwc(ref[f'h16/{name}/grad_heatmap']))


@pytest.mark.parametrize('name', ['star_v2_smoothl1', 'star_v2_l2', 'star_v1_smoothl1'])
def test_star_gradient_matches_official_64x64(ref, name):
  grad = jax.jit(jax.grad(STAR_CASES[name]))(jnp.asarray(nhwc(ref['h64/heatmap'])), jnp.asarray(ref['h64/target']))
  assert_grad_close(grad, nhwc(ref[f'h64/{name}/grad_heatmap']))


def test_awing_matches_official(ref):
  value, grad = jax.jit(jax.value_and_grad(losses.awing_loss))(
      jnp.asarray(nhwc(ref['h16/awing/pred'])), jnp.asarray(nhwc(ref['h16/awing/target'])))
  np.testing.assert_allclose(float(value), float(ref['h16/awing/value']), rtol=RTOL)
  assert_grad_close(grad, nhwc(ref['h16/awing/grad_pred']))


# The hard cases, float64. Tolerances: max(floor, 100 x how far the official result moves under changes
# that leave the loss the same up to rounding: a one-ulp change of the map, the problem transposed or
# mirrored). The floors: float64 rounding of the covariance amplified by its conditioning, up to
# (largest eigenvalue) / (smallest + 1e-5) = 8e4 on the singular maps (on a map on the anti-diagonal the
# official small eigenvalue is exactly 0, ours 5.6e-17: 2e-12 in the value, 8e-12 in the gradient).
HARD_VALUE_FLOOR, HARD_GRAD_FLOOR = 1e-11, 1e-10


@pytest.fixture(scope='module')
def hard():
  with np.load(REPO / 'tests' / 'testdata' / 'losses_hard_cases.npz') as f:
    return dict(f)


def _make_test_data_module():
  spec = importlib.util.spec_from_file_location('make_test_data', REPO / 'scripts' / 'make_test_data.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_hard_case_inputs_are_the_generators(hard):
  """The committed inputs are what scripts/make_test_data.py draws (so a rebuild tests the same cases)."""
  inputs = _make_test_data_module().hard_case_inputs()
  for key, value in inputs.items():
    np.testing.assert_array_equal(hard[key], value, err_msg=key)


@pytest.mark.parametrize('isotropic', ['pin', 'official'])
@pytest.mark.parametrize('dist', losses.DISTANCES)
def test_star_loss_matches_official_on_hard_cases_float64(hard, dist, isotropic):
  names = [str(n) for n in hard['star/case_names']]
  maps, targets = hard['star/heatmap'], hard['star/target']
  fn = functools.partial(losses.star_loss, dist=dist, isotropic=isotropic)
  with jax.enable_x64(True):
    per_map = jax.jit(jax.vmap(jax.value_and_grad(fn)))
    values, grads = per_map(jnp.asarray(nhwc(maps.reshape(-1, 1, 16, 16)))[:, None],
                            jnp.asarray(targets.reshape(-1, 1, 2))[:, None])
    batch_value = float(jax.jit(fn)(jnp.asarray(nhwc(maps)), jnp.asarray(targets)))
    assert values.dtype == jnp.float64
  values = np.asarray(values).reshape(maps.shape[:2])
  grads = np.asarray(grads)[:, 0, ..., 0].reshape(maps.shape)
  official, official_grads = hard[f'star/{dist}/values'], hard[f'star/{dist}/grad_heatmap']
  value_tol = np.maximum(HARD_VALUE_FLOOR, 100 * hard[f'star/{dist}/value_sensitivity'])
  grad_tol = np.maximum(HARD_GRAD_FLOOR, 100 * hard[f'star/{dist}/grad_sensitivity'])
  failures = []
  for i, j in np.ndindex(*maps.shape[:2]):
    case = f'{names[j]} (image {i})'
    err = abs(values[i, j] - official[i, j]) / abs(official[i, j])
    if not err <= value_tol[i, j]:
      failures.append(f'{case}: value {values[i, j]!r} vs {official[i, j]!r} ({err:.1e} > {value_tol[i, j]:.1e})')
    if not np.isfinite(official_grads[i, j]).all():
      # The official gradient of a zero covariance (both eigenvalues 0: LAPACK's eigh has 1 / 0 in its
      # derivative) is NaN; ours is finite: the eigenvectors are pinned to the axes there.
      assert names[j] in ('single_pixel', 'zeros'), case
      if not np.isfinite(grads[i, j]).all():
        failures.append(f'{case}: our gradient is not finite')
      continue
    err = np.abs(grads[i, j] - official_grads[i, j]).max() / np.abs(official_grads[i, j]).max()
    if not err <= grad_tol[i, j]:
      failures.append(f'{case}: gradient {err:.1e} > {grad_tol[i, j]:.1e}')
  assert not failures, '\n'.join(failures)
  # The batch's loss is the mean of the per-map ones, to the same tolerances (the undetermined 'uniform'
  # maps weigh in: their loss depends on the rounding of their covariance, batched or not).
  batch_tol = max(HARD_VALUE_FLOOR, float((value_tol * np.abs(official)).sum() / np.abs(official).sum()))
  np.testing.assert_allclose(batch_value, values.mean(), rtol=batch_tol)
  np.testing.assert_allclose(batch_value, float(hard[f'star/{dist}/value']), rtol=batch_tol)


def test_hard_cases_are_hard(hard):
  """The cases the golden names are what they claim (so that the tolerances above are not vacuous):
  well-conditioned maps move with float64 rounding only, the nearly isotropic one by ~1e-9, and the
  uniform map's gradient is undetermined (its eigenvectors are the official code's rounding)."""
  names = [str(n) for n in hard['star/case_names']]
  sensitivity = hard['star/smoothl1/value_sensitivity']
  for well in ('relu_noise', 'blob', 'blob_target_outside'):
    assert sensitivity[:, names.index(well)].max() < 1e-14, well
  assert 1e-10 < sensitivity[:, names.index('near_isotropic_1e-9')].max() < 1e-7
  assert not np.isfinite(hard['star/smoothl1/grad_sensitivity'][:, names.index('uniform')]).all() or \
      hard['star/smoothl1/grad_sensitivity'][:, names.index('uniform')].max() > 1e-3
  assert not np.isfinite(hard['star/smoothl1/grad_heatmap'][:, names.index('single_pixel')]).all()


def test_awing_matches_official_on_hard_cases_float64(hard):
  with jax.enable_x64(True):
    value, grad = jax.jit(jax.value_and_grad(losses.awing_loss))(
        jnp.asarray(nhwc(hard['awing/pred'])), jnp.asarray(nhwc(hard['awing/target'])))
    assert value.dtype == jnp.float64
  np.testing.assert_allclose(float(value), float(hard['awing/value']), rtol=HARD_VALUE_FLOOR)
  expected = nhwc(hard['awing/grad_pred'])
  np.testing.assert_allclose(np.asarray(grad), expected, rtol=0, atol=HARD_GRAD_FLOOR * np.abs(expected).max())


def test_awing_gradient_is_finite_where_prediction_equals_target():
  target = jnp.asarray(np.linspace(0, 1, 2 * 4 * 4 * 3).reshape(2, 4, 4, 3), jnp.float32)
  value, grad = jax.jit(jax.value_and_grad(losses.awing_loss))(target, target)
  assert float(value) == 0.0 and np.isfinite(np.asarray(grad)).all()


def test_awing_weight_map_is_3x3_dilation_at_0_2():
  target = np.zeros((1, 6, 7, 2), np.float32)
  target[0, 0, 0, 0] = 0.2          # exactly the threshold counts (the official test is `< 0.2` -> 1)
  target[0, 3, 4, 1] = 0.9
  target[0, 5, 0, 1] = 0.19         # below: no weight
  weight = np.asarray(losses.awing_weight_map(jnp.asarray(target)))
  expected = np.ones_like(target)
  expected[0, 0:2, 0:2, 0] = 11     # clipped at the corner
  expected[0, 2:5, 3:6, 1] = 11
  np.testing.assert_array_equal(weight, expected)


# ------------------------------------------------------------------------------------------------
# Closed-form eigendecomposition
# ------------------------------------------------------------------------------------------------

def _symmetric(a, b, c):
  return np.array([[a, b], [b, c]], np.float32)


EIGH_MATRICES = np.stack([
    _symmetric(3.0, 1.0, 2.0), _symmetric(2.0, -1.0, 3.0), _symmetric(1e-3, 2e-4, 5e-3),
    _symmetric(4.0, 0.0, 1.0), _symmetric(1.0, 0.0, 4.0), _symmetric(2.0, 0.0, 2.0),
    _symmetric(1.0, 1.0, 1.0), _symmetric(0.0, 0.0, 0.0), _symmetric(1.0, 3.0, -2.0),
])


def test_eigh_2x2_matches_lapack_and_returns_column_eigenvectors():
  evalues, evectors = map(np.asarray, jax.jit(losses.eigh_2x2)(jnp.asarray(EIGH_MATRICES)))
  expected = np.linalg.eigvalsh(EIGH_MATRICES.astype(np.float64))
  scale = np.abs(expected).max(-1, keepdims=True) + 1e-30
  np.testing.assert_allclose(evalues / scale, expected / scale, atol=1e-6)
  # Columns are unit, orthogonal eigenvectors: A V = V diag(evalues), V^T V = I.
  np.testing.assert_allclose(EIGH_MATRICES @ evectors / scale[..., None],
                             evectors * evalues[..., None, :] / scale[..., None], atol=1e-6)
  np.testing.assert_allclose(np.swapaxes(evectors, -1, -2) @ evectors, np.broadcast_to(np.eye(2), evectors.shape),
                             atol=1e-6)


def test_eigh_2x2_gradient_is_finite_for_equal_eigenvalues():
  iso = jnp.asarray(np.stack([_symmetric(2.0, 0.0, 2.0), _symmetric(0.0, 0.0, 0.0)]))

  def f(eig):
    def g(cov):
      evalues, evectors = eig(cov)
      # Uses both eigenvalues and both eigenvectors, weighted differently.
      return (evalues * jnp.array([1.0, 3.0])).sum() + (evectors * jnp.array([[0.3, 2.0], [1.0, -0.7]])).sum()
    return jax.jit(jax.grad(g))(iso)

  # The precondition of the test: LAPACK-based eigh really does fail here.
  assert not np.isfinite(np.asarray(f(jnp.linalg.eigh))).all()
  assert np.isfinite(np.asarray(f(losses.eigh_2x2))).all()


# ------------------------------------------------------------------------------------------------
# STAR loss: invariances and gradient safety
# ------------------------------------------------------------------------------------------------

def _gaussian_maps(rng, batch, size, points, sigma=(0.04, 0.12)):
  """(B, H, W, N) correlated Gaussian blobs with random centres, spreads and orientation; targets near."""
  grid = np.linspace(-1, 1, size)
  x, y = np.meshgrid(grid, grid)                                  # (H, W)
  centres = rng.uniform(-0.85, 0.85, (batch, points, 2))
  sx, sy = rng.uniform(*sigma, (2, batch, points))
  rho = rng.uniform(-0.7, 0.7, (batch, points))
  u = (x[None, None] - centres[..., 0, None, None]) / sx[..., None, None]
  v = (y[None, None] - centres[..., 1, None, None]) / sy[..., None, None]
  maps = np.exp(-0.5 * (u * u - 2 * rho[..., None, None] * u * v + v * v) / (1 - rho[..., None, None] ** 2))
  maps *= rng.uniform(0.3, 3.0, (batch, points, 1, 1))
  targets = centres + rng.normal(0, 0.03, centres.shape)
  return nhwc(maps).astype(np.float32), targets.astype(np.float32)


@pytest.mark.parametrize('dist', losses.DISTANCES)
def test_star_terms_do_not_depend_on_eigenvector_sign_or_convention(dist):
  rng = np.random.default_rng(0)
  maps, targets = _gaussian_maps(rng, 2, 24, 6)

  @jax.jit
  def all_terms(maps, targets):
    means, cov = decoding.heatmap_moments(maps)
    evalues, ours = losses.eigh_2x2(cov)
    terms = functools.partial(losses.star_terms, targets - means, evalues, dist=dist)
    flips = jnp.array([1.0, -1.0])
    lapack = jnp.linalg.eigh(cov)[1]                             # LAPACK's own sign convention
    same = [terms(v) for v in (ours * flips, ours * flips[::-1], -ours, lapack, lapack * flips)]
    # Negative control: a rotation-form eigenvector matrix (not symmetric) read by rows, as the official
    # code reads LAPACK's, gives a different loss; so the equalities are not vacuous.
    rows = terms(jnp.swapaxes(ours * flips, -1, -2))
    return terms(ours), same, rows

  base, same, rows = all_terms(jnp.asarray(maps), jnp.asarray(targets))
  for value in same:
    np.testing.assert_allclose(np.asarray(value), np.asarray(base), rtol=1e-5, atol=1e-6)
  assert not np.allclose(np.asarray(rows), np.asarray(base), rtol=1e-3)


def _isotropic_maps():
  """Maps whose covariance is isotropic: uniform, and a radially symmetric blob at the grid centre."""
  size = 17
  grid = np.linspace(-1, 1, size)
  x, y = np.meshgrid(grid, grid)
  blob = np.exp(-(x ** 2 + y ** 2) / (2 * 0.2 ** 2))
  maps = np.stack([np.ones((size, size)), blob], -1)[None].astype(np.float32)   # (1, H, W, 2)
  return maps, np.array([[[0.3, -0.2], [-0.1, 0.25]]], np.float32)


@pytest.mark.parametrize('dist', losses.DISTANCES)
def test_star_gradient_is_finite_for_isotropic_maps(dist):
  maps, targets = _isotropic_maps()
  cov = np.asarray(jax.jit(decoding.heatmap_moments)(jnp.asarray(maps))[1])
  assert np.allclose(cov[..., 0, 0], cov[..., 1, 1], rtol=1e-6) and np.allclose(cov[..., 0, 1], 0, atol=1e-9)
  value, grad = jax.jit(jax.value_and_grad(functools.partial(losses.star_loss, dist=dist)))(
      jnp.asarray(maps), jnp.asarray(targets))
  assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()


def test_star_loss_of_all_zero_maps_is_finite_with_the_official_value():
  maps = np.zeros((1, 8, 8, 2), np.float32)
  targets = np.array([[[0.3, -0.4], [0.0, 0.0]]], np.float32)
  value, grad = jax.jit(jax.value_and_grad(functools.partial(losses.star_loss, dist='l2')))(
      jnp.asarray(maps), jnp.asarray(targets))
  assert np.isfinite(np.asarray(grad)).all()
  # A zero map (sum clamped to 1e-6) has mean (0, 0) and zero covariance: error^2 / sqrt(eps) per point.
  np.testing.assert_allclose(float(value), (0.09 + 0.16) / np.sqrt(1e-5) / 2, rtol=1e-6)
  for fn in (losses.star_loss, losses.star_loss_v1):
    assert np.isfinite(np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(maps), jnp.asarray(targets)))).all()


def _reference_moments(heatmaps, eps=1e-5):
  """The official moments written plainly (normalise, full grids, centred sums), for autodiff."""
  _, h, w, _ = heatmaps.shape
  # The grid in the maps' precision (arange / (n - 1) * 2 - 1), as ours: float64 maps, float64 grid.
  precision = np.float64 if heatmaps.dtype == jnp.float64 else np.float32
  grid = lambda n: (np.arange(n, dtype=precision) / precision(n - 1) * 2 - 1).astype(heatmaps.dtype)
  y, x = jnp.meshgrid(grid(h), grid(w), indexing='ij')
  p = heatmaps / jnp.maximum(heatmaps.sum((1, 2), keepdims=True), 1e-6)
  mx = (p * x[None, :, :, None]).sum((1, 2))
  my = (p * y[None, :, :, None]).sum((1, 2))
  dx = x[None, :, :, None] - mx[:, None, None]
  dy = y[None, :, :, None] - my[:, None, None]
  sxx, syy, sxy = (p * dx * dx).sum((1, 2)), (p * dy * dy).sum((1, 2)), (p * dx * dy).sum((1, 2))
  v1 = p.sum((1, 2)) + eps
  denom = v1 - ((p * p).sum((1, 2)) + eps) / v1
  cov = jnp.stack([jnp.stack([sxx, sxy], -1), jnp.stack([sxy, syy], -1)], -2) / denom[..., None, None]
  return jnp.stack([mx, my], -1), cov


def test_moments_custom_gradient_matches_autodiff_in_float64():
  """The hand-written VJP of the moments, against autodiff of the plain formulas (float64, so any
  mistake shows far above rounding), including a map below the sum clamp and an all-zero map."""
  rng = np.random.default_rng(1)
  maps, _ = _gaussian_maps(rng, 2, 12, 4)
  maps = maps.astype(np.float64)
  maps[0, ..., 1] = rng.random((12, 12)) * 1e-9      # sum < 1e-6: the clamp is active
  maps[1, ..., 2] = 0.0                               # all zero
  maps[1, ..., 3] += rng.random((12, 12))             # a noisy, broad map
  with jax.enable_x64(True):
    hm = jnp.asarray(maps)
    cot_means = jnp.asarray(rng.normal(size=(2, 4, 2)))
    cot_cov = jnp.asarray(rng.normal(size=(2, 4, 2, 2)))
    results = []
    for fn in (decoding.heatmap_moments, _reference_moments):
      out, vjp = jax.vjp(jax.jit(fn), hm)
      results.append((out, vjp((cot_means, cot_cov))[0]))
    (ours_out, ours_grad), (ref_out, ref_grad) = results
    for a, b in zip(ours_out, ref_out):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(np.asarray(ours_grad), np.asarray(ref_grad), rtol=1e-8,
                               atol=1e-10 * np.abs(np.asarray(ref_grad)).max())


@pytest.mark.parametrize('seed, sigma', [(2, (0.03, 0.06)), (1, (0.03, 0.06)), (1, (0.015, 0.03))])
def test_star_loss_is_accurate_on_sharp_maps(seed, sigma, monkeypatch):
  """Sharp maps far from the centre are where float32 cancellation would hurt: compare the float32
  gradient with a float64 evaluation of the same loss (the official float32 code is ~2e-6 off).
  Seed 1 has maps whose float32 gradient was 1.1e-5 / 1.3e-5 off while the cross moment summed rows
  about fixed centres; centred on each map's mean it is 2.6e-6 / 3.7e-7. The same loss: on the float32
  grid in both (a float64 run builds its grid in float64, 6e-8 away, which these maps amplify)."""
  monkeypatch.setattr(decoding, 'grid_dtype', lambda dtype: np.dtype(np.float32))
  rng = np.random.default_rng(seed)
  maps, targets = _gaussian_maps(rng, 2, 64, 8, sigma=sigma)
  grad32 = np.asarray(jax.jit(jax.grad(losses.star_loss))(jnp.asarray(maps), jnp.asarray(targets)))
  with jax.enable_x64(True):
    grad64 = np.asarray(jax.jit(jax.grad(losses.star_loss))(jnp.asarray(maps, jnp.float64),
                                                             jnp.asarray(targets, jnp.float64)))
  assert np.abs(grad32 - grad64).max() <= 5e-6 * np.abs(grad64).max()


def test_eig_clamp_removes_nan_from_negative_eigenvalues():
  # Negative weights (e.g. maps without ReLU) can make the weighted covariance indefinite: an
  # eigenvalue below -eps makes sqrt(evalue + eps) NaN in the official loss.
  maps = np.zeros((1, 5, 5, 1), np.float32)
  maps[0, 0, 0, 0] = maps[0, 4, 4, 0] = 1.0
  maps[0, 0, 4, 0] = maps[0, 4, 0, 0] = -0.6
  maps, targets = jnp.asarray(maps), jnp.zeros((1, 1, 2), jnp.float32)
  evalues = jax.jit(lambda m: losses.eigh_2x2(decoding.heatmap_moments(m)[1])[0])(maps)
  assert float(evalues.min()) < -1e-5
  assert np.isnan(float(jax.jit(losses.star_loss)(maps, targets)))
  value, grad = jax.jit(jax.value_and_grad(functools.partial(losses.star_loss, eig_clamp=1e-4)))(maps, targets)
  assert np.isfinite(float(value)) and np.isfinite(np.asarray(grad)).all()


def test_star_loss_accepts_bfloat16_maps():
  rng = np.random.default_rng(3)
  maps, targets = _gaussian_maps(rng, 1, 16, 3)
  fn = jax.jit(jax.value_and_grad(losses.star_loss))
  full, _ = fn(jnp.asarray(maps), jnp.asarray(targets))
  value, grad = fn(jnp.asarray(maps, jnp.bfloat16), jnp.asarray(targets))
  assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(float(value), float(full), rtol=3e-2)


def test_bad_shapes_are_reported():
  with pytest.raises(ValueError, match='targets must be'):
    losses.star_loss(jnp.ones((1, 8, 8, 3)), jnp.zeros((1, 4, 2)))
  with pytest.raises(ValueError, match=r'\(batch, height, width, points\)'):
    losses.star_loss(jnp.ones((8, 8, 3)), jnp.zeros((1, 3, 2)))
  with pytest.raises(ValueError, match='distance'):
    losses.star_loss(jnp.ones((1, 8, 8, 3)), jnp.zeros((1, 3, 2)), dist='huber')


# ------------------------------------------------------------------------------------------------
# Soft-argmax and coordinate losses
# ------------------------------------------------------------------------------------------------

def test_soft_argmax_matches_the_official_decoder():
  rng = np.random.default_rng(4)
  maps = rng.random((2, 9, 13, 3)).astype(np.float32)
  maps[1, ..., 2] = 0.0
  ours = np.asarray(jax.jit(decoding.soft_argmax)(jnp.asarray(maps)))
  # The official decoder, in NHWC: grid arange(n) / (n - 1) * 2 - 1, sums clamped at 1e-6.
  xs = np.arange(13) / 12 * 2 - 1
  ys = np.arange(9) / 8 * 2 - 1
  total = np.maximum(maps.sum((1, 2)), 1e-6)
  expected = np.stack([(maps * xs[None, None, :, None]).sum((1, 2)) / total,
                       (maps * ys[None, :, None, None]).sum((1, 2)) / total], -1)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(ours[1, 2], [0.0, 0.0])
  # A one-hot map decodes to its pixel on the align-corners grid: column 12 -> x = 1, row 2 -> y = -0.5.
  one_hot = np.zeros((1, 9, 13, 1), np.float32)
  one_hot[0, 2, 12, 0] = 5.0
  np.testing.assert_allclose(np.asarray(jax.jit(decoding.soft_argmax)(jnp.asarray(one_hot)))[0, 0], [1.0, -0.5],
                             atol=1e-7)
  # heatmap_moments' means are the same soft-argmax.
  np.testing.assert_allclose(np.asarray(jax.jit(decoding.heatmap_moments)(jnp.asarray(maps))[0]), ours, atol=1e-6)


def test_smooth_l1_is_the_official_piecewise_function():
  delta = np.array([0.0, 0.005, 0.01, 0.1, 2.0], np.float32)
  values = np.asarray(losses.smooth_l1(jnp.asarray(delta) ** 2))
  np.testing.assert_allclose(values, [0.0, 0.5 / 0.01 * 0.005 ** 2, 0.005, 0.095, 1.995], rtol=1e-5, atol=1e-9)
  pred = jnp.asarray([[[0.003, 0.004], [1.0, 1.0]]])             # distances 0.005 and sqrt(2)
  np.testing.assert_allclose(float(losses.smooth_l1_loss(pred, jnp.zeros_like(pred))),
                             (0.00125 + np.sqrt(2) - 0.005) / 2, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Multi-stack loss
# ------------------------------------------------------------------------------------------------

def _loss_cfg(kind='star', **kw):
  cfg = ml_collections.ConfigDict(dict(kind=kind, star_w=1.0, star_dist='smoothl1', star_eps=1e-5,
                                       eig_clamp=0.0, weights=(1.0, 10.0, 10.0)))
  cfg.update(kw)
  return cfg


def _stack_outputs(nstack=2, aam=True, seed=5):
  rng = np.random.default_rng(seed)
  b, n, e, s = 2, 4, 3, 12
  outputs = []
  for _ in range(nstack):
    fusion, _ = _gaussian_maps(rng, b, s, n)
    out = {'fusion_heatmaps': jnp.asarray(fusion),
           # Deliberately different from the fusion maps: STAR must not read these.
           'heatmaps': jnp.asarray(rng.random((b, s, s, n)), jnp.float32),
           'landmarks': decoding.soft_argmax(jnp.asarray(fusion))}
    if aam:
      out['pointmaps'] = jnp.asarray(rng.random((b, s, s, n)), jnp.float32)
      out['edgemaps'] = jnp.asarray(rng.random((b, s, s, e)), jnp.float32)
    outputs.append(out)
  batch = {'landmarks': jnp.asarray(rng.uniform(-0.8, 0.8, (b, n, 2)), jnp.float32),
           'pointmaps': jnp.asarray(rng.random((b, s, s, n)) ** 4, jnp.float32),
           'edgemaps': jnp.asarray(rng.random((b, s, s, e)) ** 4, jnp.float32)}
  return outputs, batch


def test_wing_is_the_official_piecewise_function():
  # lib/loss/wingLoss.py: omega 0.01, epsilon 2, C = omega - omega log(1 + omega / epsilon), the
  # distance clamped at sqrt(1e-6).
  omega, eps = 0.01, 2.0
  c = omega - omega * np.log(1 + omega / eps)
  d = np.array([0.0, 0.0005, 0.005, 0.0099, 0.0101, 0.5, 3.0])
  clamped = np.sqrt(np.maximum(d ** 2, 1e-6))
  want = np.where(clamped < omega, omega * np.log(1 + clamped / eps), clamped - c)
  np.testing.assert_allclose(np.asarray(losses.wing(jnp.asarray(d, jnp.float32) ** 2)), want, rtol=1e-5, atol=1e-9)


def test_star_wing_distance_v1_norm_and_v2_projections():
  """'wing' (official star_dist option): STARLoss applies WingLoss to the norm of the scaled 2-vector
  (as smooth-L1); STARLoss_v2, whose official code raises a TypeError for it, to each projection."""
  rng = np.random.default_rng(3)
  maps, _ = _gaussian_maps(rng, 2, 16, 5)
  targets = jnp.asarray(rng.uniform(-0.5, 0.5, (2, 5, 2)), jnp.float32)
  error, evalues, evectors = (np.asarray(a, np.float64) for a in
                              losses._decompose(jnp.asarray(maps), targets, 1e-5, 0.0, 'pin'))  # pylint: disable=protected-access
  proj = np.einsum('bni,bnik->bnk', error, evectors)
  omega, eps = 0.01, 2.0
  c = omega - omega * np.log(1 + omega / eps)

  def wing_np(d2):
    d = np.sqrt(np.maximum(d2, 1e-6))
    return np.where(d < omega, omega * np.log(1 + d / eps), d - c)

  eig = np.abs(evalues).sum(-1)
  v2 = (wing_np(proj ** 2) / np.sqrt(evalues + 1e-5)).sum(-1) + 0.5 * eig
  v1 = wing_np(((proj / np.sqrt(evalues + 1e-5)) ** 2).sum(-1)).mean() + 0.5 * eig.mean()
  np.testing.assert_allclose(float(losses.star_loss(jnp.asarray(maps), targets, w=0.5, dist='wing')), v2.mean(),
                             rtol=1e-4)
  np.testing.assert_allclose(float(losses.star_loss_v1(jnp.asarray(maps), targets, w=0.5, dist='wing')), v1,
                             rtol=1e-4)


@pytest.mark.parametrize('kind', ['star', 'star_v1', 'l1', 'l2', 'smoothl1', 'none'])
def test_multistack_loss_weights_stacks_and_terms_as_the_official_code(kind):
  outputs, batch = _stack_outputs(nstack=3)
  cfg = _loss_cfg(kind, star_w=0.5, star_dist='l1')
  total, metrics = jax.jit(lambda o, b: losses.multistack_loss(o, b, cfg))(outputs, batch)
  landmark = {
      'star': lambda o: losses.star_loss(o['fusion_heatmaps'], batch['landmarks'], w=0.5, dist='l1'),
      'star_v1': lambda o: losses.star_loss_v1(o['fusion_heatmaps'], batch['landmarks'], w=0.5, dist='l1'),
      'l1': lambda o: jnp.mean(jnp.abs(o['landmarks'] - batch['landmarks'])),   # F.l1_loss
      'l2': lambda o: jnp.mean((o['landmarks'] - batch['landmarks']) ** 2),
      'smoothl1': lambda o: losses.smooth_l1_loss(o['landmarks'], batch['landmarks']),
      'none': lambda o: 0.0,
  }[kind]

  @jax.jit
  def by_hand(outputs):
    expected, terms = 0.0, []
    for out, factor in zip(outputs, (0.25, 0.5, 1.0)):
      point = losses.awing_loss(out['pointmaps'], batch['pointmaps'])
      edge = losses.awing_loss(out['edgemaps'], batch['edgemaps'])
      expected += factor * (1.0 * landmark(out) + 10.0 * point + 10.0 * edge)
      terms.append((point, edge))
    return expected, terms

  expected, terms = by_hand(outputs)
  for i, (point, edge) in enumerate(terms):
    np.testing.assert_allclose(float(metrics[f'stack{i}/pointmap']), float(point), rtol=1e-5)
    np.testing.assert_allclose(float(metrics[f'stack{i}/edgemap']), float(edge), rtol=1e-5)
    assert (f'stack{i}/landmark' in metrics) == (kind != 'none')
  np.testing.assert_allclose(float(total), float(expected), rtol=1e-5)
  np.testing.assert_allclose(float(metrics['loss']), float(total), rtol=1e-7)


def test_multistack_loss_without_aam_has_landmark_terms_only():
  outputs, batch = _stack_outputs(nstack=2, aam=False)
  gt = batch['landmarks']
  total, metrics = jax.jit(lambda o: losses.multistack_loss(o, {'landmarks': gt}, _loss_cfg()))(outputs)
  by_hand = jax.jit(lambda o: 0.5 * losses.star_loss(o[0]['fusion_heatmaps'], gt)
                    + losses.star_loss(o[1]['fusion_heatmaps'], gt))
  np.testing.assert_allclose(float(total), float(by_hand(outputs)), rtol=1e-5)
  assert sorted(metrics) == ['loss', 'stack0/landmark', 'stack1/landmark']


def test_multistack_loss_gradient_reaches_every_output():
  outputs, batch = _stack_outputs(nstack=2)
  grads = jax.jit(jax.grad(lambda o: losses.multistack_loss(o, batch, _loss_cfg())[0]))(outputs)
  for g in grads:
    for key in ('fusion_heatmaps', 'pointmaps', 'edgemaps'):
      assert np.isfinite(np.asarray(g[key])).all() and np.abs(np.asarray(g[key])).max() > 0
    assert np.abs(np.asarray(g['heatmaps'])).max() == 0      # STAR reads the fusion maps only


def test_multistack_loss_rejects_unknown_kind():
  outputs, batch = _stack_outputs(nstack=1)
  with pytest.raises(ValueError, match='loss.kind'):
    losses.multistack_loss(outputs, batch, _loss_cfg('wing'))


def test_awing_custom_gradient_matches_autodiff_of_the_formula():
  """awing_loss's hand-written VJP against JAX's autodiff of the textbook formula (float64),
  on both branches (|pred - target| below and above theta), ties pred == target, and target 0 / 1."""
  def plain(pred, target, omega=14.0, theta=0.5, epsilon=1.0, alpha=2.1):
    delta = jnp.abs(pred - target)
    power = alpha - target
    a = omega / (1 + (theta / epsilon) ** power) * power * (theta / epsilon) ** (power - 1) / epsilon
    c = theta * a - omega * jnp.log1p((theta / epsilon) ** power)
    loss = jnp.where(delta < theta, omega * jnp.log1p((delta / epsilon) ** power), a * delta - c)
    return (loss * losses.awing_weight_map(target)).mean()

  with jax.enable_x64(True):
    k1, k2 = jax.random.split(jax.random.key(3))
    target = jax.random.uniform(k1, (2, 6, 5, 3), jnp.float64) ** 3
    target = target.at[0, 0, 0].set(1.0).at[0, 1, 1].set(0.0)
    pred = jax.random.uniform(k2, target.shape, jnp.float64)
    pred = pred.at[1, 2].set(target[1, 2])   # exact ties: zero gradient there, as autograd gives
    ours = jax.value_and_grad(losses.awing_loss)(pred, target)
    ref = jax.value_and_grad(plain)(pred, target)
    np.testing.assert_allclose(ours[0], ref[0], rtol=1e-12)
    np.testing.assert_allclose(ours[1], ref[1], rtol=1e-10, atol=1e-14)
    assert np.all(np.asarray(ours[1][1, 2]) == 0)
