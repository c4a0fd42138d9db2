"""The package as a whole: importing it changes nothing, and an installed copy (no checkout) trains
and evaluates with the configs it ships."""

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap

from conftest import COMPILE_CACHE_ENV, REPO

# Imports every module of star_jax (and the dataset builders) after the third-party libraries they
# use, and reports what changed in the process: environment, absl flags, logging handlers, signal
# handlers, a started JAX backend, files written in the working folder.
_PROBE = textwrap.dedent('''
    import importlib, json, logging, os, pkgutil, signal, sys
    import absl.flags, absl.logging, cv2, flax, grain, jax, matplotlib, ml_collections, numpy, optax, orbax.checkpoint
    import tensorflow_datasets, tqdm
    from jax._src import xla_bridge
    before = dict(env=dict(os.environ), flags=sorted(absl.flags.FLAGS), handlers=len(logging.getLogger().handlers),
                  absl_handlers=len(logging.getLogger('absl').handlers), verbosity=absl.logging.get_verbosity(),
                  sigterm=repr(signal.getsignal(signal.SIGTERM)), sigint=repr(signal.getsignal(signal.SIGINT)),
                  files=sorted(os.listdir('.')), backend=matplotlib.get_backend())
    import star_jax, star_jax_datasets
    names = []
    for package in (star_jax, star_jax_datasets):
      for info in pkgutil.walk_packages(package.__path__, package.__name__ + '.'):
        if info.name.endswith('_test') or info.name.endswith('fake_data'):
          continue
        importlib.import_module(info.name)
        names.append(info.name)
    after = dict(env=dict(os.environ), flags=sorted(absl.flags.FLAGS), handlers=len(logging.getLogger().handlers),
                 absl_handlers=len(logging.getLogger('absl').handlers), verbosity=absl.logging.get_verbosity(),
                 sigterm=repr(signal.getsignal(signal.SIGTERM)), sigint=repr(signal.getsignal(signal.SIGINT)),
                 files=sorted(os.listdir('.')), backend=matplotlib.get_backend())
    changed = {k: (before[k], after[k]) for k in before if before[k] != after[k]}
    print(json.dumps({'modules': names, 'changed': changed, 'backends': sorted(xla_bridge._backends)}))
''')


def test_importing_star_jax_changes_nothing(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS', 'GLIBC_TUNABLES')}
  proc = subprocess.run([sys.executable, '-c', _PROBE], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  # Every module was imported (the walk found the package's rooms), and none of them did anything.
  for module in ('star_jax.cpu_tuning', 'star_jax.train', 'star_jax.evaluate', 'star_jax.predict',
                 'star_jax.training.loop', 'star_jax.data.synthetic.render', 'star_jax.experiments.ambiguity',
                 'star_jax_datasets.synthetic_faces.synthetic_faces_dataset_builder'):
    assert module in report['modules']
  assert report['changed'] == {}
  assert report['backends'] == []   # no JAX backend started


def test_entry_points_tune_the_cpu_only_when_run(tmp_path):
  # The tuning is an explicit call in the commands' __main__: importing a command does not tune, and
  # an accelerator platform turns it off.
  code = ('import os; from star_jax import cpu_tuning, train; print(os.environ.get("XLA_FLAGS", ""));'
          'os.environ["JAX_PLATFORMS"] = "cuda"; print(cpu_tuning.accelerator_expected(), cpu_tuning.status())')
  env = {k: v for k, v in os.environ.items() if k not in ('XLA_FLAGS',)}
  env['JAX_PLATFORMS'] = 'cpu'
  out = subprocess.run([sys.executable, '-c', code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=120, check=True).stdout.split('\n')
  assert out[0] == '' and out[1] == 'True off'


def test_an_installed_copy_trains_and_evaluates_without_the_checkout(tmp_path, tiny_tfds_dir):
  # Installed from a copy of the sources (the build writes build/ and *.egg-info beside them).
  source = tmp_path / 'source'
  shutil.copytree(REPO, source, ignore=shutil.ignore_patterns('.git', '.venv', '.ci', 'runs', 'build', 'tests',
                                                              '*.egg-info', '__pycache__'))
  target = tmp_path / 'site'
  proc = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(target),
                         str(source)], capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  # Untuned, as the other tests' runs of this config (conftest.command_env): the same programs, compiled once.
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(target), STAR_JAX_CPU_TUNING='0', **COMPILE_CACHE_ENV)
  where = subprocess.run([sys.executable, '-c', 'import star_jax, star_jax_configs; print(star_jax.__file__)'],
                         cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
  assert where.stdout.startswith(str(target)), where.stdout + where.stderr
  config = ['--config', 'configs/synthetic.py:tiny', f'--config.data.data_dir={tiny_tfds_dir}']
  train = subprocess.run([sys.executable, '-m', 'star_jax.train', *config, '--workdir', 'run',
                          '--config.total_steps=2', '--config.progress=False'], cwd=elsewhere, env=env,
                         capture_output=True, text=True, timeout=600)
  assert train.returncode == 0, train.stderr[-3000:]
  # The run ends with its result and the next commands, which run as printed.
  out = train.stdout
  assert 'result on the synthetic_faces test split' in out and 'EMA' in out and 'does not work on real photos' in out
  printed = [shlex.split(line) for line in out.split('next:\n', 1)[1].splitlines() if line.startswith('  python')]
  assert [c[2] for c in printed] == ['star_jax.evaluate', 'star_jax.predict']
  evaluate = subprocess.run([sys.executable, *printed[0][1:], '--output', 'report', '--noprogress'], cwd=elsewhere,
                            env=env, capture_output=True, text=True, timeout=600)
  assert evaluate.returncode == 0, evaluate.stderr[-3000:]
  predict = subprocess.run([sys.executable, *printed[1][1:], '--norefine'], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=600)
  assert predict.returncode == 0, predict.stderr[-3000:]
  assert len(list((elsewhere / 'run' / 'predictions').glob('synthetic_test_*.json'))) == 4
  rows = json.loads((elsewhere / 'report' / 'metrics.json').read_text())['rows']
  final = json.loads((elsewhere / 'run' / 'final_metrics.json').read_text())
  assert abs(rows[0]['nme'] - 100 * final['nme']) < 1e-3 * rows[0]['nme']   # the best by the official protocol
  # Without --config the trainer takes the installed synthetic default.
  from star_jax import config_lib
  assert config_lib.resolve_config_path('configs/nothing_here.py') == 'configs/nothing_here.py'
