"""Shared test fixtures: paths to the golden data committed under tests/data, the tiny synthetic
dataset, and the environment of subprocesses that run the real commands."""

import os
import pathlib
import sys

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

TESTS = pathlib.Path(__file__).resolve().parent
DATA = TESTS / 'data'
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
# star_jax's cache folder (released models, JAX's compilation cache: star_jax/home.py) for the tests and
# their subprocesses, never the user's; the in-process compilation cache stays off (the tests that need
# it turn it on in a subprocess).
os.environ.setdefault('STAR_JAX_HOME', str(COMPILE_CACHE.parent / 'star_jax_test_home'))
os.environ.setdefault('STAR_JAX_COMPILATION_CACHE', '0')
# configs/synthetic.py:tiny as a --config flag.
TINY_CONFIG = f'--config={REPO / "configs" / "synthetic.py"}:tiny'


@pytest.fixture
def data_dir() -> pathlib.Path:
  """tests/data: small golden arrays from ../shared/reference and real photos (scripts/make_test_data.py)."""
  return DATA


@pytest.fixture(scope='session')
def tiny_tfds_dir(tmp_path_factory) -> pathlib.Path:
  """A TFDS data dir holding the tiny synthetic dataset (synthetic_faces/wflw98_tiny: 32 train and
  16 test faces), built once per test session."""
  from star_jax.data import build
  directory = tmp_path_factory.mktemp('tfds')
  build.build('synthetic_faces', config='wflw98_tiny', data_dir=str(directory))
  return directory


def load_config(name: str, arg: str = ''):
  """configs/<name>.py's get_config(arg)."""
  from star_jax import config_lib
  return config_lib.load_config(str(REPO / 'configs' / f'{name}.py') + (f':{arg}' if arg else ''))


@pytest.fixture(scope='session')
def tiny_wflw_checkpoint(tmp_path_factory) -> pathlib.Path:
  """The tiny official WFLW network (tests/data/tiny_wflw_checkpoint.pkl: input 64, 4 stacks, 32
  channels, random weights) converted to a star_jax checkpoint directory."""
  from star_jax import convert_pytorch

  out = tmp_path_factory.mktemp('ckpt') / 'tiny_wflw'
  convert_pytorch.convert_checkpoint(str(DATA / 'tiny_wflw_checkpoint.pkl'), tiny_wflw_config(), str(out))
  return out


def tiny_wflw_config():
  """The config of tests/data/tiny_wflw_checkpoint.pkl: configs/wflw.py:tiny with 4 stacks of 32 channels."""
  config = load_config('wflw', 'tiny')
  config.model.nstack, config.model.channels = 4, 32
  return config


@pytest.fixture(scope='session')
def tiny_landmarker(tiny_wflw_checkpoint):
  """A FaceLandmarker of the tiny WFLW checkpoint (faces='all'), shared so that each batch shape
  compiles once per session; a test that changes an attribute puts it back."""
  from star_jax.inference.landmarker import FaceLandmarker
  return FaceLandmarker.from_checkpoint(tiny_wflw_checkpoint, faces='all')
