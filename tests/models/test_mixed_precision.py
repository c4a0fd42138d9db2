"""Mixed precision (config.model.dtype = 'bfloat16'): bfloat16 compute, float32 everything else.

What the training step computes in which dtype, read off its traced program (no compilation, no run:
fast): the parameters, BatchNorm statistics, optimizer state, EMA, loss and metrics are float32; the
convolutions and matmuls of the network work on bfloat16 operands, apart from the small float32 heads;
BatchNorm statistics and other reductions are accumulated in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from star_jax.training import state as state_lib
from star_jax.training import step as step_lib


def _subjaxprs(params):
  for value in params.values():
    for item in value if isinstance(value, (list, tuple)) else [value]:
      inner = getattr(item, 'jaxpr', item)          # ClosedJaxpr -> Jaxpr
      if hasattr(inner, 'eqns'):
        yield inner


def _eqns(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in _subjaxprs(eqn.params):
      yield from _eqns(sub)


def _matmul_flops(eqn) -> float:
  """FLOPs of a convolution or dot_general equation (2 per multiply-add)."""
  out = eqn.outvars[0].aval.shape
  if eqn.primitive.name == 'conv_general_dilated':
    lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
    spec = eqn.params['dimension_numbers']
    kernel_spatial = np.prod([rhs[d] for d in spec.rhs_spec[2:]])
    cin = rhs[spec.rhs_spec[1]]
    return 2.0 * np.prod(out) * kernel_spatial * cin / eqn.params['feature_group_count']
  (contract, _), _ = eqn.params['dimension_numbers']
  lhs = eqn.invars[0].aval.shape
  return 2.0 * np.prod(out) * np.prod([lhs[d] for d in contract])


def _step_and_inputs(dtype):
  """The training step of a very small WFLW model (every kind of layer, few of each: quick to trace)."""
  config = load_config('synthetic', 'tiny')
  config.model.dtype = dtype
  config.model.nlevels, config.model.channels = 1, 16
  config.data.image_size, config.data.heatmap_size = 16, 4
  tx = state_lib.make_optimizer(config, 10)
  graphs, state = state_lib.create_train_state(config, tx, rng_seed=0)
  s, h, n = config.data.image_size, config.data.heatmap_size, 98
  batch = {'image': jnp.zeros((2, s, s, 3), jnp.uint8), 'landmarks': jnp.zeros((2, n, 2), jnp.float32),
           'pointmaps': jnp.zeros((2, h, h, n), jnp.float32), 'edgemaps': jnp.zeros((2, h, h, 9), jnp.float32)}
  return step_lib.make_train_step(graphs, tx, config), state, batch


@pytest.fixture(scope='module')
def traced():
  """{dtype: (closed jaxpr of the train step, its output shapes)}."""
  out = {}
  for dtype in ('float32', 'bfloat16'):
    step, state, batch = _step_and_inputs(dtype)
    out[dtype] = jax.make_jaxpr(step, return_shape=True)(state, batch)
  return out


def test_state_loss_and_metrics_stay_float32(traced):
  for dtype, (_, (new_state, metrics)) in traced.items():
    for name in ('params', 'batch_stats', 'opt_state', 'ema_params', 'ema_batch_stats'):
      dtypes = {str(x.dtype) for x in jax.tree.leaves(getattr(new_state, name)) if jnp.issubdtype(x.dtype, jnp.floating)}
      assert dtypes == {'float32'}, (dtype, name, dtypes)
    assert {str(v.dtype) for v in metrics.values()} == {'float32'}, (dtype, metrics)


def test_bfloat16_compute_covers_the_network(traced):
  """Share of the step's convolution and matmul FLOPs (forward and backward) with bfloat16 operands:
  nearly all of it in bfloat16 mode (the rest: the float32 heads' small matmuls), none in float32 mode."""
  share = {}
  for dtype, (jaxpr, _) in traced.items():
    flops = {}
    for eqn in _eqns(jaxpr.jaxpr):
      if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
        operands = '+'.join(sorted({str(v.aval.dtype) for v in eqn.invars}))
        flops[operands] = flops.get(operands, 0.0) + _matmul_flops(eqn)
    share[dtype] = flops.get('bfloat16', 0.0) / sum(flops.values())
  assert share['float32'] == 0.0
  assert share['bfloat16'] > 0.95, share


def test_reductions_accumulate_in_float32(traced):
  """No sum of more than a few bfloat16 values anywhere in the bfloat16 step: BatchNorm statistics,
  instance norm, losses, and the gradients of the convolution biases (layers.add_bias) and BatchNorm
  parameters are taken in float32. (The nearest-neighbour upsampling's gradient adds 2 x 2 values in
  bfloat16: one rounding, as one bfloat16 add.)"""
  jaxpr, _ = traced['bfloat16']
  low = []
  for eqn in _eqns(jaxpr.jaxpr):
    if eqn.primitive.name in ('reduce_sum', 'cumsum') and eqn.invars[0].aval.dtype == jnp.bfloat16:
      shape = eqn.invars[0].aval.shape
      summed = np.prod([shape[a] for a in eqn.params.get('axes', (eqn.params.get('axis', 0),))])
      if summed > 4:
        low.append(f'{shape} -> {eqn.outvars[0].aval.shape}')
  assert not low, low
