"""Export a checkpoint for deployment: an ONNX model, or serialized StableHLO (jax.export).

  python -m star_jax.export --checkpoint DIR --output FILE [--format onnx|stablehlo]
      [--step best|latest|N] [--weights ema|model] [--opset 17] [--platforms cpu,cuda]
  python -m star_jax.export --pretrained wflw|300w|cofw --output FILE ...

DIR is a star_jax checkpoint directory (trained here, or converted from the official PyTorch release
with `python -m star_jax.convert_pytorch`), or a training workdir holding checkpoints/. --pretrained
exports a released official model (its net), fetched into the cache on first use (star_jax/pretrained.py).

Which weights: the same as predict, evaluate, the demo and the Python API (the official protocol):
a workdir's best checkpoint with the weights that won there (the lower NME of the network and its EMA
at each evaluation); a converted checkpoint's only step and weights (an official .pkl's net). --step
and --weights choose others. The command prints the step and weights it exported and why, and the
ONNX file's metadata records them ('step', 'weights', 'chosen_by', 'best_by_protocol'), so
`predict --model FILE` gives the landmarks of `predict --checkpoint DIR` (within 1e-2 px on a photo,
tests/test_export.py).

The exported model (the same contract in both formats):
  input   image        float32 (N, S, S, 3): RGB pixel values 0-255 of N face crops as star_jax's
                       pipeline makes them (the official crop, see star_jax.data.transforms), S the
                       config's data.image_size (256 for the released models). N is dynamic.
  outputs landmarks    float32 (N, P, 2): the last stack's landmarks as (x, y) in crop pixels, 0-based
                       (pixel i covers [i - 0.5, i + 0.5]): ((l + 1) * S - 1) / 2 for the network's
                       normalised output l in [-1, 1], which is `transforms.denormalize`, the mapping
                       the training targets were made with (`targets.normalize_landmarks`) and that
                       evaluation and `star_jax.predict` use.
          covariances  float32 (N, P, 2, 2): each point's covariance over (x, y) in crop pixels^2: the
                       covariance of the normalised fusion heatmap (`models.decoding.heatmap_moments`, the one
                       the STAR loss decomposes: its principal axes are the directions of the point's
                       semantic ambiguity) times (S / 2)^2, the square of the landmarks' scale.

ONNX (--format onnx, the default): converted with jax2onnx; input and outputs are named as above, the
batch dimension is the symbolic 'N', and the model's metadata_props record the contract, S
('image_size'), P ('num_points'), the layout ('layout', and 'layout_spec' for a layout file), the
weights and step used. Run it with onnxruntime (`pip install 'star_jax[onnx]'`):
  landmarks, covariances = onnxruntime.InferenceSession(FILE).run(None, {'image': crops})
or, with face detection and the mapping to image pixels, without JAX:
  star_jax.FaceLandmarker.from_onnx(FILE)   /   python -m star_jax.predict --model FILE ...

StableHLO (--format stablehlo): the bytes of `jax.export.Exported.serialize()`, weights embedded as
constants. Calling convention:
  * from JAX: `star_jax.export.load_stablehlo(FILE)(image)` (or `jax.export.deserialize(bytes).call`)
    returns the tuple (landmarks, covariances);
  * for other StableHLO runtimes the module's `main` is (serialization version
    `Exported.calling_convention_version`, 10 with jax 0.10)
      main([platform_index: tensor<i32>,] image: tensor<?xSxSx3xf32>)
        -> (landmarks: tensor<?xPx2xf32>, covariances: tensor<?xPx2x2xf32>)
    where the leading platform index argument (the position in --platforms: 0 = cpu, 1 = cuda by
    default) is present only when the export was lowered for more than one platform, and `?` is N.

Both compute in float32, whatever compute dtype the checkpoint's config trained with. Parity with
our JAX forward (tests/test_export.py; full WFLW model with random weights in the official layout,
synthetic face crops): onnxruntime within 2e-4 px, StableHLO within 2e-4 px; covariances within
1e-5 relative.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import logging
import os
import pathlib
import tempfile
import threading
from typing import Callable

from absl import flags
import jax
import jax.numpy as jnp

import star_jax
from star_jax import checkpoints
from star_jax import cli
from star_jax import layouts
from star_jax import models
from star_jax import pretrained

FORMATS = ('onnx', 'stablehlo')
WEIGHTS = ('ema', 'model')
INPUT_NAME = 'image'
OUTPUT_NAMES = ('landmarks', 'covariances')
# Opset 17: the network needs nothing newer, and an older opset runs on more of the deployed runtimes
# than jax2onnx's default (23); with the IR version lowered to the opset's own (see export_onnx) the
# file runs on onnxruntime 1.15 (tested 1.15.1, 1.17.3, 1.18.1, 1.32.0).
DEFAULT_OPSET = 17
DEFAULT_PLATFORMS = ('cpu', 'cuda')

CONTRACT = (
    f'input {INPUT_NAME}: float32 (N, S, S, 3) RGB pixels 0-255 of the face crop; '
    f'output landmarks: float32 (N, P, 2) (x, y) crop pixels of the last stack, ((l + 1) * S - 1) / 2; '
    f'output covariances: float32 (N, P, 2, 2) per-point covariance in crop pixels^2')


class ExportError(Exception):
  """A problem with the command's inputs (checkpoint, output path, missing package), worded for users."""


# ---- The exported function ----------------------------------------------------------------------

def to_crop_pixels(landmarks, covariances, image_size: int):
  """Normalised landmarks (..., 2) in [-1, 1] and covariances (..., 2, 2) -> crop pixels and pixels^2.

  The affine map p = ((l + 1) * S - 1) / 2 (slope S / 2), the inverse of the targets' normalisation
  (align_corners=False over the crop, as the official code); covariances scale by (S / 2)^2.
  Works on numpy and jax arrays.
  """
  half = image_size / 2.0
  return (landmarks + 1.0) * half - 0.5, covariances * (half * half)


def inference_fn(model, decode: str = 'landmarks') -> Callable:
  """The exported computation: `fn(image) -> (landmarks, covariances)`, see the module docstring.

  image float32 (N, S, S, 3) RGB 0-255; returns float32 (N, P, 2) and (N, P, 2, 2) in crop pixels.
  `model` (a StackedHGNet, in eval mode) is closed over: its weights become constants of the export.
  It is the prediction function of every other path (`star_jax.models.make_predict_fn`), mapped to
  crop pixels.
  """
  image_size = model.image_size
  graph, params, batch_stats = models.split(model)
  predict = models.make_predict_fn(graph, decode=decode, covariances=True)

  def fn(image):
    out = predict(params, batch_stats, image)
    landmarks, cov = to_crop_pixels(out['landmarks'], out['covariances'], image_size)
    return landmarks.astype(jnp.float32), cov.astype(jnp.float32)

  return fn


# ---- ONNX ---------------------------------------------------------------------------------------

def export_onnx(model, *, opset: int = DEFAULT_OPSET, metadata: dict | None = None, decode: str = 'landmarks'):
  """The model as an `onnx.ModelProto` with input 'image' (N, S, S, 3) and outputs 'landmarks',
  'covariances' (see the module docstring), N symbolic. `metadata` (str -> str) is added to the
  model's metadata_props, after the contract, 'image_size' and 'num_points'.

  Converted by jax2onnx from the jaxpr of `inference_fn(model)` as written: the network's custom-VJP
  layers (max-pool, the matmul-gradient convolution, the heatmap moments) trace to their plain
  forward ops, which jax2onnx converts; no separate inference path is needed.
  """
  try:
    import jax2onnx  # lazy: optional extra (the 'export' extra)
    import onnx  # lazy: optional extra (the 'export' extra)
  except ImportError as e:
    raise ExportError(f"ONNX export needs the export extra and jax2onnx without its dependencies (its metadata "
                      f"would downgrade orbax-checkpoint): pip install 'star_jax[export]' && pip install --no-deps "
                      f"'jax2onnx==0.17.1' ({e})") from None
  s = model.image_size
  # onnx_ir logs a warning for every shape constant it leaves untyped (hundreds for this network);
  # they are harmless (the graph passes onnx.checker and runs), so keep the command's output readable.
  with _quiet('onnx_ir', 'jax2onnx'), _linear_output_binding():
    proto = jax2onnx.to_onnx(inference_fn(model, decode), inputs=[('N', s, s, 3)], opset=opset,
                             model_name='star_landmarks', input_names=[INPUT_NAME],
                             output_names=list(OUTPUT_NAMES))
  # jax2onnx writes the newest IR version its onnx package knows (10), which onnxruntime < 1.18 refuses
  # to load; the graph uses nothing beyond the IR version of its opset (8 for opset 17).
  proto.ir_version = min(proto.ir_version, onnx.helper.find_min_ir_version_for(proto.opset_import, True))
  docs = {INPUT_NAME: f'float32 (N, {s}, {s}, 3) RGB pixel values 0-255 of the face crops',
          'landmarks': f'float32 (N, {model.num_points}, 2) (x, y) in crop pixels',
          'covariances': f'float32 (N, {model.num_points}, 2, 2) per-point covariance, crop pixels^2'}
  for value in list(proto.graph.input) + list(proto.graph.output):
    value.doc_string = docs.get(value.name, '')
  proto.doc_string = f'STAR facial landmarks (star_jax). {CONTRACT}'
  props = {'contract': CONTRACT, 'image_size': str(s), 'num_points': str(model.num_points),
           **(metadata or {})}
  onnx.helper.set_model_props(proto, {k: str(v) for k, v in props.items()})
  return proto


# jax2onnx versions whose output binding `_linear_output_binding` speeds up (checked byte for byte
# against the converter as it ships, tests/test_export.py); others run as they ship.
_FAST_BINDING_VERSIONS = ('0.17.',)
_binding_lock = threading.Lock()


@contextlib.contextmanager
def _linear_output_binding():
  """Makes jax2onnx's conversion of the network 2.5-4x faster (the full WFLW network: 20 s, not 79 s),
  with the same output bytes.

  After lowering each of the ~3,500 equations, jax2onnx checks that each output value is produced in
  the graph by scanning every node built so far (`output_binding._value_is_graph_connected`):
  quadratic in the graph's size, most of a full network's conversion time. A value whose producer
  node belongs to the graph being built passes that scan by definition; this answers those at
  once and leaves every other case to the original scan.
  """
  try:
    version = importlib.metadata.version('jax2onnx')
    from jax2onnx.converter import output_binding  # lazy: optional extra (the 'export' extra)
    original = output_binding._value_is_graph_connected  # pylint: disable=protected-access
  except (ImportError, AttributeError, importlib.metadata.PackageNotFoundError):
    version, original = '', None
  if original is None or not version.startswith(_FAST_BINDING_VERSIONS):
    yield
    return

  def connected(ctx, value):
    producer = value.producer() if hasattr(value, 'producer') else None
    if producer is not None and producer.graph is ctx.builder.nodes:
      return True
    return original(ctx, value)

  with _binding_lock:
    output_binding._value_is_graph_connected = connected  # pylint: disable=protected-access
    try:
      yield
    finally:
      output_binding._value_is_graph_connected = original  # pylint: disable=protected-access


@contextlib.contextmanager
def _quiet(*names):
  loggers = [logging.getLogger(n) for n in names]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


# ---- StableHLO ----------------------------------------------------------------------------------

def export_stablehlo(model, *, platforms=DEFAULT_PLATFORMS, decode: str = 'landmarks'):
  """`jax.export.Exported` of `inference_fn(model)` for image (N, S, S, 3) with N symbolic, lowered
  for `platforms` (a JAX platform name or several; lowering needs no such device present)."""
  s = model.image_size
  n, = jax.export.symbolic_shape('N')
  spec = jax.ShapeDtypeStruct((n, s, s, 3), jnp.float32)
  return jax.export.export(jax.jit(inference_fn(model, decode)), platforms=tuple(platforms))(spec)


def load_stablehlo(path) -> Callable:
  """Reads a --format stablehlo file; returns `fn(image) -> (landmarks, covariances)` (JAX arrays)."""
  exported = jax.export.deserialize(bytearray(pathlib.Path(path).read_bytes()))
  return exported.call


# ---- Files --------------------------------------------------------------------------------------

@contextlib.contextmanager
def _atomic_output(output: pathlib.Path):
  """Yields a temporary file (binary, open) beside `output` that replaces it when the block succeeds.

  The temporary file is created on entry, so an unwritable destination fails before the export's
  minutes of work, and a failed export leaves no partial file behind.
  """
  if output.is_dir():
    raise ExportError(f'output {str(output)!r} is a directory; give a file name')
  try:
    handle = tempfile.NamedTemporaryFile(dir=output.parent, prefix=f'.{output.name}.', delete=False)
  except OSError as e:
    raise ExportError(f'cannot write the output {str(output)!r}: {e.strerror or e}') from None
  try:
    with handle:
      yield handle
    # NamedTemporaryFile makes the file private (0600); give it the mode a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(handle.name, 0o666 & ~umask)
    os.replace(handle.name, output)
  except BaseException:
    pathlib.Path(handle.name).unlink(missing_ok=True)
    raise


def export_checkpoint(checkpoint, output, *, fmt: str = 'onnx', weights: str | None = None,
                      step: int | str | None = 'best', opset: int = DEFAULT_OPSET,
                      platforms=DEFAULT_PLATFORMS, chosen_by: str | None = None) -> dict:
  """Loads `checkpoint`, exports it in format `fmt` to the file `output`; returns a summary dict
  (format, output, step, weights, chosen_by, best_by_protocol, layout, image_size, num_points, bytes...).

  step, weights: which checkpoint and weights, as `checkpoints.load_model` takes them; by default the
  official protocol's choice, the one every reader makes (see the module docstring). chosen_by: the
  reason recorded instead of load_model's (a released model says what it is).
  Raises ExportError for an unknown format or weights name, a missing or unreadable checkpoint, an
  unwritable output, or (ONNX) missing packages.
  """
  if fmt not in FORMATS:
    raise ExportError(f'unknown format {fmt!r}; choose one of {", ".join(FORMATS)}')
  if weights is not None and weights not in WEIGHTS:
    raise ExportError(f'unknown weights {weights!r}; choose one of {", ".join(WEIGHTS)}')
  try:
    step = checkpoints.parse_step(step)
  except ValueError as e:
    raise ExportError(f'--step: {e}') from None
  if not os.path.isdir(checkpoint):
    raise ExportError(f'checkpoint directory {str(checkpoint)!r} does not exist')
  output = pathlib.Path(output)
  with _atomic_output(output) as handle:
    try:
      loaded = checkpoints.load_model(checkpoint, step=step, weights=weights)
    except (FileNotFoundError, ValueError) as e:
      raise ExportError(f'cannot load the checkpoint {str(checkpoint)!r}: {e}') from None
    config, directory, used = loaded.config, loaded.directory, loaded.weights
    chosen = loaded.describe()
    if chosen_by is not None:
      chosen.update(chosen_by=chosen_by, best_by_protocol=True)
    decode = config.model.get('decode', 'landmarks')
    # float32 whatever the checkpoint trained in: a bfloat16 export would not run on every runtime
    # (onnxruntime has no bfloat16 CPU convolutions), and the contract promises float32.
    model = models.float32_model(loaded.model, config)
    # The layout's name; a layout from a file (your own points) also travels as its JSON text.
    layout_name, spec = layouts.get_layout(config.layout).name, layouts.portable(config.layout)
    summary = {'format': fmt, 'output': str(output), 'step': loaded.step, 'weights': used,
               'chosen_by': chosen['chosen_by'], 'best_by_protocol': chosen['best_by_protocol'],
               'layout': layout_name, 'image_size': model.image_size, 'num_points': model.num_points}
    if fmt == 'onnx':
      # What a JAX-free reader (star_jax.inference.onnx_model) needs besides image_size and
      # num_points: the layout, and for its records the weights, step and origin.
      metadata = {'layout': layout_name, 'weights': used, 'checkpoint': str(directory),
                  'step': str(loaded.step), 'chosen_by': chosen['chosen_by'],
                  'best_by_protocol': str(chosen['best_by_protocol']).lower(),
                  'producer': f'star_jax {star_jax.__version__}'}
      if spec != layout_name:
        metadata['layout_spec'] = spec
      data = export_onnx(model, opset=opset, metadata=metadata, decode=decode).SerializeToString()
      summary['opset'] = opset
    else:
      exported = export_stablehlo(model, platforms=platforms, decode=decode)
      data = exported.serialize()
      summary['platforms'] = list(exported.platforms)
      summary['calling_convention_version'] = exported.calling_convention_version
    handle.write(data)
  summary['bytes'] = len(data)
  return summary


# ---- Command line -------------------------------------------------------------------------------

def _export(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_string('checkpoint', None, 'star_jax checkpoint directory (or a training workdir holding '
                      'checkpoints/)', flag_values=fv)
  pretrained.define_flag(fv)
  flags.DEFINE_string('output', None, 'file to write (.onnx, or e.g. .stablehlo)', flag_values=fv)
  flags.DEFINE_enum('format', 'onnx', list(FORMATS), 'the file format', flag_values=fv)
  flags.DEFINE_string('step', None, "checkpoint step: 'best' (the default: the best by the official protocol, as "
                      "predict and evaluate read it), 'latest' or a step number", flag_values=fv)
  flags.DEFINE_enum('weights', None, list(WEIGHTS), "the weights (default: those that won the step's evaluation, "
                    "else the EMA weights when the step has them; a converted checkpoint's only weights)",
                    flag_values=fv)
  flags.DEFINE_integer('opset', DEFAULT_OPSET, 'ONNX opset', flag_values=fv)
  flags.DEFINE_list('platforms', list(DEFAULT_PLATFORMS), 'StableHLO: JAX platforms to lower for '
                    '(cpu, cuda, rocm, tpu)', flag_values=fv)
  rest = command.parse()
  if rest:
    raise flags.Error(f'unexpected arguments: {" ".join(rest)}')
  pretrained.check_flags(fv, checkpoint_only=('step', 'weights'))
  command.require('output')
  platforms = tuple(p.strip() for p in fv.platforms if p.strip())
  unknown = sorted(set(platforms) - {'cpu', 'cuda', 'rocm', 'tpu'})
  if not platforms or unknown:
    raise flags.Error(f'--platforms: unknown platform(s) {unknown or platforms}; use cpu, cuda, rocm, tpu')
  cli.setup_logging('error')   # Orbax logs harmless warnings about read-only restores
  checkpoint = pretrained.flag_checkpoint(fv) or fv.checkpoint
  try:
    summary = export_checkpoint(checkpoint, fv.output, fmt=fv.format, weights=fv.weights,
                                step='best' if fv.step is None else fv.step, opset=fv.opset, platforms=platforms,
                                chosen_by=pretrained.chosen_by(fv.pretrained) if fv.pretrained else None)
  except ExportError as e:
    raise cli.UserError(str(e)) from None
  print(f'wrote {summary["output"]} ({summary["format"]}, {summary["bytes"] / 2 ** 20:.1f} MiB): '
        f'{summary["layout"]} {summary["num_points"]} points, input {summary["image_size"]}x'
        f'{summary["image_size"]}; step {summary["step"]}, {summary["weights"]} weights ({summary["chosen_by"]})')
  return 0


def main(argv=None) -> int:
  """Returns 0 after writing the file; 1 with a one-line error on bad inputs, 2 on a bad command line."""
  return cli.guarded(_export, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
