"""Shared test fixtures: paths to the golden data committed under tests/data."""

import os
import pathlib

import pytest

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

TESTS = pathlib.Path(__file__).parent
DATA = TESTS / 'data'
REPO = TESTS.parent


@pytest.fixture
def data_dir() -> pathlib.Path:
  """tests/data: small golden arrays copied from ../shared/reference and real photos."""
  return DATA
