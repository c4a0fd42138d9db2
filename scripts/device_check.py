"""The Python side of scripts/device_check.sh: what the machine selects, and the one-JSON summary.

  python scripts/device_check.py selection OUT.json   # backend, devices, CPU tuning, convolution kernels
  python scripts/device_check.py summarize WORKDIR OUT.json [--dry-run]

`selection` starts as every star_jax command does (`cpu_tuning.setup_process()` first, which on a CPU
re-executes the process once with huge-page malloc and adds the XLA:CPU flag, and on a GPU does
nothing), then reports what this process runs with: JAX's backend and devices, the CPU tuning's status,
XLA_FLAGS / GLIBC_TUNABLES, whether the CPU-only convolution VJP is chosen at the WFLW shapes, the
custom-call targets of a compiled residual block's forward and backward (cuDNN convolutions and
cuBLAS matmuls on a GPU), and the package versions.

`summarize` reads what the stages left in WORKDIR (stages.jsonl, selection.json, pytest.xml,
bench_*.json) and writes one JSON: the stages with their status and time, the test counts and
failures, every benchmark row, and the headline: our training step's images/s, step time, compile
time, memory and MFU in float32 and bfloat16, the official PyTorch step's images/s (anomaly detection
off and on), the speed-up against the 2x goal, and the input pipeline's samples/s per worker count
against the step's images/s (which of the two is the bottleneck). It prints the headline as a table.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import platform
import re
import sys
import xml.etree.ElementTree as ET

_REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ('jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda13-pjrt', 'jax-cuda12-plugin', 'flax', 'optax',
            'orbax-checkpoint', 'numpy', 'protobuf', 'etils', 'setuptools', 'torch', 'tensorflow-datasets',
            'grain', 'array-record', 'ml-collections', 'opencv-python-headless', 'star_jax')


def _versions() -> dict:
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  out = {}
  for name in PACKAGES:
    try:
      out[name] = md.version(name)
    except md.PackageNotFoundError:
      pass
  return out


def selection(path: str) -> int:
  from star_jax import cpu_tuning  # pylint: disable=import-outside-toplevel
  cpu_tuning.setup_process()       # as cli.run: may re-execute this process once (CPU only)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from star_jax.models import layers  # pylint: disable=import-outside-toplevel

  report = {
      'python': sys.version.split()[0], 'machine': platform.machine(), 'cpu_count': os.cpu_count(),
      'backend': jax.default_backend(), 'devices': [f'{d.platform}:{d.id} {d.device_kind}' for d in jax.devices()],
      'cpu_tuning': {'status': cpu_tuning.status(), 'accelerator_expected': cpu_tuning.accelerator_expected(),
                     'enabled': cpu_tuning.enabled(), 'xla_cpu_flags_for_this_jaxlib': list(cpu_tuning.xla_flags())},
      'env': {k: os.environ.get(k, '') for k in ('JAX_PLATFORMS', 'XLA_FLAGS', 'GLIBC_TUNABLES',
                                                 cpu_tuning.ORIGINAL_TUNABLES_ENV, 'XLA_PYTHON_CLIENT_MEM_FRACTION',
                                                 'XLA_PYTHON_CLIENT_PREALLOCATE')},
      'reexecuted_with_huge_pages': cpu_tuning.ORIGINAL_TUNABLES_ENV in os.environ,
      # The hourglass 3x3 convolutions of the WFLW model at batch 32: (B, H, W, C_in).
      'cpu_conv_weight_grad_vjp': {str(s): layers.matmul_weight_gradients(s, 1)
                                   for s in [(32, 64, 64, 128), (32, 32, 32, 128), (32, 16, 16, 128)]},
      'default_matmul_precision': str(jax.config.jax_default_matmul_precision),
      'versions': _versions(),
  }
  try:
    stats = jax.devices()[0].memory_stats() or {}
    report['device_memory_limit'] = int(stats.get('bytes_limit', 0))
  except Exception:  # pylint: disable=broad-except
    pass
  # What a residual block of the hourglass compiles to here (forward + backward, bfloat16 compute).
  block = layers.ResBlock(256, 256, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
  graph, params, stats = nnx.split(block, nnx.Param, nnx.BatchStat)
  x = jnp.ones((8, 64, 64, 256), jnp.bfloat16)

  def loss(params, stats, x):
    return nnx.merge(graph, params, stats)(x).astype(jnp.float32).sum()

  # (The statistics are differentiated too, as in the train step: NNX updates them only in their trace.)
  text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, stats, x).compile().as_text()
  targets = collections.Counter(re.findall(r'custom_call_target="([^"]+)"', text))
  report['resblock_custom_calls'] = dict(targets)
  report['resblock_ops'] = {op: len(re.findall(rf'\b{op}\(', text)) for op in ('convolution', 'dot', 'fusion')}
  try:
    import torch  # pylint: disable=import-outside-toplevel
    report['torch'] = {'version': torch.__version__, 'cuda': torch.cuda.is_available(),
                       'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else ''}
  except Exception as e:  # pylint: disable=broad-except
    report['torch'] = {'error': f'{type(e).__name__}: {e}'}
  pathlib.Path(path).write_text(json.dumps(report, indent=1))
  print(json.dumps(report, indent=1))
  return 0


# ---- Summary -------------------------------------------------------------------------------------------

def _load(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except (OSError, ValueError):
    return None


def _tests(path: pathlib.Path) -> dict:
  if not path.exists():
    return {'ran': False}
  try:
    root = ET.parse(path).getroot()
  except ET.ParseError as e:
    return {'ran': True, 'error': f'unreadable junit xml: {e}'}
  suites = [root] if root.tag == 'testsuite' else list(root.iter('testsuite'))
  out = {'ran': True, 'passed': 0, 'failed': 0, 'errors': 0, 'skipped': 0, 'seconds': 0.0, 'cases': []}
  for suite in suites:
    out['seconds'] += float(suite.get('time', 0) or 0)
    for case in suite.iter('testcase'):
      name = f"{case.get('classname', '')}::{case.get('name', '')}"
      outcome, message = 'passed', ''
      for tag in ('failure', 'error', 'skipped'):
        child = case.find(tag)
        if child is not None:
          outcome = {'failure': 'failed', 'error': 'errors', 'skipped': 'skipped'}[tag]
          message = (child.get('message') or child.text or '')[:1500]
      out[outcome] += 1
      out['cases'].append({'name': name, 'outcome': outcome.rstrip('s') if outcome == 'errors' else outcome,
                           'seconds': float(case.get('time', 0) or 0), 'message': message})
  return out


def _row(rows, **match):
  for row in rows:
    if all(row.get(k) == v for k, v in match.items()):
      return row
  return None


def _headline(bench: dict) -> dict:
  train = bench.get('train_f32', []) + bench.get('train_bf16', [])
  head = {}
  for dtype in ('float32', 'bfloat16'):
    row = _row(train, ours=True, dtype=dtype, pipelined=None) or next(
        (r for r in train if r.get('ours') and r.get('dtype') == dtype and not r.get('pipelined')), None)
    if row:
      head[f'ours_{dtype}'] = {k: row.get(k) for k in ('batch', 'value', 'step_s', 'compile_s', 'flops', 'mfu',
                                                          'memory', 'shape', 'backend')}
      head[f'ours_{dtype}']['images_per_s'] = head[f'ours_{dtype}'].pop('value')
    piped = next((r for r in train if r.get('ours') and r.get('dtype') == dtype and r.get('pipelined')), None)
    if piped:
      head[f'ours_{dtype}_pipelined'] = {'images_per_s': piped['value'], 'step_s': piped['step_s'], 'mfu': piped['mfu']}
  for anomaly in (False, True):
    row = _row(train, official=True, anomaly=anomaly)
    if row:
      head['official_float32' + ('_as_shipped' if anomaly else '')] = {
          'images_per_s': row['value'], 'step_s': row.get('step_s'), 'device': row.get('device'),
          'peak_bytes': row.get('peak_bytes'), 'notes': row.get('notes')}
  failed = next((r for r in train if r.get('official') and r.get('error')), None)
  if failed:
    head['official_error'] = failed['error']
  off = head.get('official_float32', {}).get('images_per_s')
  if off:
    for dtype in ('float32', 'bfloat16'):
      ours = head.get(f'ours_{dtype}', {}).get('images_per_s')
      if ours:
        head[f'speedup_{dtype}_vs_official_float32'] = ours / off
    shipped = head.get('official_float32_as_shipped', {}).get('images_per_s')
    if shipped and head.get('ours_float32'):
      head['speedup_float32_vs_official_as_shipped'] = head['ours_float32']['images_per_s'] / shipped
    if 'speedup_float32_vs_official_float32' in head:
      head['goal'] = 'ours >= 2x the official images/s at batch 32, float32 both (anomaly detection off)'
      head['goal_met'] = head['speedup_float32_vs_official_float32'] >= 2.0
  data = [r for r in bench.get('data', []) if r.get('workers') is not None]
  if data:
    head['input_pipeline_samples_per_s'] = {str(r['workers']): r['value'] for r in data}
    best_data = max(data, key=lambda r: r['value'])
    steps = [v['images_per_s'] for k, v in head.items() if k.startswith('ours_') and isinstance(v, dict)
             and v.get('images_per_s')]
    if steps:
      fastest = max(steps)
      head['bottleneck'] = {
          'fastest_step_images_per_s': fastest, 'best_input_samples_per_s': best_data['value'],
          'best_input_workers': best_data['workers'],
          'verdict': ('input pipeline' if best_data['value'] < fastest else 'training step') +
                     f" ({best_data['value']:.0f} samples/s with {best_data['workers']} workers vs "
                     f'{fastest:.0f} images/s)'}
  return head


def summarize(workdir: str, out: str, dry_run: bool) -> int:
  work = pathlib.Path(workdir)
  stages = []
  stages_file = work / 'stages.jsonl'
  if stages_file.exists():
    stages = [json.loads(line) for line in stages_file.read_text().splitlines() if line.strip()]
  bench = {}
  for path in sorted(work.glob('bench_*.json')):
    data = _load(path)
    if data:
      bench[path.stem[len('bench_'):]] = data.get('rows', [])
      bench.setdefault('_device', data.get('device'))
  summary = {
      'what': 'scripts/device_check.sh: star_jax on the GPU machine (docs/gpu.md)',
      'dry_run': dry_run,
      'selection': _load(work / 'selection.json'),
      'machine': _load(work / 'machine.json'),
      'stages': stages,
      'tests': _tests(work / 'pytest.xml'),
      'headline': _headline(bench),
      'benchmarks': bench,
  }
  pathlib.Path(out).write_text(json.dumps(summary, indent=1, default=str))
  _print(summary)
  return 0


def _percent(x) -> str:
  return f'{x:.1%}' if isinstance(x, (int, float)) and x == x else 'n/a'


def _print(summary: dict) -> None:
  print('\n==== device check summary' + (' (DRY RUN: CPU stand-ins, small shapes)' if summary['dry_run'] else ''))
  sel = summary.get('selection') or {}
  if sel:
    print(f"backend {sel.get('backend')}, devices {sel.get('devices')}, CPU tuning {sel.get('cpu_tuning', {}).get('status')}, "
          f"CPU conv VJP {sorted(set(sel.get('cpu_conv_weight_grad_vjp', {}).values()))}, "
          f"custom calls {sel.get('resblock_custom_calls')}")
  for stage in summary['stages']:
    print(f"  stage {stage['name']:14s} {stage['status']:8s} {stage.get('seconds', 0):7.1f} s  {stage.get('note', '')}")
  tests = summary['tests']
  if tests.get('ran'):
    print(f"tests: {tests.get('passed', 0)} passed, {tests.get('failed', 0)} failed, {tests.get('errors', 0)} errors, "
          f"{tests.get('skipped', 0)} skipped")
    for case in tests.get('cases', []):
      if case['outcome'] not in ('passed', 'skipped'):
        print(f"  {case['outcome'].upper()} {case['name']}: {case['message'][:300]}")
  head = summary['headline']
  for key in ('ours_float32', 'ours_bfloat16'):
    if key in head:
      h = head[key]
      mem = h.get('memory') or {}
      print(f"{key:22s} {h['images_per_s']:9.1f} images/s  {1e3 * h['step_s']:8.1f} ms/step  compile "
            f"{h['compile_s']:.0f} s  MFU {_percent(h.get('mfu'))}  peak "
            f"{mem.get('peak_bytes_in_use', mem.get('peak_memory', 0)) / 2 ** 30:.2f} GiB")
    if key + '_pipelined' in head:
      h = head[key + '_pipelined']
      print(f"{key + ' pipelined':22s} {h['images_per_s']:9.1f} images/s  {1e3 * h['step_s']:8.1f} ms/step  "
            f"MFU {_percent(h.get('mfu'))}")
  for key in ('official_float32', 'official_float32_as_shipped'):
    if key in head:
      h = head[key]
      print(f"{key:22s} {h['images_per_s']:9.1f} images/s  {1e3 * h['step_s']:8.1f} ms/step  ({h.get('device')})")
  for key in ('speedup_float32_vs_official_float32', 'speedup_bfloat16_vs_official_float32',
              'speedup_float32_vs_official_as_shipped'):
    if key in head:
      print(f'{key}: {head[key]:.2f}x')
  if 'goal_met' in head:
    print(f"goal (>= 2x, float32 both): {'MET' if head['goal_met'] else 'NOT met'}")
  if 'official_error' in head:
    print(f"official step failed: {head['official_error'][:300]}")
  if 'input_pipeline_samples_per_s' in head:
    print(f"input pipeline samples/s by workers: "
          f"{ {k: round(v) for k, v in head['input_pipeline_samples_per_s'].items()} }")
  if 'bottleneck' in head:
    print(f"bottleneck: {head['bottleneck']['verdict']}")


def main(argv) -> int:
  if len(argv) >= 3 and argv[1] == 'selection':
    return selection(argv[2])
  if len(argv) >= 4 and argv[1] == 'summarize':
    return summarize(argv[2], argv[3], '--dry-run' in argv[4:])
  print(__doc__, file=sys.stderr)
  return 2


if __name__ == '__main__':
  sys.path.insert(0, str(_REPO))
  sys.exit(main(sys.argv))
