"""Shared test fixtures: paths to the golden data committed under tests/data."""

import os
import pathlib

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

TESTS = pathlib.Path(__file__).resolve().parent
DATA = TESTS / 'data'
REPO = TESTS.parent
# XLA's persistent compilation cache for the tests that run the real commands in subprocesses (train,
# evaluate, the study): shared between them and between runs, so each program compiles once.
COMPILE_CACHE = pathlib.Path(os.environ.get('STAR_JAX_TEST_CACHE', '/tmp/star_jax_test_jax_cache'))
# The environment that points a subprocess at that cache and has it keep every program, however small
# or quick to compile.
COMPILE_CACHE_ENV = {'JAX_COMPILATION_CACHE_DIR': str(COMPILE_CACHE), 'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
                     'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


@pytest.fixture
def data_dir() -> pathlib.Path:
  """tests/data: small golden arrays copied from ../shared/reference and real photos."""
  return DATA
