"""star_jax.export: the ONNX and StableHLO exports, their contract, and parity with our JAX network.

"Ours" is the project's own inference path (`models.network_fn`, the jit-compiled network on
uint8 crops) mapped to crop pixels with the pipeline's own functions (`transforms.denormalize`,
`predictor.covariances_to_image`); the exports must agree with it on the same face crops, made as the
pipeline makes them (`crop.box_rule` + `transforms.warp`) from synthetic faces.

Two models: a tiny one trained for a few steps by the real train command (configs/synthetic.py:tiny,
so its BatchNorm statistics and EMA differ from the initial ones), and a full-size WFLW model (256x256
input, 4 stacks, 256 channels) converted from random weights in the official state-dict layout, as
the released checkpoints are. The full-size tests take about three minutes on two CPU cores.
"""

import gzip
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import DATA, REPO, checkpoint_steps, load_config
from star_jax import convert_pytorch, export, layouts
from star_jax.data import crop as crop_lib
from star_jax.data import synthetic, transforms
from star_jax.inference import predictor
from star_jax import models
from star_jax.models import create_model
from star_jax import checkpoints

LANDMARK_TOLERANCE_PX = 1e-3  # the parity required of the exports' landmarks, in crop pixels
COV_RTOL = 1e-4              # per point: |cov_export - cov_ours|_F / |cov_ours|_F


def _needs(*modules):
  missing = [m for m in modules if importlib.util.find_spec(m) is None]
  return pytest.mark.skipif(bool(missing), reason=f'{", ".join(missing)} not installed: the ONNX export '
                                                  "tests need the 'export' extra (pip install -e '.[export]')")


needs_onnx = _needs('jax2onnx', 'onnx', 'onnxruntime')


def _config(name, arg=None):
  return load_config(name, arg or '')


def face_crops(count: int, size: int) -> np.ndarray:
  """(count, size, size, 3) uint8 RGB crops of synthetic test faces, cropped as predict does."""
  crops = []
  for i in range(count):
    face = synthetic.generate(0, 'test', i)
    scale, center = crop_lib.box_rule(face.box)
    crops.append(transforms.warp(face.image, transforms.crop_matrix(scale, center, size), size))
  return np.stack(crops)


def ours(model, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Our network's (landmarks px (B, P, 2), covariances px^2 (B, P, 2, 2)) for uint8 crops."""
  size = model.image_size
  out = models.network_fn(model, with_covariance=True)(crops)
  identity = np.broadcast_to(np.eye(3, dtype=np.float32), (len(crops), 3, 3))
  return (transforms.denormalize(out['landmarks'], size),
          predictor.covariances_to_image(out['covariances'], identity, size))


def compare(got, want):
  """(max |landmark difference| px, max per-point relative covariance difference)."""
  (lm, cov), (want_lm, want_cov) = got, want
  lm_diff = float(np.abs(np.asarray(lm) - want_lm).max())
  cov_diff = np.linalg.norm(np.asarray(cov) - want_cov, axis=(-2, -1)) / np.linalg.norm(want_cov, axis=(-2, -1))
  return lm_diff, float(cov_diff.max())


def check_parity(got, want, what):
  lm_diff, cov_diff = compare(got, want)
  print(f'{what}: max landmark difference {lm_diff:.2e} px, max covariance relative difference {cov_diff:.2e}')
  assert lm_diff < LANDMARK_TOLERANCE_PX, what
  assert cov_diff < COV_RTOL, what


def run_onnx(path, images):
  import onnxruntime  # pylint: disable=import-outside-toplevel
  session = onnxruntime.InferenceSession(str(path), providers=['CPUExecutionProvider'])
  return session.run(None, {'image': np.asarray(images, np.float32)})


def check_onnx_contract(path, size, points):
  import onnx  # pylint: disable=import-outside-toplevel
  model = onnx.load(str(path))
  onnx.checker.check_model(model, full_check=True)
  # Opset 17 at its own IR version: loads in onnxruntime >= 1.15, not only in the newest.
  assert [(o.domain, o.version) for o in model.opset_import] == [('', 17)] and model.ir_version == 8

  def signature(values):
    return [(v.name, v.type.tensor_type.elem_type,
             [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]

  f32 = onnx.TensorProto.FLOAT
  assert signature(model.graph.input) == [('image', f32, ['N', size, size, 3])]
  assert signature(model.graph.output) == [('landmarks', f32, ['N', points, 2]),
                                           ('covariances', f32, ['N', points, 2, 2])]
  return {p.key: p.value for p in model.metadata_props}


# ---- The contract's coordinate mapping (no network) ---------------------------------------------


def test_crop_pixels_are_the_pipelines():
  size = 256
  l = np.array([[[-1.0, 1.0], [0.0, 0.5]]])
  cov = np.array([[[[1e-3, 2e-4], [2e-4, 5e-4]]] * 2])
  px, cov_px = export.to_crop_pixels(l, cov, size)
  np.testing.assert_allclose(px, [[[-0.5, 255.5], [127.5, 191.5]]])
  np.testing.assert_allclose(px, transforms.denormalize(l, size))
  np.testing.assert_allclose(cov_px, cov * 128.0 ** 2)
  np.testing.assert_allclose(cov_px, predictor.covariances_to_image(cov, np.eye(3)[None], size), rtol=1e-6)
  # The inverse of the training targets' normalisation (up to its clip), so a landmark trained at
  # crop pixel p comes out at p.
  from star_jax.data import targets  # pylint: disable=import-outside-toplevel
  p = np.array([[3.25, 200.0], [128.0, 0.0]], np.float32)
  np.testing.assert_allclose(export.to_crop_pixels(targets.normalize_landmarks(p, size), 0.0, size)[0], p,
                             atol=1e-4)


# ---- A tiny model trained by the real train command ---------------------------------------------


@pytest.fixture(scope='module')
def trained(trained_tiny):
  """A training workdir of configs/synthetic.py:tiny after 32 steps (conftest.trained_tiny: checkpoints
  with 'model' and 'ema')."""
  return trained_tiny[0]


@pytest.fixture(scope='module')
def tiny_reference(trained):
  """Crops (3, 64, 64, 3) and our outputs on them with the EMA and with the model weights."""
  crops = face_crops(3, 64)
  loaded = checkpoints.load_model(trained / 'checkpoints')
  ema, config = loaded.model, loaded.config
  assert config.data.image_size == 64 and ema.num_points == 98
  plain = checkpoints.load_model(trained / 'checkpoints', weights='model').model
  refs = {'ema': ours(ema, crops), 'model': ours(plain, crops)}
  # The two weight sets must give visibly different outputs, or the --weights tests would prove nothing.
  assert np.abs(refs['ema'][0] - refs['model'][0]).max() > 0.01
  return crops, refs


@needs_onnx
def test_onnx_tiny_trained_contract_dynamic_batch_and_parity(trained, trained_tiny_onnx, tiny_reference):
  crops, refs = tiny_reference
  out, proc = trained_tiny_onnx       # the export command's default output of `trained`
  # By default the official protocol's choice, as every reader makes it: the best step, with the
  # weights that won its evaluation; printed and recorded with the reason.
  chosen = checkpoints.load_model(trained, step='best')
  assert chosen.best is not None and (chosen.step, chosen.weights) == (chosen.best.step, chosen.best.weights)
  assert f'wrote {out} (onnx' in proc.stdout and f'step {chosen.step}, {chosen.weights} weights ({chosen.chosen_by})' \
      in proc.stdout
  props = check_onnx_contract(out, 64, 98)
  assert props['layout'] == 'WFLW' and props['weights'] == chosen.weights and props['image_size'] == '64'
  assert (props['step'], props['chosen_by'], props['best_by_protocol']) == (str(chosen.step), chosen.chosen_by, 'true')
  assert props['num_points'] == '98' and 'crop pixels' in props['contract']
  # Two batch sizes through the one graph (the batch dimension is dynamic).
  for batch in (1, 3):
    got = run_onnx(out, crops[:batch])
    assert [a.dtype for a in got] == [np.float32, np.float32]
    assert got[0].shape == (batch, 98, 2) and got[1].shape == (batch, 98, 2, 2)
    check_parity(got, [r[:batch] for r in refs[chosen.weights]], f'ONNX tiny trained, batch {batch}')


@needs_onnx
def test_the_converter_speedup_writes_the_same_bytes_and_skips_most_scans(monkeypatch):
  # export_onnx answers jax2onnx's "is this output in the graph?" from the value's producer instead of
  # a scan of every node (export._linear_output_binding). The file must be byte for byte the one the
  # converter writes as it ships, and the scan must run for few outputs (else the speedup is gone).
  from jax2onnx.converter import output_binding  # pylint: disable=import-outside-toplevel
  original = output_binding._value_is_graph_connected  # pylint: disable=protected-access
  scans = []

  def counted(ctx, value):
    scans.append(1)
    return original(ctx, value)

  monkeypatch.setattr(output_binding, '_value_is_graph_connected', counted)
  # A small network of every part (two stacks, for the merges), so that the two conversions are quick.
  model = models.StackedHGNet(layouts.WFLW.num_points, layouts.WFLW.edge_membership(), image_size=32, nstack=2,
                              nlevels=1, channels=8, rngs=nnx.Rngs(3))
  model.eval()
  fast = export.export_onnx(model).SerializeToString()
  fast_scans = len(scans)
  assert output_binding._value_is_graph_connected is counted   # pylint: disable=protected-access  (restored)
  monkeypatch.setattr(export, '_FAST_BINDING_VERSIONS', ())
  scans.clear()
  shipped = export.export_onnx(model).SerializeToString()
  assert fast == shipped
  assert len(scans) > 200 and fast_scans < len(scans) / 10, (fast_scans, len(scans))


@needs_onnx
def test_the_default_export_and_the_default_predict_agree_on_a_real_photo(trained, tmp_path):
  # The same weights by default (the official protocol's choice) and the same pipeline: on a real
  # photo, predict --model <the default export> gives predict --checkpoint's landmarks within 1e-2 px.
  from star_jax import predict  # pylint: disable=import-outside-toplevel
  photo = REPO.parent / 'shared' / 'data' / 'real_faces' / 'breakingbad.jpg'
  if not photo.is_file():
    photo = DATA / 'real_faces_full' / 'breakingbad.jpg'
  # The run's evaluation says the network won (not its EMA, which an export wrote whatever won before).
  trained = shutil.copytree(trained, tmp_path / 'run')
  (metrics_file,) = (trained / 'checkpoints').glob('*/metrics/metrics')
  metrics = json.loads(metrics_file.read_text())
  metrics_file.write_text(json.dumps(dict(metrics, best_weights='model')))
  assert checkpoints.load_model(trained, step='best').weights == 'model'
  onnx_file = tmp_path / 'default.onnx'
  assert export.main(['export', '--checkpoint', str(trained), '--output', str(onnx_file)]) == 0
  records = {}
  for name, source in (('checkpoint', ['--checkpoint', str(trained)]), ('onnx', ['--model', str(onnx_file)])):
    assert predict.main(['predict', *source, str(photo), '--output', str(tmp_path / name)]) == 0
    records[name] = json.loads((tmp_path / name / 'breakingbad.json').read_text())
  jax_record, onnx_record = records['checkpoint'], records['onnx']
  assert (onnx_record['step'], onnx_record['weights'], onnx_record['chosen_by']) == (
      jax_record['step'], 'model', jax_record['chosen_by'])
  (jax_face,), (onnx_face,) = jax_record['faces'], onnx_record['faces']
  assert onnx_face['box'] == jax_face['box'] and onnx_face['crop']['refined'] == jax_face['crop']['refined']
  difference = np.abs(np.subtract(onnx_face['landmarks'], jax_face['landmarks'])).max()
  assert difference < 1e-2, difference
  # The other weights give other landmarks: the agreement is the defaults', not the model's indifference.
  other = 'ema'
  assert predict.main(['predict', '--checkpoint', str(trained), '--weights', other, str(photo), '--output',
                       str(tmp_path / 'other')]) == 0
  (other_face,) = json.loads((tmp_path / 'other' / 'breakingbad.json').read_text())['faces']
  assert np.abs(np.subtract(other_face['landmarks'], jax_face['landmarks'])).max() > 10 * difference + 1e-2


def test_stablehlo_tiny_trained_round_trip_weights_and_calling_convention(trained, tiny_reference, tmp_path):
  crops, refs = tiny_reference
  for weights in ('ema', 'model'):
    out = tmp_path / f'{weights}.stablehlo'
    assert export.main(['export', '--checkpoint', str(trained), '--output', str(out), '--format', 'stablehlo',
                        '--weights', weights]) == 0
    fn = export.load_stablehlo(out)
    for batch in (1, 3):
      got = fn(crops[:batch].astype(np.float32))
      assert [a.dtype for a in got] == [np.float32, np.float32]
      assert got[0].shape == (batch, 98, 2) and got[1].shape == (batch, 98, 2, 2)
      check_parity(got, [r[:batch] for r in refs[weights]], f'StableHLO tiny trained {weights}, batch {batch}')
  # The calling convention the module docstring documents: by default lowered for cpu and cuda, so
  # `main` takes the platform index first; with one platform it takes the image alone.
  exported = jax.export.deserialize(bytearray((tmp_path / 'ema.stablehlo').read_bytes()))
  assert exported.platforms == ('cpu', 'cuda')
  assert [str(a) for a in exported.in_avals] == ['float32[N,64,64,3]']
  assert [str(a) for a in exported.out_avals] == ['float32[N,98,2]', 'float32[N,98,2,2]']
  main_line = next(line for line in exported.mlir_module().splitlines() if 'func.func public @main' in line)
  assert '%arg0: tensor<i32> {jax.global_constant = "_platform_index"}' in main_line
  assert '%arg1: tensor<?x64x64x3xf32>' in main_line
  assert '-> (tensor<?x98x2xf32>' in main_line and 'tensor<?x98x2x2xf32>' in main_line
  single = tmp_path / 'cpu.stablehlo'
  assert export.main(['export', '--checkpoint', str(trained), '--output', str(single), '--format', 'stablehlo',
                      '--platforms', 'cpu']) == 0
  exported = jax.export.deserialize(bytearray(single.read_bytes()))
  assert exported.platforms == ('cpu',)
  main_line = next(line for line in exported.mlir_module().splitlines() if 'func.func public @main' in line)
  assert 'public @main(%arg0: tensor<?x64x64x3xf32>' in main_line


def test_bfloat16_checkpoint_exports_in_float32(tmp_path):
  config = _config('synthetic', 'tiny')
  config.model.dtype = 'bfloat16'
  checkpoints.save_model_checkpoint(tmp_path / 'ckpt', model=create_model(config, nnx.Rngs(0)), config=config)
  out = tmp_path / 'bf16.stablehlo'
  assert export.main(['export', '--checkpoint', str(tmp_path / 'ckpt'), '--output', str(out), '--format', 'stablehlo',
                      '--platforms', 'cpu']) == 0
  exported = jax.export.deserialize(bytearray(out.read_bytes()))
  assert 'bf16' not in exported.mlir_module()
  # The same weights (the same seed) in a float32 model are the reference.
  config.model.dtype = 'float32'
  model = create_model(config, nnx.Rngs(0))
  model.eval()
  crops = face_crops(2, 64)
  check_parity(exported.call(crops.astype(np.float32)), ours(model, crops), 'StableHLO of a bfloat16 config')


# ---- Bad input ----------------------------------------------------------------------------------


def _run_command(*args):
  return subprocess.run([sys.executable, '-m', 'star_jax.export', *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS='cpu'))


def test_command_errors_are_one_line_without_traceback(tmp_path):
  missing = tmp_path / 'no_such_checkpoint'
  proc = _run_command('--checkpoint', str(missing), '--output', str(tmp_path / 'm.onnx'))
  assert proc.returncode == 1
  assert proc.stderr == f"error: checkpoint directory '{missing}' does not exist\n"
  proc = _run_command('--checkpoint', str(tmp_path), '--output', str(tmp_path / 'm.tflite'), '--format', 'tflite')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  line = proc.stderr.splitlines()[0]
  assert line.startswith('error: ') and 'tflite' in line and 'onnx' in line and 'stablehlo' in line
  assert sorted(os.listdir(tmp_path)) == []


def _error(argv) -> str:
  import io
  import contextlib
  err = io.StringIO()
  with contextlib.redirect_stderr(err):
    status = export.main(['export', *argv])
  assert status == 1, err.getvalue()   # a message: exit status 1
  return err.getvalue().strip()


def test_bad_checkpoints_and_outputs(trained, tmp_path):
  ckpt = str(trained)
  (tmp_path / 'empty').mkdir()
  assert _error(['--checkpoint', str(tmp_path / 'empty'), '--output', str(tmp_path / 'a.onnx')]) == (
      f"error: cannot load the checkpoint '{tmp_path / 'empty'}': no checkpoint in {tmp_path / 'empty'} "
      '(no step subdirectories)')
  message = _error(['--checkpoint', ckpt, '--output', str(tmp_path / 'a.onnx'), '--step', '99'])
  assert message.startswith(f"error: cannot load the checkpoint '{ckpt}': ")
  assert f'has no step 99; it has {checkpoint_steps(trained)}' in message
  # Unwritable outputs, named in the message.
  missing_dir = tmp_path / 'no' / 'such' / 'dir' / 'a.onnx'
  message = _error(['--checkpoint', ckpt, '--output', str(missing_dir)])
  assert message == f"error: cannot write the output '{missing_dir}': No such file or directory"
  assert _error(['--checkpoint', ckpt, '--output', str(tmp_path / 'empty')]) == (
      f"error: output '{tmp_path / 'empty'}' is a directory; give a file name")
  (tmp_path / 'file').write_text('')
  under_file = tmp_path / 'file' / 'a.onnx'
  assert _error(['--checkpoint', ckpt, '--output', str(under_file)]) == (
      f"error: cannot write the output '{under_file}': Not a directory")
  # Nothing was written, not even a temporary file.
  assert sorted(os.listdir(tmp_path)) == ['empty', 'file']


def test_unknown_platform_is_refused(tmp_path, capsys):
  assert export.main(['export', '--checkpoint', str(tmp_path), '--output', str(tmp_path / 'a'), '--format',
                      'stablehlo', '--platforms', 'cpu,gpu2']) == 2
  assert "--platforms: unknown platform(s) ['gpu2']; use cpu, cuda, rocm, tpu" in capsys.readouterr().err


def test_missing_onnx_packages_are_named(trained, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'jax2onnx', None)   # import jax2onnx raises ImportError
  message = _error(['--checkpoint', str(trained), '--output', str(tmp_path / 'a.onnx')])
  assert message.startswith("error: ONNX export needs the export extra and jax2onnx without its dependencies")
  assert "pip install 'star_jax[export]' && pip install --no-deps 'jax2onnx==0.17.1'" in message
  assert 'jax2onnx' in message
  assert os.listdir(tmp_path) == []


# ---- The full-size model, converted from the official layout ------------------------------------


def random_official_state_dict(layout_name: str, seed: int = 0) -> dict:
  """Random weights in the released checkpoints' state-dict layout (every key and shape).

  PyTorch's default initialisation scale for convolutions (U(+-1 / sqrt(fan_in))), BatchNorm scales
  and running variances in [0.5, 1.5], small biases and running means: maps like a real network's
  (each fusion heatmap has hundreds of non-zero pixels). Larger weights (Kaiming normal) made some
  heatmaps a few isolated pixels, whose soft-argmax moves by 1e-3 px between two XLA compilations
  of the same JAX function: no export could be held to 1e-3 px there.
  """
  with gzip.open(DATA / 'tiny_official_layouts.json.gz', 'rt') as f:
    entry = json.load(f)[layout_name]
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key, shape, dtype in entry['state_dict']:
    leaf = key.rsplit('.', 1)[-1]
    if dtype != 'float32':
      value = np.zeros(shape, dtype)                               # num_batches_tracked
    elif leaf == 'running_var' or ('.bn' in key and leaf == 'weight'):
      value = rng.uniform(0.5, 1.5, shape)
    elif leaf == 'running_mean' or ('.bn' in key and leaf == 'bias'):
      value = rng.normal(0.0, 0.1, shape)
    else:                                                          # convolution weights and biases
      fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
      value = rng.uniform(-1.0, 1.0, shape) / np.sqrt(fan_in)
    state_dict[key] = np.asarray(value, dtype)
  membership = layouts.get_layout(layout_name).edge_membership()   # the fixed edge-to-point transform
  state_dict['e2h_transform.weight'] = membership[:, :, None, None].astype(np.float32)
  state_dict['e2h_transform.bias'] = (membership.sum(1) == 0).astype(np.float32)
  return state_dict


@pytest.fixture(scope='module')
def full_size(tmp_path_factory):
  """(checkpoint dir, crops (2, 256, 256, 3), our outputs on them) of the converted full WFLW model."""
  config = _config('wflw')
  assert (config.data.image_size, config.model.nstack, config.model.channels) == (256, 4, 256)
  model = convert_pytorch.load_into_model(random_official_state_dict('WFLW'), create_model(config, nnx.Rngs(0)))
  directory = tmp_path_factory.mktemp('full') / 'ckpt'
  checkpoints.save_model_checkpoint(directory, model=model, config=config)
  model = checkpoints.load_model(directory).model
  crops = face_crops(2, 256)
  reference = ours(model, crops)
  jax.clear_caches()   # the full model's compiled programs (hundreds of MB) are not needed again
  return directory, crops, reference


@needs_onnx
def test_onnx_full_size_parity(full_size, tmp_path):
  directory, crops, reference = full_size
  out = tmp_path / 'full.onnx'
  assert export.main(['export', '--checkpoint', str(directory), '--output', str(out)]) == 0
  props = check_onnx_contract(out, 256, 98)
  assert props['weights'] == 'model' and props['image_size'] == '256'
  for batch in (1, 2):
    check_parity(run_onnx(out, crops[:batch]), [r[:batch] for r in reference], f'ONNX full size, batch {batch}')


def test_stablehlo_full_size_round_trip(full_size, tmp_path):
  directory, crops, reference = full_size
  out = tmp_path / 'full.stablehlo'
  assert export.main(['export', '--checkpoint', str(directory), '--output', str(out), '--format', 'stablehlo']) == 0
  check_parity(export.load_stablehlo(out)(crops.astype(np.float32)), reference, 'StableHLO full size, batch 2')
