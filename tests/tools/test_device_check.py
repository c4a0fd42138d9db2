"""scripts/device_check.py summarize: the one JSON of the GPU device check, from what its stages left."""

import importlib.util
import json

from conftest import REPO


def _module():
  spec = importlib.util.spec_from_file_location('device_check', REPO / 'scripts' / 'device_check.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _bench(path, rows):
  path.write_text(json.dumps({'device': 'NVIDIA H200 x1 (x86_64, gpu; star_jax CPU tuning off)', 'rows': rows}))


def test_summary_headline_goal_and_bottleneck(tmp_path, capsys):
  work = tmp_path
  (work / 'stages.jsonl').write_text(
      '{"name": "tests", "status": "ok", "rc": 0, "seconds": 80.5, "limit": 200, "note": ""}\n'
      '{"name": "model", "status": "skipped", "rc": null, "seconds": 0, "limit": 3, "note": "time budget"}\n')
  (work / 'pytest.xml').write_text(
      '<testsuites><testsuite name="pytest" time="80"><testcase classname="tests.test_gpu" name="test_a" time="1"/>'
      '<testcase classname="tests.test_gpu" name="test_b" time="2"><failure message="boom">trace</failure></testcase>'
      '<testcase classname="tests.test_gpu" name="test_c" time="0"><skipped message="no GPU"/></testcase>'
      '</testsuite></testsuites>')
  ours = {'section': 'train', 'ours': True, 'batch': 32, 'step_s': 0.1, 'compile_s': 50.0, 'flops': 3e12, 'mfu': 0.06,
          'memory': {'peak_bytes_in_use': 2 ** 33}, 'unit': 'images/s'}
  _bench(work / 'bench_train_f32.json', [
      dict(ours, name='train step b32 float32', value=320.0, dtype='float32'),
      dict(ours, name='train step b32 float32, pipelined', value=340.0, dtype='float32', pipelined=True, step_s=0.094),
      {'name': 'official', 'official': True, 'anomaly': False, 'value': 100.0, 'step_s': 0.32, 'device': 'cuda'},
      {'name': 'official as shipped', 'official': True, 'anomaly': True, 'value': 40.0, 'step_s': 0.8, 'device': 'cuda'},
  ])
  _bench(work / 'bench_train_bf16.json', [dict(ours, name='train step b32 bfloat16', value=500.0, dtype='bfloat16')])
  _bench(work / 'bench_data.json', [{'name': f'{w} workers', 'workers': w, 'value': v}
                                    for w, v in ((0, 120.0), (8, 900.0), (15, 1500.0))])
  out = tmp_path / 'summary.json'
  assert _module().summarize(str(work), str(out), dry_run=False) == 0
  summary = json.loads(out.read_text())
  head = summary['headline']
  assert head['ours_float32']['images_per_s'] == 320.0 and head['ours_bfloat16']['images_per_s'] == 500.0
  assert head['ours_float32_pipelined']['images_per_s'] == 340.0
  assert head['speedup_float32_vs_official_float32'] == 3.2 and head['goal_met'] is True
  assert head['speedup_float32_vs_official_as_shipped'] == 8.0
  assert head['bottleneck']['verdict'].startswith('training step')   # 1500 samples/s feed 500 images/s
  assert head['input_pipeline_samples_per_s'] == {'0': 120.0, '8': 900.0, '15': 1500.0}
  tests = summary['tests']
  assert (tests['passed'], tests['failed'], tests['skipped']) == (1, 1, 1)
  assert [s['status'] for s in summary['stages']] == ['ok', 'skipped']
  printed = capsys.readouterr().out
  assert 'goal (>= 2x, float32 both): MET' in printed and 'FAILED tests.test_gpu::test_b: boom' in printed


def test_summary_of_a_run_that_measured_nothing(tmp_path):
  out = tmp_path / 'summary.json'
  assert _module().summarize(str(tmp_path), str(out), dry_run=True) == 0
  summary = json.loads(out.read_text())
  assert summary['dry_run'] is True and summary['headline'] == {} and summary['tests'] == {'ran': False}
