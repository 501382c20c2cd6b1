"""Shared fixtures, and the XLA optimization level the suite compiles at."""

import os
import pathlib

import jax
import pytest

# The suite checks results, not speed, and most of its time is XLA compiling
# small programs: at LLVM optimization level 0 it runs about 30 % faster on
# the CPU. The processes the tests start inherit the level. A level given in
# XLA_FLAGS wins (.ci/run runs one stage at XLA's default level, 2).
_LEVEL = '--xla_backend_optimization_level'
if _LEVEL not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + f' {_LEVEL}=0'
  ).strip()

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
