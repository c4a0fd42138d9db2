"""StackedHGNet against the official PyTorch StackedHGNetV1, plus its building blocks.

Golden data (tests/testdata): tiny_{wflw,cofw}_checkpoint.pkl are the official tiny models (input 64,
nstack 4, nlevels 4, 32 channels; random weights, non-trivial BatchNorm statistics) saved with
torch.save; tiny_outputs.npz holds the official outputs for a fixed input (see
scripts/make_test_data.py for how it is made). The weights are loaded through the checkpoint
converter, so these tests also check the converter's mapping and the BGR -> RGB stem swap: the
official net sees `input_nchw` (BGR), ours the same pixels with the channels reversed (RGB).

Train mode (batch statistics) of these random tiny models is numerically ill-conditioned: the
official code's own float32 and float64 runs differ by ~2e-5 at stack 0 and up to 2e-2 at stack 3.
So train mode is checked in float32 on stack 0 (1e-4), and in float64 on both sides (the official
float64 run, float64 throughout, is in tiny_outputs.npz) to 1e-11 on stacks 0-1, which already exercise
every kind of layer, and to 1e-8 on stacks 2-3, which repeat stack 1's code.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import DATA, load_config
from star_jax import convert_pytorch, layouts
from star_jax.models import StackedHGNet, create_model, preprocess
from star_jax.models.layers import BatchNorm, coord_channels, max_pool_2x2, upsample_nearest_2x

DATASETS = ('WFLW', 'COFW')
POINT_STEP = {'WFLW': 12, 'COFW': 7}   # channel subsets stored in tiny_outputs.npz
MAP_KEYS = ('pointmaps', 'edgemaps', 'fusion_heatmaps')


@pytest.fixture(scope='module')
def golden():
  return dict(np.load(DATA / 'tiny_outputs.npz'))


def tiny_model(dataset, dtype='float32'):
  layout = layouts.get_layout(dataset)
  return StackedHGNet(layout.num_points, layout.edge_membership(), image_size=64, nstack=4,
                      nlevels=4, channels=32, dtype=dtype, rngs=nnx.Rngs(0))


@pytest.fixture(scope='module')
def official_weights():
  return {d: convert_pytorch.read_torch_checkpoint(str(DATA / f'tiny_{d.lower()}_checkpoint.pkl'))['net']
          for d in DATASETS}


def rgb_input(golden, dtype=np.float32):
  """The official BGR NCHW input as our RGB NHWC input."""
  return jnp.asarray(golden['input_nchw'].transpose(0, 2, 3, 1)[..., ::-1].astype(dtype))


def as_nchw_subset(dataset, key, array):
  array = np.asarray(array).transpose(0, 3, 1, 2)
  return array[:, ::3 if key == 'edgemaps' else POINT_STEP[dataset]]


def check(outputs, golden, prefix, dataset, stacks, lm_tol, map_tol):
  for i in stacks:
    got = outputs[i]
    np.testing.assert_allclose(got['landmarks'], golden[f'{prefix}/stack{i}/landmarks'], rtol=0,
                               atol=lm_tol, err_msg=f'{prefix} stack {i} landmarks')
    for key in MAP_KEYS:
      if f'{prefix}/stack{i}/{key}' in golden:
        np.testing.assert_allclose(as_nchw_subset(dataset, key, got[key]),
                                   golden[f'{prefix}/stack{i}/{key}'], rtol=0, atol=map_tol,
                                   err_msg=f'{prefix} stack {i} {key}')


@pytest.mark.parametrize('dataset', DATASETS)
def test_matches_official_float32(dataset, golden, official_weights):
  model = convert_pytorch.load_into_model(official_weights[dataset], tiny_model(dataset))
  x = rgb_input(golden)
  model.eval()
  outputs = model(x)
  assert len(outputs) == 4
  check(outputs, golden, f'{dataset}/f32/eval', dataset, range(4), 1e-5, 1e-4)
  # Colour order matters: feeding the BGR order to our (RGB) model must not match.
  bgr = model(x[..., ::-1])
  assert np.abs(np.asarray(bgr[-1]['landmarks']) - golden[f'{dataset}/f32/eval/stack3/landmarks']).max() > 1e-3
  model.train()
  check(model(x), golden, f'{dataset}/f32/train', dataset, [0], 1e-4, 1e-4)


@pytest.mark.parametrize('dataset', DATASETS)
def test_matches_official_float64(dataset, golden, official_weights):
  # The official float64 outputs are float64 throughout (its float32 coordinate grids and CoordConv
  # channels run in float64 too, as ours in float64): measured 1e-14 in eval mode, and in train mode
  # 2e-13 at stack 0 growing to 1.4e-10 at stack 3 (train mode amplifies rounding); the stack-1 maps are
  # stored rounded to float32.
  with jax.enable_x64(True):
    model = convert_pytorch.load_into_model(official_weights[dataset], tiny_model(dataset, jnp.float64))
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model)))
    x = rgb_input(golden, np.float64)
    model.eval()
    check(model(x), golden, f'{dataset}/f64/eval', dataset, range(4), 1e-12, 1e-12)
    model.train()
    outputs = model(x)
    check(outputs, golden, f'{dataset}/f64/train', dataset, [0, 1], 1e-11, 1e-7)
    check(outputs, golden, f'{dataset}/f64/train', dataset, [2, 3], 1e-8, 1e-7)


def test_outputs_shapes_dtypes_and_bfloat16():
  layout = layouts.COFW
  kw = dict(image_size=32, nstack=2, nlevels=1, channels=8, rngs=nnx.Rngs(1))
  f32 = StackedHGNet(layout.num_points, layout.edge_membership(), **kw)
  bf16 = StackedHGNet(layout.num_points, layout.edge_membership(), dtype='bfloat16', **kw)
  nnx.update(bf16, nnx.state(f32))
  images = preprocess(np.random.default_rng(0).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8))
  f32.eval()
  bf16.eval()
  ref, low = f32(images), bf16(images)
  shapes = {'landmarks': (3, 29, 2), 'heatmaps': (3, 8, 8, 29), 'fusion_heatmaps': (3, 8, 8, 29),
            'pointmaps': (3, 8, 8, 29), 'edgemaps': (3, 8, 8, 7)}
  for outs in (ref, low):
    assert len(outs) == 2
    for out in outs:
      assert {k: v.shape for k, v in out.items()} == shapes
      assert all(v.dtype == jnp.float32 for v in out.values())
      assert np.all(np.abs(np.asarray(out['landmarks'])) <= 1)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(bf16)))
  # bfloat16 compute stays close to float32 (8-bit mantissas through two stacks of an untrained
  # net; unrelated landmarks would differ by ~0.5 on average).
  diff = np.abs(np.asarray(low[-1]['landmarks']) - np.asarray(ref[-1]['landmarks']))
  assert 0 < diff.mean() < 0.02, diff.mean()


def test_without_aam_and_coordconv():
  model = StackedHGNet(5, None, image_size=32, nstack=2, nlevels=1, channels=8, add_coord=False,
                       use_aam=False, rngs=nnx.Rngs(0))
  model.eval()
  outs = model(jnp.zeros((1, 32, 32, 3)))
  assert set(outs[0]) == {'landmarks', 'heatmaps', 'fusion_heatmaps'}
  np.testing.assert_array_equal(outs[1]['fusion_heatmaps'], outs[1]['heatmaps'])
  assert model.stem.conv.kernel.shape == (7, 7, 3, 64)      # no coordinate channels
  assert model.hourglasses[1].coordconv is None


def test_create_model_from_config_and_bad_sizes():
  config = load_config('cofw', 'tiny')
  model = create_model(config, nnx.Rngs(0))
  assert model.num_points == 29 and model.nstack == config.model.nstack
  assert model.hourglasses[0].coordconv.conv.kernel.shape == (1, 1, 32 + 3, 32)      # x, y, r
  assert model.hourglasses[1].coordconv.conv.kernel.shape == (1, 1, 32 + 5, 32)      # + boundary
  with pytest.raises(ValueError, match='multiple of'):
    StackedHGNet(29, layouts.COFW.edge_membership(), image_size=72, nlevels=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='built for 64x64'):
    model(jnp.zeros((1, 32, 32, 3)))


def test_train_mode_updates_batchnorm_like_pytorch():
  bn = BatchNorm(3)
  x = jax.random.normal(jax.random.key(0), (2, 4, 5, 3)) * jnp.array([1.0, 2.0, 3.0]) + 1.5
  bn.train()
  y = bn(x)
  flat = np.asarray(x).reshape(-1, 3)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 3),
                             (flat - flat.mean(0)) / np.sqrt(flat.var(0) + 1e-5), atol=1e-5)
  # PyTorch: running = 0.9 running + 0.1 batch, with the *unbiased* variance for the running var.
  np.testing.assert_allclose(bn.mean[...], 0.1 * flat.mean(0), rtol=1e-5)
  np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * flat.var(0, ddof=1), rtol=1e-5)
  bn.eval()
  before = np.asarray(bn.var[...]).copy()
  np.testing.assert_allclose(bn(x), (x - bn.mean[...]) / np.sqrt(bn.var[...] + 1e-5), atol=1e-5)
  np.testing.assert_array_equal(bn.var[...], before)


def test_grids_are_float32_bit_equal_or_float64_throughout():
  from star_jax.models.decoding import align_corners_grid  # pylint: disable=import-outside-toplevel
  for n in (2, 16, 64, 256):
    # The official float32 grid: torch.arange(n).float() / (n - 1) * 2 - 1, one float32 rounding per step.
    i = np.arange(n, dtype=np.float32)
    official32 = (i / np.float32(n - 1)) * np.float32(2) - np.float32(1)
    np.testing.assert_array_equal(align_corners_grid(n), official32)
    assert align_corners_grid(n, jnp.bfloat16).dtype == np.float32   # narrower dtypes get the float32 grid
    grid64 = align_corners_grid(n, np.float64)
    assert grid64.dtype == np.float64
    np.testing.assert_array_equal(grid64, np.arange(n) / (n - 1) * 2.0 - 1.0)
    assert np.abs(grid64 - official32).max() > 0 or n == 2   # float32 grids are off by up to 6e-8
  c64 = coord_channels(16, 16, np.float64)
  assert c64.dtype == np.float64
  r = np.sqrt(c64[..., 0] ** 2 + c64[..., 1] ** 2)
  np.testing.assert_array_equal(c64[..., 2], r / r.max())
  np.testing.assert_array_equal(coord_channels(16, 16), coord_channels(16, 16, jnp.float32))
  assert np.abs(c64 - coord_channels(16, 16)).max() < 1e-7


def test_coord_channels_follow_official_order():
  c = coord_channels(4, 6)
  np.testing.assert_allclose(c[:, 0, 0], [-1, -1 / 3, 1 / 3, 1], atol=1e-6)  # channel 0: down rows
  np.testing.assert_allclose(c[0, :, 1], np.linspace(-1, 1, 6), atol=1e-6)   # channel 1: across
  assert c[..., 2].max() == 1 and c[..., 2].min() > 0


def test_pool_and_upsample():
  x = jnp.arange(2 * 4 * 6 * 1, dtype=jnp.float32).reshape(2, 4, 6, 1)
  pooled = max_pool_2x2(x)
  np.testing.assert_array_equal(pooled[0, :, :, 0], [[7, 9, 11], [19, 21, 23]])
  np.testing.assert_array_equal(upsample_nearest_2x(pooled)[0, :2, :2, 0], [[7, 7], [7, 7]])


def test_preprocess():
  out = preprocess(np.array([[[0, 127, 255]]], np.uint8))
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out, [[[-1.0, -0.5 / 127.5, 1.0]]])


def test_preprocess_is_bit_equal_to_the_official_pipeline():
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 1, 256)
  # The official AlignmentDataset: float32 image, (img - means) * scale with scale = 1 / 127.5.
  official = (pixels.astype(np.float32) - 127.5) * (1 / 127.5)
  assert official.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(preprocess(pixels)), official)
  # Dividing instead would differ in the last bit for about half of the values (what this pins down).
  assert np.sum((pixels.astype(np.float32) - np.float32(127.5)) / np.float32(127.5) != official) > 100


def test_jit_gradients_are_finite():
  layout = layouts.COFW
  model = StackedHGNet(layout.num_points, layout.edge_membership(), image_size=16, nstack=2,
                       nlevels=1, channels=8, rngs=nnx.Rngs(0))
  model.train()

  @nnx.jit
  def step(model, x):
    def loss_fn(model):
      return sum(jnp.mean(o['landmarks'] ** 2) + jnp.mean(o['pointmaps']) for o in model(x))
    return nnx.grad(loss_fn)(model)

  grads = step(model, jax.random.normal(jax.random.key(0), (2, 16, 16, 3)))
  leaves = jax.tree.leaves(grads)
  assert leaves and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert float(jnp.abs(grads['stem']['conv']['kernel'][...]).max()) > 0
  # BatchNorm statistics moved during the train-mode call.
  assert float(jnp.abs(model.stem.bn.mean[...]).max()) > 0


# --- Hand-written gradients (layers.py) against JAX's autodiff of the plain formulas ---------------

def _plain_batch_norm(x, scale, bias, eps, relu):
  mean = x.mean((0, 1, 2))
  var = jnp.square(x - mean).mean((0, 1, 2))
  y = (x - mean) / jnp.sqrt(var + eps) * scale + bias
  return (jax.nn.relu(y) if relu else y), mean, var


@pytest.mark.parametrize('relu', [False, True])
def test_batch_norm_custom_gradient_matches_autodiff(relu):
  from star_jax.models.layers import _batch_norm_train  # pylint: disable=import-outside-toplevel
  with jax.enable_x64(True):
    keys = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(keys[0], (3, 5, 4, 6), jnp.float64) * 2 + 0.5
    scale = jax.random.normal(keys[1], (6,), jnp.float64)
    bias = jax.random.normal(keys[2], (6,), jnp.float64)
    # Cotangents on all three outputs: the running statistics use mean and var, a loss might too.
    cts = (jax.random.normal(keys[3], x.shape, jnp.float64),
           jax.random.normal(keys[4], (6,), jnp.float64), jax.random.normal(keys[5], (6,), jnp.float64))
    ours, vjp_ours = jax.vjp(lambda *a: _batch_norm_train(*a, 1e-5, relu), x, scale, bias)
    ref, vjp_ref = jax.vjp(lambda *a: _plain_batch_norm(*a, 1e-5, relu), x, scale, bias)
    for a, b in zip(ours, ref):
      np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(vjp_ours(cts), vjp_ref(cts)):
      np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


def test_batch_norm_module_gradient_float32():
  bn = BatchNorm(4)
  bn.scale[...] = jnp.array([1.0, -0.5, 2.0, 0.3])
  x = jax.random.normal(jax.random.key(2), (2, 3, 3, 4)) * 3 + 1
  w = jax.random.normal(jax.random.key(3), x.shape)
  ours = nnx.grad(lambda m, v: jnp.sum(m(v, relu=True) * w), argnums=1)(bn, x)
  ref = jax.grad(lambda v: jnp.sum(_plain_batch_norm(v, bn.scale[...], bn.bias[...], 1e-5, True)[0] * w))(x)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_max_pool_gradient_goes_to_first_maximum_like_pytorch():
  x = jnp.array([[1.0, 3.0], [3.0, 0.0]]).reshape(1, 2, 2, 1)   # a tie: positions (0, 1) and (1, 0)
  g = jax.grad(lambda v: max_pool_2x2(v).sum())(x)
  np.testing.assert_array_equal(g[0, :, :, 0], [[0, 1], [0, 0]])  # PyTorch: first in row-major order
  # Without ties it equals autodiff of the plain max, on an odd-sized map (last row / column dropped).
  x = jax.random.normal(jax.random.key(4), (2, 7, 5, 3))
  w = jax.random.normal(jax.random.key(5), (2, 3, 2, 3))
  plain = lambda v: v[:, :6, :4].reshape(2, 3, 2, 2, 2, 3).max(axis=(2, 4))
  np.testing.assert_array_equal(max_pool_2x2(x), plain(x))
  np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(max_pool_2x2(v) * w))(x),
                             jax.grad(lambda v: jnp.sum(plain(v) * w))(x), rtol=0, atol=0)


@pytest.mark.parametrize('stride', [1, 2])
def test_matmul_weight_gradient_convolution_matches_autodiff(stride):
  from star_jax.models.layers import _conv, conv_matmul_weight_grad  # pylint: disable=import-outside-toplevel
  x = jax.random.normal(jax.random.key(6), (2, 9, 8, 5))
  kernel = jax.random.normal(jax.random.key(7), (3, 3, 5, 4))
  y, vjp = jax.vjp(lambda a, k: conv_matmul_weight_grad(a, k, stride), x, kernel)
  y_ref, vjp_ref = jax.vjp(lambda a, k: _conv(a, k, stride), x, kernel)
  np.testing.assert_array_equal(y, y_ref)
  ct = jax.random.normal(jax.random.key(8), y.shape)
  for a, b in zip(vjp(ct), vjp_ref(ct)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_cpu_only_convolution_gradient_is_chosen_on_the_cpu_alone(monkeypatch):
  """`matmul_weight_gradients` (the XLA:CPU weight-gradient VJP) is chosen for wide 3x3 convolutions on
  the CPU backend only: on a GPU (or TPU) the convolution keeps XLA's (cuDNN's) own gradient."""
  from star_jax.models import layers
  wide, narrow, small_map = (8, 64, 64, 128), (8, 64, 64, 64), (8, 16, 16, 256)
  monkeypatch.setattr(jax, 'default_backend', lambda: 'cpu')
  assert layers.matmul_weight_gradients(wide, 1)
  assert not layers.matmul_weight_gradients(narrow, 1) and not layers.matmul_weight_gradients(small_map, 1)
  conv = layers.Conv2d(128, 8, 3, rngs=nnx.Rngs(0))
  graph, params = nnx.split(conv)
  x = jnp.ones((1, 32, 32, 128))
  grad_jaxpr = lambda: str(jax.make_jaxpr(jax.grad(lambda p: nnx.merge(graph, p)(x).sum()))(params))
  assert 'scan' in grad_jaxpr()   # the per-tap matmul loop of conv_matmul_weight_grad
  for backend in ('gpu', 'cuda', 'rocm', 'tpu'):
    monkeypatch.setattr(jax, 'default_backend', lambda b=backend: b)
    assert not layers.matmul_weight_gradients(wide, 1), backend
    assert 'scan' not in grad_jaxpr() and 'conv_general_dilated' in grad_jaxpr(), backend
