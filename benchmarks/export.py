"""Deployment exports of the full WFLW network (256x256 input, 4 stacks, 256 channels), random weights.

Rows: ONNX export time (for the full network also with the converter as jax2onnx ships it, side by
side: star_jax.export answers its output-binding checks in constant time) and file size
(star_jax.export, jax2onnx); per-image CPU latency at batch 1 and 8 of onnxruntime (its default
thread count, and one thread), of onnxruntime on the int8 dynamically quantised model and of our
jit-compiled JAX forward (the same function, `export.inference_fn`), timed in turns: each repetition
runs every engine once, so a change in the machine's load hits all of them alike. Medians of
`--repeats` (default 3 on a CPU); the notes give the load average, since on a shared machine other
processes' load distorts multi-threaded timings.

Quantisation is onnxruntime's documented recipe: `quant_pre_process` (without it nothing is
quantised: the exported convolutions take their weights through Transpose / Squeeze nodes, which
only constant folding turns into initialisers) and `quantize_dynamic` with int8 weights. It turns
the k x k convolutions into ConvInteger; the 1x1 convolutions are Gemm, which dynamic quantisation
does not cover.
Needs the 'export' extra (jax2onnx, onnx, onnxruntime); without it the section returns one row saying so.
`--small` exports a small network instead (64 px, 4 stacks, 32 channels: dry runs and smoke tests).
"""

from __future__ import annotations

import collections
import os
import statistics
import tempfile
import time
import types

import jax
import numpy as np
from flax import nnx

import benchmarks
from benchmarks import train as train_bench
from star_jax import export, layouts
from star_jax.models import StackedHGNet

LAYOUT = layouts.WFLW


def _model(shape: train_bench.Shape = train_bench.FULL) -> StackedHGNet:
  model = StackedHGNet(LAYOUT.num_points, LAYOUT.edge_membership(), image_size=shape.image, nstack=shape.nstack,
                       nlevels=4, channels=shape.channels, rngs=nnx.Rngs(0))
  model.eval()
  return model


def _in_turns(engines: dict, images: np.ndarray, repeats: int) -> dict:
  """name -> median seconds of `engines[name](images)`, the engines called in turn each repetition
  (after one untimed warm-up call each)."""
  for fn in engines.values():
    fn(images)
  times = {name: [] for name in engines}
  for _ in range(repeats):
    for name, fn in engines.items():
      t0 = time.perf_counter()
      fn(images)
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(t) for name, t in times.items()}


def run(args):
  try:
    import onnx  # pylint: disable=import-outside-toplevel
    import onnxruntime as ort  # pylint: disable=import-outside-toplevel
    from onnxruntime.quantization import QuantType, quantize_dynamic  # pylint: disable=import-outside-toplevel
    from onnxruntime.quantization.shape_inference import quant_pre_process  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    return [{'name': 'ONNX export', 'value': float('nan'), 'unit': '', 'notes': f'skipped: {e}'}]
  shape = train_bench.shape_of(args)
  repeats = benchmarks.repeats(args, full_network=shape == train_bench.FULL)
  model = _model(shape)
  what = shape.label
  rows = []
  shipped = None
  if shape == train_bench.FULL:   # minutes: not for --small
    # The converter as it ships, without star_jax.export's faster output binding, side by side (first,
    # so that any warm-up favours it).
    fast_versions = export._FAST_BINDING_VERSIONS  # pylint: disable=protected-access
    export._FAST_BINDING_VERSIONS = ()  # pylint: disable=protected-access
    try:
      t0 = time.perf_counter()
      shipped = export.export_onnx(model).SerializeToString()
      shipped_seconds = time.perf_counter() - t0
    finally:
      export._FAST_BINDING_VERSIONS = fast_versions  # pylint: disable=protected-access
  t0 = time.perf_counter()
  proto = export.export_onnx(model)
  seconds = time.perf_counter() - t0
  data = proto.SerializeToString()
  rows.append({'name': f'ONNX export {what} (jax2onnx)', 'value': seconds, 'unit': 's',
               'notes': f'opset {export.DEFAULT_OPSET}, trace + convert, model built beforehand'})
  rows.append({'name': f'ONNX file size {what}', 'value': len(data) / 2 ** 20, 'unit': 'MiB', 'notes': ''})
  if shipped is not None:
    rows.append({'name': f'ONNX export {what} (jax2onnx as shipped)', 'value': shipped_seconds, 'unit': 's',
                 'notes': f'{shipped_seconds / seconds:.2f}x the time of the export above; '
                          f'{"the same bytes" if shipped == data else "DIFFERENT BYTES"}'})

  with tempfile.TemporaryDirectory() as tmp:
    fp32, int8 = os.path.join(tmp, 'model.onnx'), os.path.join(tmp, 'model.int8.onnx')
    with open(fp32, 'wb') as f:
      f.write(data)
    pre = os.path.join(tmp, 'model.pre.onnx')
    t0 = time.perf_counter()
    quant_pre_process(fp32, pre)
    quantize_dynamic(pre, int8, weight_type=QuantType.QInt8)
    quant_seconds = time.perf_counter() - t0
    ops = collections.Counter(node.op_type for node in onnx.load(int8).graph.node)
    rows.append({'name': f'ONNX int8 dynamic quantisation {what}', 'value': os.path.getsize(int8) / 2 ** 20,
                 'unit': 'MiB', 'notes': f'quant_pre_process + quantize_dynamic QInt8, {quant_seconds:.0f} s; '
                                         f'{ops["ConvInteger"]} ConvInteger, {ops["MatMulInteger"]} MatMulInteger, '
                                         f'{ops["Conv"]} Conv and {ops["Gemm"]} Gemm left in float'})
    one_thread = ort.SessionOptions()
    one_thread.intra_op_num_threads = 1
    sessions = {'onnxruntime': ort.InferenceSession(fp32, providers=['CPUExecutionProvider']),
                'onnxruntime 1 thread': ort.InferenceSession(fp32, one_thread, providers=['CPUExecutionProvider']),
                'onnxruntime int8': ort.InferenceSession(int8, providers=['CPUExecutionProvider'])}
    jax_fn = jax.jit(export.inference_fn(model))
    engines = {name: (lambda x, s=s: s.run(None, {export.INPUT_NAME: x})) for name, s in sessions.items()}
    engines['jax'] = lambda x: jax.block_until_ready(jax_fn(x))
    for batch in (1, 8):
      images = np.random.default_rng(batch).uniform(0, 255, (batch, shape.image, shape.image, 3)).astype(np.float32)
      load = os.getloadavg()[0]
      for name, secs in _in_turns(engines, images, repeats).items():
        rows.append({'name': f'{name} per image, batch {batch}', 'value': secs / batch * 1e3, 'unit': 'ms',
                     'notes': f'{secs * 1e3:.0f} ms/batch; {jax.default_backend()} / onnxruntime '
                              f'{ort.__version__}, {os.cpu_count()} CPUs, load average {load:.1f} before; '
                              f'in turns, median of {repeats}'})
  return rows


if __name__ == '__main__':  # quick manual run: python -m benchmarks.export
  for r in run(types.SimpleNamespace(repeats=None)):
    print(r)
