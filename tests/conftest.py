"""Shared test fixtures and helpers: paths to the golden data committed under tests/testdata, the tiny
synthetic dataset, one tiny model trained by the real train command, the commands run in this process
(`run_command`) and the environment of the subprocesses that run them as a user does."""

import contextlib
import dataclasses
import fcntl
import io
import json
import os
import pathlib
import shutil
import sys

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

TESTS = pathlib.Path(__file__).resolve().parent
DATA = TESTS / 'testdata'
REPO = TESTS.parent
# The repository's own tools (benchmarks/, the official-code harness) are not installed: import them
# from the checkout.
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
# XLA's persistent compilation cache for the tests that run the real commands in subprocesses (train,
# evaluate, the study): shared between them and between runs, so each program compiles once.
COMPILE_CACHE = pathlib.Path(os.environ.get('STAR_JAX_TEST_CACHE', '/tmp/star_jax_test_jax_cache'))
# The environment that points a subprocess at that cache and has it keep every program, however small
# or quick to compile.
COMPILE_CACHE_ENV = {'JAX_COMPILATION_CACHE_DIR': str(COMPILE_CACHE), 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                     'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
# The tests' own process keeps its larger programs there too (JAX's default: those that take a second
# or more to compile): a command run here several times (run_command) traces its jit-compiled
# functions anew each time, and compiles each program once per cache instead of once per run.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', str(COMPILE_CACHE))
# star_jax's cache folder (released models: star_jax/home.py) for the tests and their subprocesses, never
# the user's; star_jax's own compilation cache under it stays off (the compilation cache above serves; the
# tests of star_jax's cache turn it on in a subprocess).
os.environ.setdefault('STAR_JAX_HOME', str(COMPILE_CACHE.parent / 'star_jax_test_home'))
os.environ.setdefault('STAR_JAX_COMPILATION_CACHE', '0')
# configs/synthetic.py:tiny as a --config flag.
TINY_CONFIG = f'--config={REPO / "configs" / "synthetic.py"}:tiny'
# The network of the official tiny files in tests/testdata (tiny_{wflw,cofw}_checkpoint.pkl; input 64, as
# every :tiny config): its config.model fields, and the same as --config flags.
OFFICIAL_TINY_MODEL = {'nstack': 4, 'nlevels': 4, 'channels': 32}
OFFICIAL_TINY_FLAGS = [f'--config.model.{k}={v}' for k, v in OFFICIAL_TINY_MODEL.items()]


@pytest.fixture
def data_dir() -> pathlib.Path:
  """tests/testdata: small golden arrays from ../shared/reference and real photos (scripts/make_test_data.py)."""
  return DATA


def once_per_run(tmp_path_factory, name: str, make) -> tuple[pathlib.Path, dict]:
  """(folder, record): `make(folder)` run once per test run, its JSON record kept beside the folder.

  With pytest-xdist's workers (the README's test command runs two) the first worker to get here makes
  it in a folder of the run that every worker sees, the others wait for it and read it: a session
  fixture built this way is made once, not once per worker. What it makes is read only."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent
  folder, record = root / f'once_{name}', root / f'once_{name}.json'
  with open(root / f'once_{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)     # released when the file closes
    if not record.exists():
      shutil.rmtree(folder, ignore_errors=True)    # a worker that failed half way
      folder.mkdir()
      record.write_text(json.dumps(make(folder)))
  return folder, json.loads(record.read_text())


@pytest.fixture(scope='session')
def tiny_tfds_dir(tmp_path_factory) -> pathlib.Path:
  """A TFDS data dir holding the tiny synthetic dataset (synthetic_faces/wflw98_tiny: 32 train and
  16 test faces), built once per test run."""
  def make(directory):
    from star_jax.data import build  # pylint: disable=import-outside-toplevel
    build.build('synthetic_faces', config='wflw98_tiny', data_dir=str(directory))
    return {}
  return once_per_run(tmp_path_factory, 'tiny_tfds', make)[0]


def load_config(name: str, arg: str = ''):
  """configs/<name>.py's get_config(arg)."""
  from star_jax import config_lib
  return config_lib.load_config(str(REPO / 'configs' / f'{name}.py') + (f':{arg}' if arg else ''))


@pytest.fixture(scope='session')
def tiny_wflw_checkpoint(tmp_path_factory) -> pathlib.Path:
  """The tiny official WFLW network (tests/testdata/tiny_wflw_checkpoint.pkl: input 64, 4 stacks, 32
  channels, random weights) converted to a star_jax checkpoint directory."""
  from star_jax import convert_pytorch

  out = tmp_path_factory.mktemp('ckpt') / 'tiny_wflw'
  convert_pytorch.convert_checkpoint(str(DATA / 'tiny_wflw_checkpoint.pkl'), tiny_wflw_config(), str(out))
  return out


def tiny_wflw_config():
  """The config of tests/testdata/tiny_wflw_checkpoint.pkl: configs/wflw.py:tiny with 4 stacks of 32 channels."""
  config = load_config('wflw', 'tiny')
  config.model.update(OFFICIAL_TINY_MODEL)
  return config


@pytest.fixture(scope='session')
def tiny_landmarker(tiny_wflw_checkpoint):
  """A FaceLandmarker of the tiny WFLW checkpoint (faces='all'), shared so that each batch shape
  compiles once per session; a test that changes an attribute puts it back."""
  from star_jax.inference.landmarker import FaceLandmarker
  return FaceLandmarker.from_checkpoint(tiny_wflw_checkpoint, faces='all')


# ---- The commands, run in this process ---------------------------------------------------------


@dataclasses.dataclass
class Completed:
  """What a command run in this process returned and printed (as subprocess.CompletedProcess names it)."""
  returncode: int
  stdout: str
  stderr: str


def run_command(main, *argv) -> Completed:
  """`main(['prog', *argv])` of a star_jax command (`star_jax.train.main`, ...) in this process: its
  exit status, and its stdout and stderr with its log lines (absl's handler writes to the stderr of
  the moment, or to its own stream once absl's flags are parsed: both are captured)."""
  from absl import logging as absl_logging  # pylint: disable=import-outside-toplevel
  out, err = io.StringIO(), io.StringIO()
  handler = absl_logging.get_absl_handler().python_handler
  stream = handler.stream
  handler.setStream(err)
  try:
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
      status = main(['prog', *map(str, argv)])
  finally:
    handler.setStream(stream)
  return Completed(status, out.getvalue(), err.getvalue())


def load_script(name: str):
  """scripts/<name>.py as a module (the scripts are files of the checkout, not a package), for its `main`."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(name, REPO / 'scripts' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def command_env(devices: int = 1, **extra) -> dict:
  """The environment of a subprocess running a command (`python -m star_jax.train ...`) on the CPU, with
  `devices` devices. Without star_jax's CPU tuning (STAR_JAX_CPU_TUNING=0: XLA's default kernels, as
  in this process) unless `extra` turns it on: its programs are then the ones this process compiles
  for the same config, and COMPILE_CACHE holds them once for both."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1', STAR_JAX_CPU_TUNING='0', **COMPILE_CACHE_ENV)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env.update(extra)
  return env


def train_tiny(workdir, tfds_dir, *extra) -> Completed:
  """`python -m star_jax.train` on configs/synthetic.py:tiny and the data in `tfds_dir`, run in this
  process (`extra`: more flags, e.g. '--config.total_steps=8')."""
  from star_jax import train  # pylint: disable=import-outside-toplevel
  return run_command(train.main, TINY_CONFIG, f'--workdir={workdir}', f'--config.data.data_dir={tfds_dir}',
                     '--config.progress=False', *extra)


def metric_records(workdir, key: str) -> dict:
  """step -> the value of `key` in <workdir>/metrics.jsonl, the last record of each step (a resumed run
  logs its steps again)."""
  records = map(json.loads, (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines())
  return {r['step']: r[key] for r in records if key in r}


def checkpoint_steps(workdir) -> list:
  """The step folders of <workdir>/checkpoints, in order."""
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / 'checkpoints').iterdir() if p.name.isdigit())


# The one training run of the tiny model shared by the tests that need a trained workdir (they copy it
# before changing it): 32 training faces at the tiny config's batch 4, 8 steps per epoch, an evaluation
# every epoch (4 in all), checkpoints only at evaluations and only the latest one kept besides the best.
# (The tiny config's batch, not a batch of its own: the train step it compiles is the one the other
# tests' runs of the tiny config compile.)
TRAINED_STEPS = 32
TRAINED_RUN = (f'--config.total_steps={TRAINED_STEPS}', '--config.eval_every_epochs=1',
               '--config.checkpoint_every_epochs=100', '--config.keep_checkpoints=1')


@pytest.fixture(scope='session')
def trained_tiny(tiny_tfds_dir, tmp_path_factory):
  """(workdir, the train command's Completed) of configs/synthetic.py:tiny trained by the train command
  for TRAINED_RUN on tiny_tfds_dir, once per test run. Read only: copy it (`copy_workdir`) to change it."""
  def make(folder):
    proc = train_tiny(folder / 'run', tiny_tfds_dir, *TRAINED_RUN)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dataclasses.asdict(proc)
  folder, proc = once_per_run(tmp_path_factory, 'trained_tiny', make)
  return folder / 'run', Completed(**proc)


@pytest.fixture(scope='session')
def trained_tiny_onnx(trained_tiny, tmp_path_factory):
  """(path, the export command's Completed) of trained_tiny exported to ONNX by the export command (its
  defaults: the official protocol's choice of step and weights), once per session. Needs the 'export' extra: the tests
  that use it skip without."""
  def make(folder):
    from star_jax import export  # pylint: disable=import-outside-toplevel
    proc = run_command(export.main, '--checkpoint', trained_tiny[0], '--output', folder / 'tiny.onnx')
    assert proc.returncode == 0, proc.stderr[-4000:]
    return dataclasses.asdict(proc)
  folder, proc = once_per_run(tmp_path_factory, 'trained_tiny_onnx', make)
  return folder / 'tiny.onnx', Completed(**proc)


def copy_workdir(workdir, destination) -> pathlib.Path:
  """A copy of a training workdir at `destination`, for a test that changes it."""
  shutil.copytree(workdir, destination)
  return pathlib.Path(destination)


# ---- The order of the test files -------------------------------------------------------------------

# The test files that take minutes, longest first: collected first, they are the first each test
# process takes (the README's command hands out whole files), and the short ones fill in at the end
# instead of one long file running alone. Only the order changes; every file runs.
LONGEST_FIRST = ('test_benchmark.py', 'test_train_step_parity.py', 'test_train.py', 'test_study.py',
                 'test_train_faults.py', 'test_export.py', 'test_evaluate.py', 'test_finetune.py')


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))   # stable: the rest keep their order
