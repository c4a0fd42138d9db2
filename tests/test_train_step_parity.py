"""Three official training steps, reproduced by our training step in float64 and in float32.

Golden data: three steps of the official PyTorch trainer (utility.forward_backward: compute_loss over
the 12 per-stack terms, zero_grad, backward, Adam lr 1e-3, then accumulate_net, the EMA of weights and
float buffers with decay 0.5 ** (4 / 10000)) on a tiny WFLW network (input 64, nstack 4, nlevels 4,
16 channels, CoordConv, AAM), batch 4, everything in float64, from the weights under init/ (official
state-dict layout). Read from $STAR_JAX_TRAIN_STEP_GOLDEN if set (the shared train_step.npz or a file
like the next), else tests/data/train_step_golden.npz, made from the shared file by
scripts/make_train_step_golden.py (which describes its encoding and the storage error per group).

What runs, in a subprocess per dtype (x64 on for float64; compiled programs cached between runs,
conftest.COMPILE_CACHE_ENV): init/ goes through our converter (convert_pytorch.load_into_model) into
the state `training.state.create_train_state` builds; the three batches go, as the input pipeline
delivers them (uint8 RGB (4, 64, 64, 3), float32 landmarks (4, 98, 2) in [-1, 1], point maps
(4, 16, 16, 98) and edge maps (4, 16, 16, 9) channels-last), through the function the trainer
jit-compiles, `training.step.make_train_step`, jitted with the state donated as the trainer does. The
step-1 gradients are read back from Adam's first moment after step 1 (optax's mu = (1 - b1) g, so
g = mu / (1 - b1) to 1 ulp). Our state is then written out in the official layout (OIHW, stem colour
channels back in BGR order) and compared, per tensor, by max |ours - official| / max |official|.

The official CoordConv radius channel. The official code computes it in float32 with torch.sqrt,
which on a CPU is MKL's vectorised sqrt, not correctly rounded: 614 of the 4096 values (64 x 64) and
32 of 256 (16 x 16) differ by 1-2 ulps from ours (layers.coord_channels: the correctly rounded
sqrt, as a GPU computes it too). In float64 that 6e-8 input difference grows to ~1e-6 in the step-1 losses, 3.7e-3 in the
step-1 gradients and 2.3e-2 in the step-2 losses (measured: --our-radius below), so the float64 run
uses the reference run's own channel, stored in the golden file; production code keeps the correctly
rounded one. The float32 run uses ours.

Tolerances (FLOAT64_TOL, FLOAT32_TOL) and why some are above 1e-8. Measured with
  python tests/test_train_step_parity.py --dtype float64 --report    (and --dtype float32)
and, for the official code's own spread, by rerunning the official steps in float64 with one thread
instead of several (a different but equally valid summation order):

  float64                         tolerance   ours      official, 1 thread
  losses + total, steps 1-2       1e-8        2.2e-12   5.1e-13
  losses + total, step 3          1e-6        1.5e-7    3.0e-8
  step-1 gradients                1e-8        1.2e-9    7.0e-12
  step-3 weights                  2e-4        3.2e-5    6.7e-6
    zero-gradient biases          1e-3        2.1e-4    1.8e-4
  step-3 BatchNorm statistics     1e-5        2.2e-6    4.4e-7
  EMA weights                     5e-8        9.1e-9    2.0e-9
    zero-gradient biases          3e-7        6.0e-8    5.1e-8
  EMA BatchNorm statistics        1e-8        7.1e-10   4.5e-10
  Adam mu, nu                     1e-3        1.2e-4, 2.0e-4   2.3e-5, 4.1e-5

Why step 3 cannot reach 1e-8: Adam moves every element by about lr whatever its gradient's size
(update = mu_hat / (sqrt(nu_hat) + 1e-8)), so an element whose gradient is small, or whose two
gradients nearly cancel in mu, carries its float64 rounding (relative to the tensor's largest
gradient) into its weight at full relative size. The network is badly conditioned (train-mode
BatchNorm over 4 values at the 1 x 1 bottleneck of each hourglass), so the step-3 forward pass turns
those ~1e-9 weight differences into 1e-7 in the losses, and the step-3 gradients differ by ~1e-4,
which Adam's moments and the weights inherit. The official code does the same to itself (last
column). Zero-gradient tensors: 204 biases get no gradient at all, the loss being invariant to them
(conv biases before a train-mode BatchNorm, which subtracts the batch mean, and biases whose
per-channel shift a later BatchNorm or instance norm removes); official and our gradients for them
are both rounding noise, <= 1e-15 of the largest gradient, which Adam's normalisation turns into
weight updates of up to ~lr / 100. For them the test checks that our gradient vanishes (< 1e-12 of
the largest; measured 5.5e-16) and our moments stay at that noise level (mu 3.7e-16, nu 1.4e-31 of
the largest official value), and compares their weights with the looser tolerances above.

Float32 (production) against the same float64 golden. Float32 rounding is amplified like any other
perturbation: the official code in float32 is as far from its own float64 run. Measured, ours /
official float32 (several threads) -> tolerance:
  step-1 losses 1.1e-4 / 3.4e-5 -> 1e-3; step-2 losses 1.6e-2 / 2.3e-2 -> 0.1;
  step-3 losses 2.4e-2 / 4.1e-2 -> 0.2;
  step-1 gradients per tensor 1.2 / 0.14 -> 5, and their cosine with the official gradient (all
  tensors together) 0.964 / 1.000 -> >= 0.9;
  step-3 weights 0.12 / 0.12 -> 0.5 (zero-gradient biases 0.068 / 0.072 -> 0.5), cosine of the
  weight updates (value - init) 0.58 / 0.55 -> >= 0.4;
  BatchNorm statistics 0.45 / 0.27 -> 2;
  EMA weights 7.5e-5 / 7.0e-5 -> 5e-4 (biases 3.9e-5 / 4.0e-5 -> 5e-4), cosine of the EMA updates
  0.73 / 0.78 -> >= 0.5;
  EMA statistics 2.7e-4 / 2.1e-4 -> 2e-3;
  Adam mu, nu 12, 140 / 36, 1100 -> 50, 1e3: bounds only. After three float32 steps Adam's moments
  no longer resemble the float64 ones (official float32: cosine 0.02 for mu), as the step-3
  gradients are dominated by the near-singular bottleneck BatchNorms.
Our step-1 gradients are further from float64 than the official float32 ones (cosine 0.964 against
1.000): XLA:CPU's float32 k x k convolutions round about twice as much as PyTorch's oneDNN ones
(per BatchNorm output, median 2x; with those convolutions accumulated in float64 ours is 4x closer to
float64 than PyTorch's float32), and that is enough to flip a ReLU in the 4-value BatchNorm at stack
3's bottleneck, which changes every gradient upstream of it. So the float32 check shows that
production follows the same trajectory; the float64 one checks the arithmetic.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from conftest import COMPILE_CACHE_ENV, DATA, REPO

GOLDEN_ENV = 'STAR_JAX_TRAIN_STEP_GOLDEN'
DEFAULT_GOLDEN = DATA / 'train_step_golden.npz'
STEPS = (1, 2, 3)
LOSS_TERMS = ('landmark', 'pointmap', 'edgemap')   # compute_loss order within a stack
# A step-1 gradient below this fraction of the largest one is rounding noise: the tensor gets no
# gradient (see the module docstring). Real gradients are >= 2e-5 of the largest; noise <= 1e-15.
NULL_GRADIENT = 1e-12

# Per group: the tolerance on max |ours - official| / max |official| per tensor (see the docstring).
# '/null': the tensors whose gradient is rounding noise (`null_gradient_keys`).
FLOAT64_TOL = {
    'losses/steps12': 1e-8, 'losses/step3': 1e-6, 'grad1': 1e-8, 'net': 2e-4, 'net/null': 1e-3,
    'net_stats': 1e-5, 'ema': 5e-8, 'ema/null': 3e-7, 'ema_stats': 1e-8, 'adam_mu': 1e-3,
    'adam_nu': 1e-3,
}
FLOAT32_TOL = {
    'losses/steps12': 0.1, 'losses/step3': 0.2, 'grad1': 5.0, 'net': 0.5, 'net/null': 0.5,
    'net_stats': 2.0, 'ema': 5e-4, 'ema/null': 5e-4, 'ema_stats': 2e-3, 'adam_mu': 50.0,
    'adam_nu': 1e3,
}
# Step 1 alone is a forward pass from the same weights: float32 stays close there.
FLOAT32_STEP1_LOSS_TOL = 1e-3
# Float32, all non-zero-gradient tensors together: least cosine similarity with the official
# step-1 gradient, and with the official step-3 weight and EMA updates (value - init).
FLOAT32_MIN_COSINE = {'step1/grad/': 0.9, 'step3/net/': 0.4, 'step3/net_ema/': 0.5}
# Groups compared against the golden stored with that group's encoding (storage_relerr/<group>).
STORAGE_GROUP = {'grad1': 'step1/grad', 'net': 'step3/net/params', 'net_stats': 'step3/net/stats',
                 'ema': 'step3/net_ema/params', 'ema_stats': 'step3/net_ema/stats',
                 'adam_mu': 'step3/adam_mu', 'adam_nu': 'step3/adam_nu'}


# ---- The golden file ---------------------------------------------------------------------------

def _golden_format():
  """scripts/make_train_step_golden.py, which defines the compact format (`decode`)."""
  spec = importlib.util.spec_from_file_location('make_train_step_golden',
                                                REPO / 'scripts' / 'make_train_step_golden.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def golden_path() -> pathlib.Path:
  return pathlib.Path(os.environ.get(GOLDEN_ENV) or DEFAULT_GOLDEN)


def load_golden(path) -> dict[str, np.ndarray]:
  """The golden arrays under the reference's keys (floats as float64), plus, when present, the
  compact file's extras (coordconv/radius_<n>, storage_relerr/<group>, sha256)."""
  with np.load(path) as f:
    return _golden_format().decode({k: f[k] for k in f.files})


def official_radius(golden: dict) -> dict[int, np.ndarray]:
  """The reference run's CoordConv radius channels {side: (side, side) float32}: from the golden file
  itself, or, for a reference-format file, from tests/data (they are a property of the machine that
  made the reference, not of its data)."""
  if 'coordconv/radius_64' not in golden:
    golden = load_golden(DEFAULT_GOLDEN)
  return {n: np.asarray(golden[f'coordconv/radius_{n}'], np.float32) for n in (64, 16)}


def parity_config(dtype: str):
  """configs/wflw.py at the golden's size: input 64, maps 16, nstack 4, 16 channels, batch 4;
  everything else (optimizer, EMA, loss) as the official defaults there."""
  from star_jax import config_lib  # pylint: disable=import-outside-toplevel
  c = config_lib.load_config(str(REPO / 'configs' / 'wflw.py'))
  c.data.image_size, c.data.heatmap_size = 64, 16
  c.model.nstack, c.model.nlevels, c.model.channels, c.model.dtype = 4, 4, 16, dtype
  c.batch_size = 4
  return c


def _tensor_keys(golden: dict, prefix: str) -> list[str]:
  return sorted(k[len(prefix):] for k in golden if k.startswith(prefix))


def _rel(a, b) -> float:
  """max |a - b| / max |b| (0 when both are all zero)."""
  scale = float(np.abs(b).max())
  diff = float(np.abs(np.asarray(a, np.float64) - b).max())
  return diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf)


def null_gradient_keys(golden: dict) -> set[str]:
  """Parameters whose step-1 gradient is rounding noise (the loss is invariant to them)."""
  grads = {k: golden['step1/grad/' + k] for k in _tensor_keys(golden, 'step1/grad/')}
  largest = max(float(np.abs(g).max()) for g in grads.values())
  return {k for k, g in grads.items() if np.abs(g).max() <= NULL_GRADIENT * largest}


def check_digest(path) -> bool:
  """Whether the file carries a sha256 digest (compact files do); raises AssertionError if it does
  not match the file's content."""
  with np.load(path) as f:
    stored = {k: f[k] for k in f.files}
  if 'sha256' not in stored:
    return False
  assert _golden_format().content_digest(stored) == str(stored['sha256']), \
      f'{path}: the content does not match its sha256 digest'
  return True


def check_golden(golden: dict) -> None:
  """Raises AssertionError unless `golden` (as `load_golden` returns it) is complete and
  self-consistent, and was made with the settings our config gives: a wrong, truncated or edited
  file fails here rather than as a parity failure."""
  # The settings of the official run are ours.
  from star_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  config = parity_config('float64')
  assert int(golden['config/size']) == config.data.image_size
  assert int(golden['config/channels']) == config.model.channels
  assert int(golden['config/nstack']) == config.model.nstack
  assert int(golden['config/batch']) == config.batch_size
  assert float(golden['config/lr']) == config.lr
  np.testing.assert_array_equal(golden['config/betas'], [config.b1, config.b2])
  np.testing.assert_allclose(float(golden['config/ema_decay']), state_lib.ema_decay(config), rtol=1e-15)
  n = config.model.nstack
  weights = [2.0 ** i / 2.0 ** (n - 1) * w for i in range(n) for w in config.loss.weights]
  np.testing.assert_array_equal(golden['config/loss_weights'], weights)
  assert list(golden['config/criterions']) == ['STARLoss_v2', 'AWingLoss', 'AWingLoss'] * n
  assert float(golden['config/star_w']) == config.loss.star_w
  assert str(golden['config/star_dist']) == config.loss.star_dist

  # Inputs, losses: shapes, ranges, and the total is the weighted sum of the 12 terms.
  for k in STEPS:
    assert golden[f'step{k}/image_rgb_uint8'].shape == (4, 64, 64, 3)
    assert golden[f'step{k}/image_rgb_uint8'].dtype == np.uint8
    assert golden[f'step{k}/landmarks'].shape == (4, 98, 2)
    assert np.abs(golden[f'step{k}/landmarks']).max() <= 1.0
    assert golden[f'step{k}/pointmaps'].shape == (4, 98, 16, 16)
    assert golden[f'step{k}/edgemaps'].shape == (4, 9, 16, 16)
    losses = golden[f'step{k}/losses']
    assert losses.shape == (12,) and np.all(losses > 0)
    np.testing.assert_allclose(float(golden[f'step{k}/total_loss']), float(np.dot(weights, losses)),
                               rtol=1e-13, err_msg=f'step {k}: total_loss is not the weighted sum of the 12 terms')

  # Tensors: every state-dict entry at init and after step 3 (net and EMA), with init's shapes;
  # a gradient for every parameter, Adam moments for those that got one.
  init = _tensor_keys(golden, 'init/')
  assert len(init) == 1450, len(init)
  for prefix in ('step3/net/', 'step3/net_ema/'):
    assert _tensor_keys(golden, prefix) == init, prefix
  grads = _tensor_keys(golden, 'step1/grad/')
  assert set(grads) <= set(init) and len(grads) == 902
  for prefix in ('step1/grad/', 'step3/net/', 'step3/net_ema/', 'step3/adam_mu/', 'step3/adam_nu/'):
    for key in _tensor_keys(golden, prefix):
      assert golden[prefix + key].shape == golden['init/' + key].shape, prefix + key
  moments = _tensor_keys(golden, 'step3/adam_mu/')
  assert moments == _tensor_keys(golden, 'step3/adam_nu/') and set(moments) <= set(grads)
  # Every parameter with a gradient has moments; the rest (unused skip projections) had none.
  assert set(grads) - set(moments) == {k for k in grads if not np.any(golden['step1/grad/' + k])}

  # Three optimizer steps: BatchNorm counted 3 batches (the EMA copies integer buffers), the fixed
  # edge-to-point transform is untouched, and nu after step 3 holds at least step 1's b2^2 (1 - b2) g^2
  # (up to nu's 16-bit storage: 2e-5 of the tensor's largest value).
  for key in init:
    if key.endswith('num_batches_tracked'):
      assert int(golden['init/' + key]) == 0
      assert int(golden['step3/net/' + key]) == 3 and int(golden['step3/net_ema/' + key]) == 3, key
    if key.startswith('e2h_transform.'):
      np.testing.assert_array_equal(golden['step3/net/' + key], golden['init/' + key])
      np.testing.assert_array_equal(golden['step3/net_ema/' + key], golden['init/' + key])
  b2 = config.b2
  for key in moments:
    nu, g = golden['step3/adam_nu/' + key], golden['step1/grad/' + key]
    assert np.all(nu >= 0), key
    assert np.all(nu + 2e-5 * nu.max() >= b2 * b2 * (1 - b2) * g * g * (1 - 1e-9)), \
        f'{key}: Adam nu after step 3 is below what the step-1 gradient alone gives'



# ---- Our three steps (run in a subprocess) -----------------------------------------------------

def _to_official(value, kind: str) -> np.ndarray:
  """One of our tensors in the official layout: HWIO -> OIHW, the stem's RGB inputs back to BGR."""
  value = np.asarray(value)
  if kind in ('conv', 'stem'):
    if kind == 'stem':
      value = np.concatenate([value[:, :, 2::-1], value[:, :, 3:]], axis=2)
    value = value.transpose(3, 2, 0, 1)
  return value


def run_steps(golden_file, dtype: str, *, official_coord_radius: bool) -> dict[str, np.ndarray]:
  """Our three training steps on the golden batches; returns the golden's keys for what we computed.

  `official_coord_radius`: use the reference run's CoordConv radius channels (see the module
  docstring) instead of ours. Needs x64 enabled for dtype 'float64'.
  """
  import jax  # pylint: disable=import-outside-toplevel

  from star_jax.models import layers  # pylint: disable=import-outside-toplevel

  if dtype == 'float64' and not jax.config.jax_enable_x64:
    raise RuntimeError('float64 parity needs JAX_ENABLE_X64=1')
  golden = load_golden(golden_file)
  ours = layers.coord_channels
  if official_coord_radius:
    radius = official_radius(golden)

    def coord_channels(height, width):
      channels = ours(height, width).copy()
      channels[..., 2] = radius[height]   # KeyError for a size the reference run did not have
      return channels

    layers.coord_channels = coord_channels   # add_coords looks it up when the step is traced
  try:
    return _run_steps(golden, dtype)
  finally:
    layers.coord_channels = ours


def _run_steps(golden: dict, dtype: str) -> dict[str, np.ndarray]:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from star_jax import convert_pytorch  # pylint: disable=import-outside-toplevel
  from star_jax.training import state as state_lib  # pylint: disable=import-outside-toplevel
  from star_jax.training import step as step_lib  # pylint: disable=import-outside-toplevel

  config = parity_config(dtype)
  tx = state_lib.make_optimizer(config, 1)  # first lr milestone at step 200
  graphs, state = state_lib.create_train_state(config, tx, rng_seed=0)
  model = nnx.merge(graphs.train, state.params, state.batch_stats)
  init = {k: golden['init/' + k] for k in _tensor_keys(golden, 'init/')}
  convert_pytorch.load_into_model(init, model)
  entries, _ = convert_pytorch.torch_key_map(model)
  # The converter stores float32 (as every checkpoint); init's values are float32 numbers, so
  # widening them afterwards loses nothing.
  _, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  params, batch_stats = jax.tree.map(lambda a: a.astype(dtype), (params, batch_stats))
  state = state_lib.TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params), ema_batch_stats=jax.tree.map(jnp.copy, batch_stats))
  train_step = jax.jit(step_lib.make_train_step(graphs, tx, config), donate_argnums=(0,))

  def adam(opt_state) -> optax.ScaleByAdamState:
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    assert len(found) == 1, opt_state
    return found[0]

  out = {}
  for k in STEPS:
    batch = {
        'image': golden[f'step{k}/image_rgb_uint8'],
        'landmarks': golden[f'step{k}/landmarks'].astype(np.float32),
        'pointmaps': golden[f'step{k}/pointmaps'].transpose(0, 2, 3, 1).astype(np.float32),
        'edgemaps': golden[f'step{k}/edgemaps'].transpose(0, 2, 3, 1).astype(np.float32),
    }
    state, metrics = train_step(state, batch)
    out[f'step{k}/losses'] = np.array([float(metrics[f'stack{i}/{t}']) for i in range(config.model.nstack)
                                       for t in LOSS_TERMS])
    out[f'step{k}/total_loss'] = np.float64(metrics['loss'])
    if k == 1:
      grads = jax.tree.map(lambda m: np.asarray(m, np.float64) / (1 - config.b1), nnx.to_pure_dict(adam(state.opt_state).mu))
  out['steps'] = np.int64(state.step)

  trees = {'net': (nnx.to_pure_dict(state.params), nnx.to_pure_dict(state.batch_stats)),
           'net_ema': (nnx.to_pure_dict(state.ema_params), nnx.to_pure_dict(state.ema_batch_stats))}
  mu, nu = (nnx.to_pure_dict(m) for m in (adam(state.opt_state).mu, adam(state.opt_state).nu))

  def at(tree, path):
    for p in path:
      tree = tree[p]
    return np.asarray(tree, np.float64)

  for path, key, kind in entries:
    is_stat = path[-1] in ('mean', 'var')
    for name, (p_tree, s_tree) in trees.items():
      out[f'step3/{name}/{key}'] = _to_official(at(s_tree if is_stat else p_tree, path), kind)
    if not is_stat:
      out[f'step1/grad/{key}'] = _to_official(at(grads, path), kind)
      out[f'step3/adam_mu/{key}'] = _to_official(at(mu, path), kind)
      out[f'step3/adam_nu/{key}'] = _to_official(at(nu, path), kind)
  return out


def compare(golden: dict, ours: dict) -> dict[str, list[tuple[float, str]]]:
  """Per group, (relative difference, tensor) for every tensor we have, largest first.

  Groups: 'losses/steps12', 'losses/step3' (each of the 12 terms and the total, relative to itself),
  'grad1', 'net', 'net_stats', 'ema', 'ema_stats', 'adam_mu', 'adam_nu'. Tensors whose step-1
  gradient is rounding noise (`null_gradient_keys`) go to 'net/null' and 'ema/null' (compared the
  same way), and to 'grad1/null', 'adam_mu/null', 'adam_nu/null' as max |ours| / the largest
  |official| value of the group's other tensors (a bound, not a comparison).
  """
  null = null_gradient_keys(golden)
  groups: dict[str, list] = {}

  def add(group, err, name):
    groups.setdefault(group, []).append((float(err), name))

  for k in STEPS:
    group = 'losses/step3' if k == 3 else 'losses/steps12'
    for i, (a, b) in enumerate(zip(ours[f'step{k}/losses'], golden[f'step{k}/losses'])):
      add(group, abs(a - b) / abs(b), f'step{k}/losses[{i}]')
    add(group, _rel(ours[f'step{k}/total_loss'], golden[f'step{k}/total_loss']), f'step{k}/total_loss')
  largest = {p: max(float(np.abs(golden[p + k]).max()) for k in _tensor_keys(ours, p) if k not in null)
             for p in ('step1/grad/', 'step3/adam_mu/', 'step3/adam_nu/')}
  for prefix, group in (('step1/grad/', 'grad1'), ('step3/adam_mu/', 'adam_mu'), ('step3/adam_nu/', 'adam_nu')):
    for key in _tensor_keys(ours, prefix):
      if key in null:
        add(group + '/null', np.abs(ours[prefix + key]).max() / largest[prefix], key)
      else:
        add(group, _rel(ours[prefix + key], golden[prefix + key]), key)
  for prefix, group in (('step3/net/', 'net'), ('step3/net_ema/', 'ema')):
    for key in _tensor_keys(ours, prefix):
      kind = '_stats' if 'running_' in key else '/null' if key in null else ''
      add(group + kind, _rel(ours[prefix + key], golden[prefix + key]), key)
  return {g: sorted(v, reverse=True) for g, v in groups.items()}


def cosine(golden: dict, ours: dict, prefix: str) -> float:
  """Cosine similarity of ours and the official values of all weights under `prefix` (no BatchNorm
  statistics, no zero-gradient tensors) taken together; step-3 states as updates, value - init."""
  null = null_gradient_keys(golden)
  keys = [k for k in _tensor_keys(ours, prefix) if k not in null and 'running_' not in k
          and 'num_batches' not in k]
  base = (lambda k: golden['init/' + k]) if prefix.startswith('step3/net') else (lambda k: 0.0)
  a = np.concatenate([(ours[prefix + k] - base(k)).ravel() for k in keys])
  b = np.concatenate([(golden[prefix + k] - base(k)).ravel() for k in keys])
  return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def report(errors: dict) -> str:
  lines = []
  for group, values in sorted(errors.items()):
    worst = ', '.join(f'{name} {err:.1e}' for err, name in values[:3])
    lines.append(f'{group:16s} max {values[0][0]:.1e}  median {values[len(values) // 2][0]:.1e}  '
                 f'n={len(values):4d}  worst: {worst}')
  return '\n'.join(lines)


def _failures(errors: dict, tolerances: dict) -> list[str]:
  out = []
  for group, tol in tolerances.items():
    bad = [(e, n) for e, n in errors[group] if not e <= tol]
    if bad:
      out.append(f'{group}: {len(bad)} above {tol:g}: ' + ', '.join(f'{n} {e:.2e}' for e, n in bad[:5]))
  return out


# ---- The tests --------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def golden():
  return load_golden(golden_path())


def _selected_dtypes(request) -> list[str]:
  names = [item.name for item in request.session.items if item.module is request.module]
  return [d for d in ('float64', 'float32') if any(d in n for n in names)]


@pytest.fixture(scope='module')
def our_runs(request, tmp_path_factory):
  """{dtype: our three steps}, for the dtypes whose tests are selected, run side by side."""
  out_dir = tmp_path_factory.mktemp('train_step_parity')
  procs = {}
  for dtype in _selected_dtypes(request):
    env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_ENABLE_X64='1' if dtype == 'float64' else '0',
               **COMPILE_CACHE_ENV)
    cmd = [sys.executable, __file__, '--golden', str(golden_path()), '--dtype', dtype,
           '--out', str(out_dir / f'{dtype}.npz')]
    procs[dtype] = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
  runs = {}
  for dtype, proc in procs.items():
    output, _ = proc.communicate(timeout=1800)
    assert proc.returncode == 0, f'{dtype} run failed:\n{output[-6000:]}'
    with np.load(out_dir / f'{dtype}.npz') as f:
      runs[dtype] = {k: f[k] for k in f.files}
  return runs


def test_golden_file_is_complete_and_consistent(golden):
  # tests/data's file must carry its digest; a reference-format file has none.
  assert check_digest(golden_path()) or golden_path() != DEFAULT_GOLDEN
  check_golden(golden)
  # The compact file's storage error leaves the float64 tolerances nine tenths of their budget.
  if 'storage_relerr/step1/grad' in golden:
    for group, storage_group in STORAGE_GROUP.items():
      assert float(golden[f'storage_relerr/{storage_group}']) <= FLOAT64_TOL[group] / 10, group
  # The reference run's radius channels are our float32 ones to within 2 ulps (its sqrt is 1 ulp off
  # at some pixels, the division by the maximum rounds once more), and differ from them (else the
  # note in the module docstring would be stale and the substitution pointless).
  from star_jax.models.layers import coord_channels  # pylint: disable=import-outside-toplevel
  for n, radius in official_radius(golden).items():
    ours = coord_channels(n, n)[..., 2]
    assert radius.shape == (n, n) and radius.dtype == np.float32
    ulps = radius.view(np.int32).astype(np.int64) - ours.view(np.int32)   # positive floats: ordered
    assert np.abs(ulps).max() <= 2, n
    assert np.any(ulps != 0), n


@pytest.mark.parametrize('corrupt', ['total', 'loss_weights', 'nu', 'shape', 'missing'])
def test_golden_check_rejects_a_corrupted_file(golden, corrupt):
  bad = dict(golden)
  if corrupt == 'total':
    bad['step2/total_loss'] = golden['step2/total_loss'] * (1 + 1e-9)
  elif corrupt == 'loss_weights':
    bad['config/loss_weights'] = golden['config/loss_weights'][::-1].copy()
  elif corrupt == 'nu':
    bad['step3/adam_nu/pre.0.conv.weight'] = golden['step3/adam_nu/pre.0.conv.weight'] * 1e-3
  elif corrupt == 'shape':
    bad['step1/grad/pre.0.conv.weight'] = golden['step1/grad/pre.0.conv.weight'][:, :3]
  elif corrupt == 'missing':
    del bad['step3/net_ema/hgs.3.low3.bn3.running_var']
  with pytest.raises(AssertionError):
    check_golden(bad)


def test_digest_rejects_an_edited_file(tmp_path):
  with np.load(DEFAULT_GOLDEN) as f:
    stored = {k: f[k] for k in f.files}
  assert check_digest(DEFAULT_GOLDEN)
  stored['step1/losses'] = stored['step1/losses'] + 1e-12
  np.savez(tmp_path / 'edited.npz', **stored)
  with pytest.raises(AssertionError, match='sha256'):
    check_digest(tmp_path / 'edited.npz')


def test_train_step_matches_official_float64(golden, our_runs):
  ours = our_runs['float64']
  assert int(ours['steps']) == 3   # the official BatchNorms' num_batches_tracked (checked above)
  errors = compare(golden, ours)
  failures = _failures(errors, FLOAT64_TOL)
  # Zero-gradient tensors: ours vanish too; their Adam moments stay at the noise level.
  for group, bound in (('grad1/null', NULL_GRADIENT), ('adam_mu/null', 1e-12), ('adam_nu/null', 1e-24)):
    failures += _failures({group: errors[group]}, {group: bound})
  assert not failures, '\n'.join(failures) + '\n\n' + report(errors)


def test_train_step_matches_official_float32(golden, our_runs):
  ours = our_runs['float32']
  assert int(ours['steps']) == 3
  errors = compare(golden, ours)
  failures = _failures(errors, FLOAT32_TOL)
  failures += _failures({'step1': [e for e in errors['losses/steps12'] if e[1].startswith('step1/')]},
                        {'step1': FLOAT32_STEP1_LOSS_TOL})
  for group, bound in (('grad1/null', 1e-5), ('adam_mu/null', 1e-5), ('adam_nu/null', 1e-10)):
    failures += _failures({group: errors[group]}, {group: bound})
  for prefix, least in FLOAT32_MIN_COSINE.items():
    if not cosine(golden, ours, prefix) >= least:
      failures.append(f'{prefix}: cosine with the official values {cosine(golden, ours, prefix):.3f} < {least}')
  assert not failures, '\n'.join(failures) + '\n\n' + report(errors)


# ---- Command line: one run, written out and / or compared ----------------------------------------

def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description='Our three training steps on the golden batches.')
  parser.add_argument('--golden', default=str(golden_path()))
  parser.add_argument('--dtype', choices=('float64', 'float32'), default='float64')
  parser.add_argument('--out', default='', help='write our results here (.npz)')
  parser.add_argument('--report', action='store_true', help='print the differences per group')
  parser.add_argument('--our-radius', action='store_true',
                      help='float64 with our CoordConv radius instead of the reference run\'s')
  args = parser.parse_args(argv)
  # XLA:CPU as the train command sets it up (star_jax.cli.run -> cpu_tuning.setup_process): its
  # convolutions round differently from XLA's defaults, and float32 runs of this ill-conditioned net
  # follow the rounding.
  from star_jax import cpu_tuning  # pylint: disable=import-outside-toplevel
  cpu_tuning.apply_xla_flags()
  if args.dtype == 'float64':
    import jax  # pylint: disable=import-outside-toplevel
    jax.config.update('jax_enable_x64', True)
  ours = run_steps(args.golden, args.dtype, official_coord_radius=args.dtype == 'float64' and not args.our_radius)
  if args.out:
    np.savez(args.out, **ours)
  if args.report:
    golden = load_golden(args.golden)
    print(report(compare(golden, ours)))
    print('cosine with the official values:',
          {p: round(cosine(golden, ours, p), 4) for p in ('step1/grad/', 'step3/net/', 'step3/net_ema/')})
    print(json.dumps({'golden': args.golden, 'dtype': args.dtype, 'our_radius': args.our_radius}))
  return 0


if __name__ == '__main__':
  sys.exit(main())
