"""On a GPU: the model, the losses and training give the CPU's results, and the code that runs is GPU code.

Every test here is marked `gpu` and skips cleanly where JAX sees no GPU (CI, a laptop: conftest.py sets
JAX_PLATFORMS=cpu unless the caller set it). scripts/device_check.sh runs them on the GPU machine with
JAX_PLATFORMS=cuda,cpu, so that one process has both backends: each comparison runs the same jitted
function on `jax.devices('cpu')[0]` and on the GPU (jit follows the device its committed inputs are on).

Tolerances. XLA:GPU computes float32 convolutions and matmuls as TF32 under JAX's default precision
(10-bit mantissa), the CPU in full float32. So each comparison is made twice: at
`jax.default_matmul_precision('highest')` (full float32 on both: summation order alone, ~1e-6) with a
tight tolerance, and at the default precision, as training runs, with a loose one.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import COMPILE_CACHE_ENV, DATA, REPO


# DEVICE_CHECK_DRY_RUN=1 (scripts/device_check.sh on a machine without a GPU): a second CPU device
# (XLA_FLAGS=--xla_force_host_platform_device_count=2) stands in for the GPU, and the tests that check
# what is selected expect the CPU's choices, so that the device check's test stage runs every line here.
DRY_RUN = os.environ.get('DEVICE_CHECK_DRY_RUN', '') == '1'
BACKEND = 'cpu' if DRY_RUN else 'gpu'


def _gpus():
  if DRY_RUN:
    cpus = jax.devices('cpu')
    return cpus[1:] or cpus
  try:
    return jax.devices('gpu')
  except RuntimeError:   # no GPU backend in this process (JAX_PLATFORMS=cpu, no plugin, no device)
    return []


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpus(), reason='no GPU visible to JAX')]

# Tight: full float32 on both sides. Loose: TF32 on the GPU (default precision).
LANDMARK_ATOL = {'highest': 2e-5, 'default': 5e-3}      # normalised [-1, 1] coordinates
MAP_ATOL = {'highest': 1e-4, 'default': 2e-2}           # maps in [0, 1]
LOSS_RTOL = {'highest': 1e-5, 'default': 2e-3}
GRAD_RTOL = {'highest': 1e-4, 'default': 2e-2}          # relative to the gradient's largest entry


def _on(device, tree):
  return jax.device_put(tree, device)


_CPU_RESULTS = {}


def _both(key, fn, *args):
  """fn(*args) on the CPU and on the GPU, as numpy trees: (cpu, gpu). The CPU's result is computed once
  per `key` (XLA:CPU computes float32 in full whatever the matmul precision asks)."""
  jitted = jax.jit(fn)
  if key not in _CPU_RESULTS:
    with jax.default_matmul_precision('highest'):
      _CPU_RESULTS[key] = jax.device_get(jitted(*_on(jax.devices('cpu')[0], args)))
  gpu = jax.device_get(jitted(*_on(_gpus()[0], args)))
  return _CPU_RESULTS[key], gpu


def _precision(name):
  return jax.default_matmul_precision('highest') if name == 'highest' else jax.default_matmul_precision(None)


def test_backend_selection_is_gpu_code(tmp_path):
  """What the trainer's process selects on this machine: the GPU backend, none of the XLA:CPU tuning
  (no re-exec with huge-page malloc, no XLA:CPU flag) and no CPU-only convolution VJP. (Dry run: the
  CPU's choices, the tuning on.)"""
  code = (
      'import json, os\n'
      'from star_jax import cpu_tuning\n'
      'cpu_tuning.setup_process()\n'            # what cli.run does first; on a GPU machine: nothing
      'import jax\n'
      'from star_jax.models import layers\n'
      'print(json.dumps({"backend": jax.default_backend(), "accelerator_expected": cpu_tuning.accelerator_expected(),'
      ' "status": cpu_tuning.status(), "xla_flags": os.environ.get("XLA_FLAGS", ""),'
      ' "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),'
      ' "reexec_marker": os.environ.get(cpu_tuning.ORIGINAL_TUNABLES_ENV),'
      ' "matmul_weight_gradients": layers.matmul_weight_gradients((2, 64, 64, 128), 1)}))\n')
  env = {k: v for k, v in os.environ.items()
         if k not in ('JAX_PLATFORMS', 'GLIBC_TUNABLES', 'XLA_FLAGS', 'STAR_JAX_CPU_TUNING')}
  proc = subprocess.run([sys.executable, '-c', code], env=env, cwd=tmp_path, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  print('selected on this machine:', got)
  assert got['backend'] == BACKEND
  if DRY_RUN:   # the CPU: tuned (the flag only for the jaxlib versions it was measured on)
    assert got['accelerator_expected'] is False and got['status'] in ('on', 'partly on')
    assert got['matmul_weight_gradients'] is True
    return
  assert got['accelerator_expected'] is True and got['status'] == 'off'
  assert 'xla_cpu' not in got['xla_flags']
  assert 'hugetlb' not in got['glibc_tunables'] and got['reexec_marker'] is None
  assert got['matmul_weight_gradients'] is False


def test_conv_takes_xla_gradient_on_gpu():
  """The 3x3 convolutions of the hourglasses have no custom VJP on a GPU (cuDNN's own gradients); on a
  CPU (dry run) their weight gradient is the matmul scan of layers.conv_matmul_weight_grad."""
  from star_jax.models.layers import Conv2d
  conv = Conv2d(128, 128, 3, rngs=nnx.Rngs(0))
  x = jnp.ones((2, 64, 64, 128))
  graph, params = nnx.split(conv)
  loss = lambda p, x: nnx.merge(graph, p)(x).sum()
  assert jax.default_backend() == BACKEND
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(params, x))
  assert ('scan' in jaxpr) == DRY_RUN   # conv_matmul_weight_grad's loop over the kernel taps


# ---- The model: GPU against CPU, and against the official outputs -------------------------------------

@pytest.fixture(scope='module')
def tiny_wflw():
  """The official tiny WFLW model (tests/testdata), converted: (graph, state) in eval and train mode, the
  golden outputs and our RGB input."""
  from test_model import rgb_input, tiny_model  # pylint: disable=import-error
  from star_jax import convert_pytorch
  golden = dict(np.load(DATA / 'tiny_outputs.npz'))
  weights = convert_pytorch.read_torch_checkpoint(str(DATA / 'tiny_wflw_checkpoint.pkl'))['net']
  model = convert_pytorch.load_into_model(weights, tiny_model('WFLW'))
  return model, golden, np.asarray(rgb_input(golden))


def _forward(model, mode):
  if mode == 'eval':
    model.eval()
  else:
    model.train()
  graph, state = nnx.split(model)

  def fn(state, x):
    outputs = nnx.merge(graph, state)(x)
    return [{k: out[k] for k in ('landmarks', 'pointmaps', 'edgemaps', 'fusion_heatmaps')} for out in outputs]

  return fn, state


@pytest.mark.parametrize('precision', ['highest', 'default'])
@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_model_gpu_matches_cpu(tiny_wflw, mode, precision):
  model, _, x = tiny_wflw
  fn, state = _forward(model, mode)
  with _precision(precision):
    cpu, gpu = _both(('model', mode), fn, state, x)
  # Train mode of this random tiny net amplifies round-off from stack to stack (test_model.py): stack 0.
  stacks = range(4) if mode == 'eval' else [0]
  worst = {}
  for i in stacks:
    np.testing.assert_allclose(gpu[i]['landmarks'], cpu[i]['landmarks'], rtol=0, atol=LANDMARK_ATOL[precision],
                               err_msg=f'{mode} stack {i} landmarks ({precision})')
    worst[f'stack{i}/landmarks'] = float(np.abs(gpu[i]['landmarks'] - cpu[i]['landmarks']).max())
    for key in ('pointmaps', 'edgemaps', 'fusion_heatmaps'):
      np.testing.assert_allclose(gpu[i][key], cpu[i][key], rtol=0, atol=MAP_ATOL[precision],
                                 err_msg=f'{mode} stack {i} {key} ({precision})')
      worst[f'stack{i}/{key}'] = float(np.abs(gpu[i][key] - cpu[i][key]).max())
  print(f'GPU vs CPU, {mode}, precision {precision}: max |diff| {worst}')


def test_model_on_gpu_matches_official(tiny_wflw):
  """The GPU's eval-mode outputs against the official PyTorch outputs (test_model.py's tolerances for
  the CPU, at full float32 precision)."""
  from test_model import check  # pylint: disable=import-error
  model, golden, x = tiny_wflw
  fn, state = _forward(model, 'eval')
  with _precision('highest'):
    outputs = jax.device_get(jax.jit(fn)(*_on(_gpus()[0], (state, x))))
  check(outputs, golden, 'WFLW/f32/eval', 'WFLW', range(4), 1e-5, 1e-4)


# ---- Losses -------------------------------------------------------------------------------------------

def _loss_inputs(seed=0, batch=4, points=98, size=64, edges=9):
  from benchmarks import loss as loss_bench
  rng = np.random.default_rng(seed)
  maps, targets = loss_bench._inputs(seed)  # pylint: disable=protected-access
  maps, targets = maps[:batch], targets[:batch]
  pred_e = rng.random((batch, size, size, edges), np.float32)
  target_e = rng.random((batch, size, size, edges), np.float32) ** 4
  pred_p = rng.random((batch, size, size, points), np.float32)
  target_p = rng.random((batch, size, size, points), np.float32) ** 4
  return maps, targets, pred_p, target_p, pred_e, target_e


@pytest.mark.parametrize('precision', ['highest', 'default'])
def test_losses_gpu_match_cpu(precision):
  from star_jax import losses
  maps, targets, pred_p, target_p, pred_e, target_e = _loss_inputs()

  def all_losses(maps, pred_p, pred_e):
    return {'star': losses.star_loss(maps, targets), 'star_v1': losses.star_loss_v1(maps, targets),
            'awing_points': losses.awing_loss(pred_p, target_p), 'awing_edges': losses.awing_loss(pred_e, target_e)}

  def value_and_grads(maps, pred_p, pred_e):
    return {name: jax.value_and_grad(lambda *a, n=name: all_losses(*a)[n], argnums=(0, 1, 2))(maps, pred_p, pred_e)
            for name in ('star', 'star_v1', 'awing_points', 'awing_edges')}

  with _precision(precision):
    cpu, gpu = _both('losses', value_and_grads, maps, pred_p, pred_e)
  for name in cpu:
    (v_cpu, g_cpu), (v_gpu, g_gpu) = cpu[name], gpu[name]
    assert np.dtype(v_gpu.dtype) == np.float32
    np.testing.assert_allclose(v_gpu, v_cpu, rtol=LOSS_RTOL[precision], err_msg=f'{name} value ({precision})')
    for a, b in zip(g_gpu, g_cpu):
      scale = max(float(np.abs(b).max()), 1e-30)
      assert float(np.abs(a - b).max()) / scale <= GRAD_RTOL[precision], f'{name} gradient ({precision})'


# ---- Mixed precision on the GPU -------------------------------------------------------------------------

def test_bfloat16_train_step_dtypes_on_gpu():
  """A bfloat16 training step of the tiny config on the GPU: float32 parameters, BatchNorm statistics,
  optimizer state, loss and gradient norm, and a loss within bfloat16 noise of the float32 step's."""
  from benchmarks import train as train_bench
  from star_jax.training import state as state_lib
  from star_jax.training import step as step_lib
  batch = train_bench.synthetic_batch(4, shape=train_bench.SMALL)
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config = train_bench.wflw_config(dtype, train_bench.SMALL)
    tx = state_lib.make_optimizer(config, 100)
    graphs, state = state_lib.create_train_state(config, tx, rng_seed=0)
    step = jax.jit(step_lib.make_train_step(graphs, tx, config))
    new, metrics = step(_on(_gpus()[0], state), _on(_gpus()[0], batch))
    for name, tree in (('params', new.params), ('batch_stats', new.batch_stats), ('opt_state', new.opt_state),
                       ('ema_params', new.ema_params)):
      bad = {str(leaf.dtype) for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.floating)
             and leaf.dtype != jnp.float32}
      assert not bad, f'{dtype} step: {name} has {bad}'
    assert metrics['loss'].dtype == jnp.float32 and metrics['grad_norm'].dtype == jnp.float32
    assert {d.platform for d in metrics['loss'].devices()} == {BACKEND}
    results[dtype] = float(metrics['loss'])
  assert np.isfinite(results['bfloat16'])
  assert abs(results['bfloat16'] - results['float32']) <= 0.05 * abs(results['float32']), results


# ---- Training on the GPU: a few steps of the tiny config, checkpoint, resume ----------------------------

def _train(workdir, tfds_dir, *extra):
  env = dict(os.environ, PYTHONUNBUFFERED='1', **COMPILE_CACHE_ENV)
  env.pop('JAX_PLATFORMS', None)        # as a user runs it: JAX picks the GPU
  cmd = [sys.executable, '-m', 'star_jax.train', f'--config={REPO / "configs" / "synthetic.py"}:tiny',
         f'--workdir={workdir}', f'--config.data.data_dir={tfds_dir}', '--config.progress=False', *extra]
  proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc


def _losses(workdir):
  out = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    if 'train/loss' in record:
      out[record['step']] = record['train/loss']
  return out


def test_training_steps_checkpoint_and_resume_on_gpu(tiny_tfds_dir, tmp_path):
  """8 steps of the tiny config on the GPU, and 5 steps + a resume from the step-5 checkpoint to 8: the
  same losses (to GPU reduction-order noise: XLA:GPU's reductions and atomics need not be bitwise
  reproducible between processes), a finite evaluation, the checkpoint restored onto the GPU."""
  full, part = tmp_path / 'full', tmp_path / 'part'
  proc = _train(full, tiny_tfds_dir, '--config.total_steps=8')
  assert f'({jax.devices()[0].device_kind}) in 1 processes' in proc.stderr, proc.stderr[-2000:]
  _train(part, tiny_tfds_dir, '--config.total_steps=5')
  resumed = _train(part, tiny_tfds_dir, '--config.total_steps=8')
  assert 'resumed from step 5' in resumed.stderr
  a, b = _losses(full), _losses(part)
  assert sorted(a) == list(range(1, 9))
  np.testing.assert_allclose([b[s] for s in range(1, 9)], [a[s] for s in range(1, 9)], rtol=2e-3)
  metrics = json.loads((full / 'final_metrics.json').read_text())
  assert 0 < metrics['nme'] < 2, metrics
