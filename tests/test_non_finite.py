"""Non-finite gradients, with and without ``optax.apply_if_finite``."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl

PARAMS = {
  'conv': jnp.ones((1, 1, 2, 3)),  # 3 groups (filters) of 2 entries
  'dense': jnp.ones((2, 2)),  # elementwise
  'bias': jnp.ones(2),  # uncoupled
  'clean': jnp.ones((2, 2)),  # never gets a bad gradient
}


def _grads(value=0.5):
  return jax.tree.map(lambda p: jnp.full(p.shape, value), PARAMS)


def _poison(grads, bad):
  """One non-finite entry in each of conv (filter 0), dense and bias."""
  return {
    **grads,
    'conv': grads['conv'].at[0, 0, 0, 0].set(bad),
    'dense': grads['dense'].at[0, 0].set(bad),
    'bias': grads['bias'].at[0].set(bad),
  }


def _step(tx):
  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  return step


def _warm(tx, steps=20):
  """A state mid-path: z and Γ non-zero, some groups selected."""
  step = _step(tx)
  params, state = PARAMS, tx.init(PARAMS)
  for _ in range(steps):
    params, state = step(params, state, _grads(-0.5))
  assert bool(jnp.any(optax.tree.get(state, 'gamma')['conv'] != 0))
  return params, state


@pytest.mark.parametrize('bad', [jnp.nan, jnp.inf, -jnp.inf])
def test_apply_if_finite_leaves_params_z_and_gamma_untouched(bad):
  tx = optax.apply_if_finite(dl.dessilbi(0.1, nu=0.5), max_consecutive_errors=3)
  step = _step(tx)
  params, state = _warm(tx)

  new_params, new_state = step(params, state, _poison(_grads(), bad))
  # Params, momentum, z, Γ and the core's step count are bit for bit the same.
  jax.tree.map(np.testing.assert_array_equal, new_params, params)
  jax.tree.map(
    np.testing.assert_array_equal, new_state.inner_state, state.inner_state
  )
  assert int(new_state.notfinite_count) == 1
  assert int(new_state.total_notfinite) == 1

  # The next finite step is the one the bad batch interrupted.
  after = step(new_params, new_state, _grads())
  expected = step(params, state, _grads())
  jax.tree.map(np.testing.assert_array_equal, after[0], expected[0])
  jax.tree.map(
    np.testing.assert_array_equal,
    after[1].inner_state,
    expected[1].inner_state,
  )
  assert int(after[1].notfinite_count) == 0


def test_without_apply_if_finite_nan_stays_where_it_entered():
  """The documented behaviour without a guard (README, "Non-finite
  gradients"): a NaN gradient entry makes the same entry of W NaN at once;
  z and Γ take it one step later, since they read the old W. It does not
  spread to other entries of a lasso leaf, to other groups or to other
  leaves; in a group-lasso leaf the group's norm is NaN, so the rest of that
  group drops out of Γ's support (Γ = 0 there) while its W keeps training."""
  tx = dl.scale_by_dessilbi(0.1, nu=0.5)
  step = _step(tx)
  params, state = _warm(tx)
  finite = jax.tree.map(lambda x: bool(jnp.all(jnp.isfinite(x))), state)
  assert all(jax.tree.leaves(finite))

  p1, s1 = step(params, state, _poison(_grads(), jnp.nan))
  bad = {'conv': (0, 0, 0, 0), 'dense': (0, 0), 'bias': (0,)}
  for name, index in bad.items():
    assert bool(jnp.isnan(p1[name][index]))
    mask = jnp.ones(p1[name].shape, bool).at[index].set(False)
    assert bool(jnp.all(jnp.isfinite(p1[name][mask])))
  assert bool(jnp.all(jnp.isfinite(p1['clean'])))
  for tree in (s1.z, s1.gamma):  # one step behind
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))

  p2, s2 = step(p1, s1, _grads())
  for tree in (s2.z, s2.gamma):
    assert bool(jnp.isnan(tree['dense'][0, 0]))
    assert int(jnp.sum(jnp.isnan(tree['dense']))) == 1
    assert bool(jnp.isnan(tree['conv'][0, 0, 0, 0]))
    assert int(jnp.sum(jnp.isnan(tree['conv']))) == 1
    assert bool(jnp.all(jnp.isfinite(tree['clean'])))
  # Filter 0 left the support (its finite entry has Γ = 0); filters 1 and 2
  # are selected and move on as before.
  assert float(s2.gamma['conv'][0, 0, 1, 0]) == 0.0
  assert bool(jnp.all(s2.gamma['conv'][..., 1:] != 0))
  # The clean leaf is exactly where it would be without the NaN.
  clean = step(*step(params, state, _grads()), _grads())
  np.testing.assert_array_equal(p2['clean'], clean[0]['clean'])
  np.testing.assert_array_equal(s2.gamma['clean'], clean[1].gamma['clean'])


def test_the_toolbox_reads_a_nan_entry_of_gamma_as_unselected():
  # The group whose z holds a NaN has a shrink factor of 0: it is out of the
  # support, and every reader of Γ says so (|Γ| > 0, as the reference's
  # epoch record reads it), though the NaN entry itself stays NaN in Γ.
  tx = dl.track_selection(dl.scale_by_dessilbi(0.1, nu=0.5))
  step = _step(tx)
  params, state = _warm(tx)
  assert int(optax.tree.get(state, 'first_step')['conv'][0]) != dl.NOT_SELECTED
  params, state = step(params, state, _poison(_grads(), jnp.nan))
  params, state = step(params, state, _grads())
  gamma = dl.get_gamma(state)
  assert bool(jnp.isnan(gamma['conv'][0, 0, 0, 0]))
  assert bool(jnp.isnan(gamma['dense'][0, 0]))
  by_group = dl.support(state, by_group=True)
  np.testing.assert_array_equal(by_group['conv'], [False, True, True])
  assert not bool(dl.support(state)['dense'][0, 0])
  assert bool(jnp.all(dl.support(state)['dense'].ravel()[1:]))
  # w_star zeroes the NaN entries of W with the rest of the unselected.
  sparse = dl.w_star(params, state)
  assert float(sparse['conv'][0, 0, 0, 0]) == 0.0
  assert float(sparse['dense'][0, 0]) == 0.0
  summary = dl.path_summary(params, state).layers['conv']
  assert summary.groups_selected == 2
  # A record made now (or a reference epoch record) leaves the group out;
  # the running record keeps when it first entered.
  fresh = dl.update_selection(dl.init_selection(state), state)
  assert int(fresh['conv'][0]) == dl.NOT_SELECTED
  running = optax.tree.get(state, 'first_step')['conv']
  assert int(running[0]) != dl.NOT_SELECTED
  assert int(fresh['dense'][0, 0]) == dl.NOT_SELECTED
  epochs = dl.reference_prune_order(params, state, epoch=3).epoch_record
  assert float(epochs['dense'][0, 0]) == dl.REFERENCE_NEVER
