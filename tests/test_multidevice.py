"""Eight devices: data parallelism and sharded params give the one-device path.

The suite runs on one device; this test starts a process with eight host CPU
devices (``--xla_force_host_platform_device_count=8``) running
``tests/_multidevice.py`` and asserts on what it measures.
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import pytest

# Sharding in types (explicit mesh axes) arrived in JAX 0.7.
pytestmark = pytest.mark.skipif(
  not all(hasattr(jax, n) for n in ('set_mesh', 'typeof')),
  reason='needs jax.set_mesh and jax.typeof',
)
SCRIPT = pathlib.Path(__file__).with_name('_multidevice.py')


def _measure():
  """Runs the eight-device script once and returns what it measured."""
  env = {
    **os.environ,
    'XLA_FLAGS': (
      os.environ.get('XLA_FLAGS', '')
      + ' --xla_force_host_platform_device_count=8'
    ).strip(),
    'JAX_PLATFORMS': 'cpu',
  }
  out = subprocess.run(
    [sys.executable, str(SCRIPT)],
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
    check=False,
  )
  assert out.returncode == 0, out.stderr[-4000:]
  return json.loads(out.stdout)


def _sharded_and_data_parallel_paths_match_one_device(measured):
  # The path is not trivial: some filters are selected, not all.
  assert 0 < measured['selected_filters'] < 16
  cases = measured['cases']
  # Data parallel; each axis of the conv kernel sharded (axes 0-2 split every
  # group's norm across devices, axis 3 splits the filters); a 2-D mesh.
  # Automatic and explicit axis types are both covered.
  assert set(cases) == {
    'data/Auto',
    'data/Explicit',
    'axis0/Auto',
    'axis1/Explicit',
    'axis2/Explicit',
    'filters/Auto',
    'filters/Explicit',
    'data_x_filters/Auto',
  }
  for name, case in cases.items():
    assert case['params'] <= 1e-5, (name, case)
    assert case['state'] <= 1e-5, (name, case)


def _state_follows_the_params_sharding(measured):
  for name, case in measured['cases'].items():
    assert case['init_follows_params'], name
    assert case['state_follows_params'], name
    if name.endswith('Explicit'):  # sharding is part of the type
      assert case['params_keep_sharding'], name


def _state_types_are_stable_under_sharding_in_types(measured):
  types = dict(measured['types_stable'])
  assert len(types) == 5
  types.pop('core_compact_gamma/float32')
  assert all(types.values()), types


def _compact_gamma_state_types_are_stable(measured):
  assert measured['types_stable']['core_compact_gamma/float32']


def _ranking_and_pruning_take_params_sharded_in_types(measured):
  # The sort across a sharded axis used to fail inside JAX.
  toolbox = measured['toolbox']
  assert len(toolbox) == 4
  for name, case in toolbox.items():
    assert case == {'same': True, 'keep_sharding': True}, name


def _fused_step_on_sharded_params(measured):
  fused = measured['fused']
  for name in (
    'filters/Auto',
    'replicated/Explicit',
    'filters/Explicit',
    'replicated/Explicit/outside',
  ):
    assert fused[name]['diff'] <= 1e-5, (name, fused[name]['diff'])
    assert fused[name]['params_keep_sharding'], name
  # On a GPU the default runs the kernels on whole arrays: as they are under
  # automatic axes, on each device's copy (shard_map) when replicated with
  # sharding in types, and not at all for arrays sharded in their types.
  assert fused['filters/Auto']['gpu'] == {'kernels': True, 'shard_map': False}
  # Outside jax.set_mesh too: the kernels used to run on the replicated
  # arrays without shard_map and fail inside JAX's sharding checks.
  for name in ('replicated/Explicit', 'replicated/Explicit/outside'):
    assert fused[name]['gpu'] == {'kernels': True, 'shard_map': True}, name
  assert not fused['filters/Explicit']['gpu']['kernels']
  # There, 'pallas' is refused, under the mesh or not, saying why and what
  # to do instead; elsewhere it runs.
  assert fused['filters/Auto']['pallas'] == 'ran'
  assert fused['replicated/Explicit']['pallas'] == 'ran'
  for message in (
    fused['filters/Explicit']['pallas'],
    fused['filters/Explicit/outside'],
  ):
    assert "params 'conv/kernel' is sharded as " in message
    assert "(None, None, None, 'model') (an explicit mesh axis)" in message
    assert 'implementation=None' in message


def _prune_and_reinit_keep_sharding_outside_the_mesh(measured):
  # Outside jax.set_mesh prune used to fail inside JAX (no mesh for its
  # sort), reinit_unselected put the edited leaves on one device, and
  # set_nnx_opt_state the optimizer's sharded state.
  assert measured['outside_mesh'] == {
    'prune': {'same': True, 'keep_sharding': True},
    'reinit': {'keep_sharding': True},
    'set_nnx_opt_state': True,
  }


CHECKS = (
  _sharded_and_data_parallel_paths_match_one_device,
  _state_follows_the_params_sharding,
  _state_types_are_stable_under_sharding_in_types,
  _compact_gamma_state_types_are_stable,
  _ranking_and_pruning_take_params_sharded_in_types,
  _fused_step_on_sharded_params,
  _prune_and_reinit_keep_sharding_outside_the_mesh,
)


def test_eight_devices(subtests):
  # One process measures every case (about 45 s, mostly compiling); each
  # check is reported as a subtest of its own.
  measured = _measure()
  for check in CHECKS:
    with subtests.test(msg=check.__name__.lstrip('_')):
      check(measured)
