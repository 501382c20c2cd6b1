"""Step-by-step parity with the reference PyTorch implementation (float64).

The golden file records the reference optimizer on a toy parameter set (a conv
layer, a batch-norm layer and a linear layer) fed a fixed gradient sequence.
Its layout is PyTorch's; we convert to Flax's (conv HWIO, Dense (in, out)).
"""

import json

import jax
import numpy as np
import optax
import pytest

import dessilbi_jax as dl
from tests.conftest import FIXTURES

GOLDEN = np.load(FIXTURES / 'dessilbi_reference_golden.npz')
META = json.loads(str(GOLDEN['meta_json']))
STEPS = META['steps']

# Reference name -> (Flax layer, Flax name, layout conversion). Conversions act
# on the trailing axes, so they also apply to time-stacked arrays.
LAYOUT = {
  'conv1.weight': (
    'conv1',
    'kernel',
    lambda w: np.moveaxis(w, (-4, -3), (-1, -2)),
  ),
  'conv1.bias': ('conv1', 'bias', lambda w: w),
  'bn1.weight': ('bn1', 'scale', lambda w: w),
  'bn1.bias': ('bn1', 'bias', lambda w: w),
  'fc.weight': ('fc', 'kernel', lambda w: np.swapaxes(w, -1, -2)),
  'fc.bias': ('fc', 'bias', lambda w: w),
}


def _to_flax(prefix):
  """Golden arrays under ``prefix`` as a Flax-layout params pytree."""
  tree = {}
  for ref_name, (layer, name, convert) in LAYOUT.items():
    key = f'{prefix}/{ref_name}'
    if key in GOLDEN:
      tree.setdefault(layer, {})[name] = convert(GOLDEN[key])
  return tree


def _optimizer(case, freeze=False, store_gamma=True):
  hp = META['cases'][case]
  momentum = hp['momentum'] or None
  if hp['impl'] == 'lottery':
    # The lottery variant decays every parameter whose name lacks 'bias',
    # scales the conv threshold by sqrt(group size) and keeps λ = 1 for fc.
    penalty = dl.penalty_rule(
      conv=dl.GroupLasso(lam=hp['conv_lambda'], scale_by_size=True),
      dense=dl.Lasso(1.0),
    )
    mask = {
      'conv1': {'kernel': True, 'bias': False},
      'bn1': {'scale': True, 'bias': False},
      'fc': {'kernel': True, 'bias': False},
    }
    return dl.dessilbi(
      learning_rate=hp['lr'],
      kappa=hp['kappa'],
      nu=hp['mu'],
      momentum=momentum,
      nesterov=hp['nesterov'],
      weight_decay=hp['weight_decay'],
      weight_decay_mask=mask,
      penalty=penalty,
      store_gamma=store_gamma,
    )
  return dl.dessilbi(
    learning_rate=hp['lr'],
    kappa=hp['kappa'],
    nu=hp['mu'],
    momentum=momentum,
    weight_decay=hp['weight_decay'],
    freeze=freeze,
    store_gamma=store_gamma,
  )


def _at(tree, t):
  """Step t of a time-stacked pytree."""
  return jax.tree.map(lambda x: x[t], tree)


CASES = list(META['cases'])


@pytest.mark.parametrize('store_gamma', [True, False])
@pytest.mark.parametrize('case', CASES)
def test_trajectory_matches_reference(case, store_gamma, x64):
  del x64
  tx = _optimizer(case, store_gamma=store_gamma)
  params = jax.tree.map(jax.numpy.asarray, _to_flax('init'))
  state = tx.init(params)
  grads_all = _to_flax('grads')
  want = {
    field: _to_flax(f'{case}/{field}') for field in ('W', 'm', 'z', 'gamma')
  }
  has_momentum = bool(want['m'])
  assert has_momentum == (META['cases'][case]['momentum'] != 0)
  step = jax.jit(tx.update)
  # core_freeze switches to the freezing step from `freeze_from` on; the state
  # carries over unchanged.
  freeze_from = META['cases'][case].get('freeze_from', STEPS)
  step_frozen = jax.jit(
    _optimizer(case, freeze=True, store_gamma=store_gamma).update
  )

  for t in range(STEPS):
    grads = _at(grads_all, t)
    update = step if t < freeze_from else step_frozen
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
    got = {
      'W': params,
      'z': optax.tree.get(state, 'z'),
      'gamma': dl.get_gamma(state),
    }
    if has_momentum:
      got['m'] = optax.tree.get(state, 'trace')
    for field, tree in got.items():
      expected = _at(want[field], t)
      # Uncoupled leaves hold an empty MaskedNode in z and Γ.
      for path, value in jax.tree_util.tree_leaves_with_path(tree):
        exp = expected
        for key in path:
          exp = exp[key.key]
        assert value.dtype == np.float64
        np.testing.assert_allclose(
          np.asarray(value),
          exp,
          rtol=0,
          atol=1e-10,
          err_msg=f'{case}: {field} {dl.path_str(path)} at step {t}',
        )
      n_leaves = len(jax.tree.leaves(tree))
      assert n_leaves == len(jax.tree.leaves(expected)), (field, t)
