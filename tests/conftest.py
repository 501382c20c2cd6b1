"""Shared fixtures."""

import pathlib

import jax
import pytest

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled."""
  with jax.enable_x64(True):
    yield
