"""Replays the reference golden trajectories (W, Γ per step) in Flax layouts."""

import json

import jax.numpy as jnp
import numpy as np

import dessilbi_jax as dl
from tests.conftest import FIXTURES

GOLDEN = np.load(FIXTURES / 'dessilbi_reference_golden.npz')
META = json.loads(str(GOLDEN['meta_json']))
STEPS = META['steps']
STEPS_PER_EPOCH = META['steps_per_epoch']

# Coupled reference parameters -> (Flax layer, layout conversion).
COUPLED = {
  'conv1.weight': ('conv1', lambda w: np.moveaxis(w, (-4, -3), (-1, -2))),
  'fc.weight': ('fc', lambda w: np.swapaxes(w, -1, -2)),
}
# Cases with the toolbox's final values recorded (core_freeze included: its
# values follow from its recorded W and Γ, whatever step produced them).
TOOLBOX_CASES = [
  c for c in META['cases'] if f'{c}/final/w_star/conv1.weight' in GOLDEN
]


def golden(key):
  """``<key>/<param>`` for both coupled params, as {layer: {'kernel': ...}}."""
  return {
    layer: {'kernel': convert(GOLDEN[f'{key}/{ref}'])}
    for ref, (layer, convert) in COUPLED.items()
  }


def replay(case, t):
  """(params, opt_state) after step t (0-based) of a golden trajectory."""
  w = golden(f'{case}/W')
  z = golden(f'{case}/z')
  gamma = golden(f'{case}/gamma')

  def at(tree):
    return {k: {'kernel': jnp.asarray(v['kernel'][t])} for k, v in tree.items()}

  params = at(w)
  params['conv1']['bias'] = jnp.asarray(GOLDEN[f'{case}/W/conv1.bias'][t])
  z, gamma = at(z), at(gamma)
  z['conv1']['bias'] = ()
  gamma['conv1']['bias'] = ()
  state = dl.DessiLBIState(count=jnp.asarray(t + 1), z=z, gamma=gamma)
  return params, state
