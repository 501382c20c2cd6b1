"""Shared fixtures."""

import pathlib

import jax
import pytest

FIXTURES = pathlib.Path(__file__).parent / 'fixtures'


@pytest.fixture
def x64():
  """Runs a test with 64-bit floats enabled."""
  # jax.enable_x64 from JAX 0.8 on; before, jax.experimental.enable_x64.
  enable_x64 = getattr(jax, 'enable_x64', None)
  if enable_x64 is None:
    from jax.experimental import enable_x64
  with enable_x64(True):
    yield
