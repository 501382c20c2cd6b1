"""DessiLBI as a citizen of Optax: chains, wrappers, schedules, dtypes, jit."""

import dataclasses
import warnings
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl


def _problem(seed=0, dtype=jnp.float32):
  """A conv-, dense- and bias-shaped regression with a sparse target."""
  keys = jax.random.split(jax.random.key(seed), 4)
  target = {
    'conv': {'kernel': jnp.zeros((3, 3, 2, 4)).at[..., :2].set(1.0)},
    'dense': {
      'kernel': jnp.zeros((4, 3)).at[0, 0].set(2.0).at[3, 2].set(-1.5),
      'bias': jnp.array([0.5, -0.5, 0.0]),
    },
  }
  params = jax.tree.map(
    lambda t, k: (0.01 * jax.random.normal(k, t.shape)).astype(dtype),
    target,
    dict(
      zip(
        ['conv', 'dense'],
        [{'kernel': keys[0]}, {'kernel': keys[1], 'bias': keys[2]}],
        strict=True,
      )
    ),
  )

  def loss(p):
    return sum(
      jnp.sum((a.astype(jnp.float32) - b) ** 2)
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True)
    )

  return params, loss


def _run(tx, params, loss, steps, **update_kwargs):
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    updates, state = tx.update(grads, state, params, **update_kwargs)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _assert_trees_close(a, b, **kw):
  chex.assert_trees_all_equal_structs(a, b)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kw), a, b)


def test_state_layout_and_tree_get():
  params, _ = _problem()
  state = dl.dessilbi(0.1).init(params)
  core = state[-1]
  assert isinstance(core, dl.DessiLBIState)
  gamma = optax.tree.get(state, 'gamma')
  z = optax.tree.get(state, 'z')
  assert gamma['conv']['kernel'].shape == (3, 3, 2, 4)
  assert gamma['dense']['kernel'].shape == (4, 3)
  # Uncoupled leaves hold nothing.
  assert isinstance(z['dense']['bias'], optax.MaskedNode)
  assert isinstance(gamma['dense']['bias'], optax.MaskedNode)
  assert len(jax.tree.leaves(core)) == 1 + 2 * 2


def test_state_records_its_penalties_as_static_data():
  params, loss = _problem()
  rule = dl.penalty_rule(dense=dl.GroupLasso(axes=0, lam=0.5))
  tx = dl.dessilbi(0.1, penalty=rule)
  state = tx.init(params)
  table = state[-1].penalties
  assert table == dl.PenaltyTable(
    (
      # Axes resolved for the leaf: -1 of a rank-4 kernel is 3.
      (('conv', 'kernel'), dl.GroupLasso(axes=3)),
      (('dense', 'kernel'), dl.GroupLasso(axes=0, lam=0.5)),
    ),
    ranks=(4, 2),
  )
  # No leaves: the state holds the same arrays as without the record.
  bare = optax.tree.set(state, penalties=None)
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(bare))
  assert jax.tree.structure(state) != jax.tree.structure(bare)
  # The same rule built again gives an equal state structure (by value).
  again = dl.dessilbi(
    0.1, penalty=dl.penalty_rule(dense=dl.GroupLasso(axes=0, lam=0.5))
  )
  assert jax.tree.structure(again.init(params)) == jax.tree.structure(state)
  # Kept along the path, under jit and in a lax.scan carry.
  _, stepped = _run(tx, params, loss, 3)
  assert jax.tree.structure(stepped) == jax.tree.structure(state)

  def body(carry, _):
    p, st = carry
    updates, st = tx.update(jax.grad(loss)(p), st, p)
    return (optax.apply_updates(p, updates), st), None

  (_, scanned), _ = jax.lax.scan(body, (params, state), length=3)
  assert scanned[-1].penalties == table
  # Its groups are the rule's: a table called as a rule gives them.
  key = (jax.tree_util.DictKey('dense'), jax.tree_util.DictKey('kernel'))
  assert table(key, None) == dl.GroupLasso(axes=0, lam=0.5)
  assert table((jax.tree_util.DictKey('bias'),), None) is None


def test_penalties_are_compared_as_groups_not_as_spelling():
  params, loss = _problem()
  state = dl.dessilbi(0.1).init(params)  # conv: GroupLasso(axes=(-1,))
  same = dl.penalty_rule(conv=dl.GroupLasso(axes=3))
  assert dl.get_penalty(dl.dessilbi(0.1, penalty=same).init(params)) == (
    dl.get_penalty(state)
  )
  _, stepped = dl.dessilbi(0.1, penalty=same).update(
    jax.grad(loss)(params), state, params
  )
  dl.support(stepped, by_group=True, penalty=same)
  # Empty params record no penalties, as a table.
  assert dl.get_penalty(dl.dessilbi(0.1).init({})) == dl.PenaltyTable(())
  # A table where a schedule is expected says how to pass it.
  with pytest.raises(TypeError, match='static_args'):
    optax.inject_hyperparams(dl.dessilbi)(
      learning_rate=0.1, penalty=dl.get_penalty(state)
    ).init(params)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Values:
  """A node whose fields are named as an NNX variable's."""

  value: jax.Array
  raw_value: jax.Array


def test_leaves_of_one_name_are_refused_by_the_toolbox_not_by_update():
  # .value and .raw_value attributes both read as their parent's name.
  params = {'attn': _Values(jnp.ones((2, 2)), jnp.ones((3, 3)))}
  rule = lambda p, x: dl.GroupLasso(axes=0) if x.shape == (3, 3) else dl.Lasso()  # noqa: E731
  tx = dl.scale_by_dessilbi(0.1, penalty=rule)
  state = tx.init(params)
  _, state = tx.update(params, state, params)
  with pytest.raises(
    ValueError, match="two coupled leaves have the name 'attn'"
  ):
    dl.support(state, by_group=True)
  other = dl.scale_by_dessilbi(0.1, penalty=lambda p, x: dl.Lasso())
  with pytest.raises(ValueError, match=r'records .attn.: GroupLasso'):
    other.update(params, state, params)


def test_names_keep_value_keys_and_split_keys_at_slashes():
  # Only an attribute .value (an NNX variable's) is dropped from a name; a
  # dict key 'value' is a name of its own. A key holding '/' is named as
  # the nested keys it reads as.
  keys = jax.random.split(jax.random.key(0), 3)
  params = {
    'attn': {'value': jax.random.normal(keys[0], (4, 3))},
    'value': jax.random.normal(keys[1], (4, 3)),
    'enc/conv1': {'kernel': jax.random.normal(keys[2], (3, 3, 2, 4))},
  }
  tx = dl.dessilbi(0.1)
  state = tx.init(params)
  names = [dl.path_str(n) for n, _ in dl.get_penalty(state).entries]
  assert sorted(names) == ['attn/value', 'enc/conv1/kernel', 'value']
  # Each can be named on its own.
  for layer, leaf in (
    ('attn/value', ('attn', 'value')),
    ('value', ('value',)),
    ('enc/conv1', ('enc/conv1', 'kernel')),
  ):
    record = dl.magnitude_record(params)
    _, mask = dl.prune(params, record, 0.5, layers=[layer])
    cut = {
      dl.path_str(path)
      for path, m in jax.tree_util.tree_leaves_with_path(mask)
      if not bool(jnp.all(m))
    }
    assert cut == {'/'.join(leaf)}, layer
  # The same name twice (a nested and a slashed key): the toolbox refuses.
  twice = {'enc': {'conv1': {'kernel': jnp.ones((3, 3, 2, 4))}}, **params}
  with pytest.raises(ValueError, match='two coupled leaves have the name'):
    dl.support(dl.dessilbi(0.1).init(twice), by_group=True)


@pytest.mark.parametrize(
  'built, other',
  [
    # Γ is stored params-shaped under both: the layouts agree.
    (dl.penalty_rule(dense=dl.GroupLasso()), dl.penalty_rule()),
    (dl.penalty_rule(), dl.penalty_rule(conv=dl.GroupLasso(lam=2.0))),
  ],
  ids=['group_lasso_then_lasso', 'another_lambda'],
)
def test_update_refuses_a_state_recorded_under_other_penalties(built, other):
  params, loss = _problem()
  state = dl.dessilbi(0.1, penalty=built).init(params)
  tx = dl.dessilbi(0.1, penalty=other)
  grads = jax.grad(loss)(params)
  with pytest.raises(ValueError, match=r'state: .*records .*the rule gives'):
    tx.update(grads, state, params)
  # Giving the state the new optimizer's penalties is how a run changes
  # them on purpose; the state then records those.
  changed = optax.tree.set(state, penalties=dl.get_penalty(tx.init(params)))
  _, new = tx.update(grads, changed, params)
  assert dl.get_penalty(new) == dl.get_penalty(tx.init(params))
  assert int(optax.tree.get(new, 'count')) == 1
  # A state without penalties is stepped too, and keeps none.
  _, new = tx.update(grads, optax.tree.set(state, penalties=None), params)
  assert new[-1].penalties is None


def test_a_table_without_ranks_is_checked_on_its_entries_alone():
  params, loss = _problem()
  tx = dl.dessilbi(0.1)
  state = tx.init(params)
  grads = jax.grad(loss)(params)
  recorded = dl.get_penalty(state)
  by_hand = optax.tree.set(
    state, penalties=dl.PenaltyTable(recorded.entries)
  )  # ranks=(): not checked
  want, _ = tx.update(grads, state, params)
  got, _ = tx.update(grads, by_hand, params)
  _assert_trees_close(got, want, rtol=0)


def test_a_state_built_for_stacked_params_names_the_leaf_of_another_rank():
  # The penalties resolve the same at both ranks (a lasso), so only the
  # ranks tell a state made for a stacked ensemble from a member's.
  rule = lambda path, x: dl.Lasso() if x.ndim >= 2 else None  # noqa: E731
  stacked = {'w': jnp.ones((3, 4, 2))}
  tx = dl.scale_by_dessilbi(0.1, penalty=rule)
  state = tx.init(stacked)
  member = {'w': stacked['w'][0]}
  state0 = state._replace(
    z=jax.tree.map(lambda x: x[0], state.z),
    gamma=jax.tree.map(lambda x: x[0], state.gamma),
  )
  with pytest.raises(
    ValueError,
    match=r"leaf 'w' of rank 3, and the params give it rank 2.*"
    r'under jax\.vmap too',
  ):
    tx.update(member, state0, member)
  # Initialised under jax.vmap, each member steps under jax.vmap.
  states = jax.vmap(tx.init)(stacked)
  updates, _ = jax.vmap(tx.update)(stacked, states, stacked)
  np.testing.assert_allclose(updates['w'], -0.1 * (1 + 1 / 100), rtol=1e-6)


def test_tree_map_params_takes_a_weight_decay_mask_tree():
  params, loss = _problem()
  mask = {'conv': {'kernel': True}, 'dense': {'kernel': True, 'bias': False}}
  tx = dl.dessilbi(0.05, nu=1.0, weight_decay=1e-3, weight_decay_mask=mask)
  _, state = _run(tx, params, loss, 3)
  mapped = optax.tree.map_params(tx, lambda x: x + 1, state)
  for key in ('z', 'gamma', 'trace'):
    before, after = optax.tree.get(state, key), optax.tree.get(mapped, key)
    _assert_trees_close(after, jax.tree.map(lambda x: x + 1, before), rtol=1e-6)
  # The mask is still checked against real params.
  with pytest.raises(ValueError, match='weight_decay_mask'):
    dl.dessilbi(0.05, weight_decay=1e-3, weight_decay_mask={'conv': True}).init(
      params
    )


def test_numpy_float64_params_step_as_float32_without_warnings():
  # Without x64, JAX reads float64 NumPy arrays as float32, as optax does.
  params = {
    'conv': np.ones((3, 3, 2, 4)),
    'dense': {'kernel': np.ones((4, 3)), 'bias': np.ones(3)},
  }
  tx = dl.dessilbi(0.1)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    state = tx.init(params)
    updates, state = tx.update(params, state, params)
  assert {x.dtype for x in jax.tree.leaves(updates)} == {jnp.dtype('float32')}


def test_update_matches_the_formula():
  params, loss = _problem()
  grads = jax.grad(loss)(params)
  lr, kappa, nu = 0.05, 2.0, 3.0
  tx = dl.scale_by_dessilbi(lr, kappa=kappa, nu=nu)
  state = tx.init(params)
  # Put non-zero z and Γ in the state so the coupling term matters.
  z = jax.tree.map(lambda x: x + 1.5, state.z)
  gamma = jax.tree.map(lambda x: x + 0.3, state.gamma)
  state = state._replace(z=z, gamma=gamma)
  updates, new = tx.update(grads, state, params)
  w, g, d = (
    params['dense']['kernel'],
    gamma['dense']['kernel'],
    grads['dense']['kernel'],
  )
  np.testing.assert_allclose(
    updates['dense']['kernel'], -kappa * lr * (d + (w - g) / nu), rtol=1e-6
  )
  z_next = z['dense']['kernel'] + lr / nu * (w - g)
  np.testing.assert_allclose(new.z['dense']['kernel'], z_next, rtol=1e-6)
  np.testing.assert_allclose(
    new.gamma['dense']['kernel'],
    kappa * dl.soft_threshold(z_next, 1.0),
    rtol=1e-6,
  )
  np.testing.assert_allclose(
    updates['dense']['bias'], -kappa * lr * grads['dense']['bias'], rtol=1e-6
  )
  assert int(new.count) == 1


def test_chain_after_clipping_equals_clipped_gradients():
  params, loss = _problem()
  grads = jax.grad(loss)(params)
  clip = optax.clip_by_global_norm(0.1)
  tx = optax.chain(clip, dl.dessilbi(0.1, nu=1.0))
  updates, _ = tx.update(grads, tx.init(params), params)
  clipped, _ = clip.update(grads, clip.init(params))
  assert optax.tree.norm(clipped) < optax.tree.norm(grads)
  plain = dl.dessilbi(0.1, nu=1.0)
  want, _ = plain.update(clipped, plain.init(params), params)
  _assert_trees_close(updates, want, rtol=1e-6)


def test_partition_keeps_dessilbi_to_its_part():
  params, loss = _problem()
  labels = {
    'conv': {'kernel': 'sparse'},
    'dense': {'kernel': 'plain', 'bias': 'plain'},
  }
  tx = optax.partition(
    {'sparse': dl.dessilbi(0.05, nu=1.0), 'plain': optax.sgd(0.05)}, labels
  )
  out, state = _run(tx, params, loss, 30)
  gamma = optax.tree.get(state, 'gamma')
  assert jax.tree.leaves(gamma)[0].shape == (3, 3, 2, 4)
  assert len(jax.tree.leaves(gamma)) == 1
  # Each part follows its own optimizer exactly.
  sparse_only, _ = _run(dl.dessilbi(0.05, nu=1.0), params, loss, 30)
  sgd_only, _ = _run(optax.sgd(0.05), params, loss, 30)
  np.testing.assert_allclose(
    out['conv']['kernel'], sparse_only['conv']['kernel'], rtol=1e-5, atol=1e-7
  )
  _assert_trees_close(out['dense'], sgd_only['dense'], rtol=1e-5, atol=1e-7)


def test_inject_hyperparams_gives_the_same_trajectory():
  params, loss = _problem()
  kw = dict(
    learning_rate=0.05, kappa=2.0, nu=4.0, momentum=0.8, weight_decay=1e-3
  )
  plain, plain_state = _run(dl.dessilbi(**kw), params, loss, 25)
  injected = optax.inject_hyperparams(dl.dessilbi)(**kw)
  inj, inj_state = _run(injected, params, loss, 25)
  _assert_trees_close(inj, plain, rtol=1e-5, atol=1e-7)
  _assert_trees_close(inj_state.inner_state, plain_state, rtol=1e-5, atol=1e-7)
  # Hyper-parameters can be changed in the state between steps.
  inj_state.hyperparams['learning_rate'] = jnp.zeros([])
  grads = jax.grad(loss)(inj)
  updates, _ = injected.update(grads, inj_state, inj)
  assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))


def test_inject_hyperparams_with_a_custom_rule_as_static_arg():
  params, loss = _problem()
  rule = dl.penalty_rule(dense=None)
  injected = optax.inject_hyperparams(dl.dessilbi, static_args=('penalty',))(
    0.05, penalty=rule
  )
  _, state = _run(injected, params, loss, 3)
  gamma = optax.tree.get(state, 'gamma')
  assert isinstance(gamma['dense']['kernel'], optax.MaskedNode)


def test_learning_rate_schedule_is_evaluated_per_step():
  params, loss = _problem()
  schedule = optax.piecewise_constant_schedule(0.05, {10: 0.0})
  tx = dl.dessilbi(schedule, nu=1.0, momentum=None)
  p10, s10 = _run(tx, params, loss, 10)
  p20, s20 = _run(tx, params, loss, 20)
  # The first 10 steps move; after step 10 the rate is 0 and nothing moves.
  assert not np.allclose(p10['conv']['kernel'], params['conv']['kernel'])
  _assert_trees_close(p20, p10, rtol=0, atol=0)
  _assert_trees_close(
    optax.tree.get(s20, 'z'), optax.tree.get(s10, 'z'), rtol=0, atol=0
  )
  # A constant schedule equals the float.
  const, _ = _run(
    dl.dessilbi(optax.constant_schedule(0.05), nu=1.0), params, loss, 5
  )
  flt, _ = _run(dl.dessilbi(0.05, nu=1.0), params, loss, 5)
  _assert_trees_close(const, flt, rtol=1e-6)


def test_second_jitted_call_does_not_retrace():
  params, loss = _problem()
  tx = dl.dessilbi(0.05, nu=1.0)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(3):
    params, state = step(params, state)


def test_extra_keyword_arguments_are_accepted():
  params, loss = _problem()
  tx = dl.dessilbi(0.05)
  grads = jax.grad(loss)(params)
  state = tx.init(params)
  with_extra, _ = tx.update(
    grads, state, params, value=jnp.ones([]), anything=1
  )
  without, _ = tx.update(grads, state, params)
  _assert_trees_close(with_extra, without, rtol=0, atol=0)


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize('state_dtype', [None, jnp.float32])
def test_params_dtype_is_kept_and_state_is_cond_stable(dtype, state_dtype):
  params, loss = _problem(dtype=dtype)
  tx = dl.dessilbi(
    optax.linear_schedule(0.1, 0.01, 10), nu=2.0, state_dtype=state_dtype
  )
  state = tx.init(params)
  want_state = dtype if state_dtype is None else state_dtype
  assert optax.tree.get(state, 'z')['conv']['kernel'].dtype == want_state
  assert optax.tree.get(state, 'trace')['dense']['bias'].dtype == want_state

  @jax.jit
  def step(params, state):
    grads = jax.grad(loss)(params)
    pred = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
    updates, new_state = jax.lax.cond(
      pred,
      lambda: tx.update(grads, state, params),
      lambda: (jax.tree.map(jnp.zeros_like, params), state),
    )
    return optax.apply_updates(params, updates), new_state, updates

  for _ in range(3):
    params, state, updates = step(params, state)
  for tree in (params, updates):
    assert {x.dtype for x in jax.tree.leaves(tree)} == {jnp.dtype(dtype)}


def _map_ranks(tx, state, params, other):
  """map_params with each leaf's rank beside the state (as sharding specs
  would be), None at uncoupled leaves, and ``other`` for what is not
  params-shaped."""
  return optax.tree.map_params(
    tx,
    lambda x, s: None if isinstance(x, optax.MaskedNode) else s,
    state,
    jax.tree.map(lambda x: x.ndim, params),
    transform_non_params=lambda _: other,
    is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )


def test_tree_map_params_reaches_z_gamma_and_momentum():
  params, loss = _problem()
  # An override that matches: no warning about its spelling from the
  # placeholder params map_params initialises with.
  tx = dl.dessilbi(
    0.05,
    nu=1.0,
    penalty=dl.penalty_rule(overrides={'dense/kernel': dl.Lasso()}),
  )
  _, state = _run(tx, params, loss, 3)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    mapped = optax.tree.map_params(tx, lambda x: x + 1, state)
  for key in ('z', 'gamma', 'trace'):
    before, after = optax.tree.get(state, key), optax.tree.get(mapped, key)
    _assert_trees_close(after, jax.tree.map(lambda x: x + 1, before), rtol=1e-6)
  assert int(optax.tree.get(mapped, 'count')) == int(
    optax.tree.get(state, 'count')
  )
  # With a tree per leaf beside the state (e.g. sharding specs), and a value
  # for everything that is not params-shaped.
  mapped = _map_ranks(tx, state, params, -1)
  assert mapped[-1].z == {
    'conv': {'kernel': 4},
    'dense': {'bias': None, 'kernel': 2},
  }
  assert mapped[-1].count == -1


def test_tree_map_params_leaves_the_selection_record_alone():
  # track_selection's record has one entry per filter, not the params'
  # shapes: map_params hands it to transform_non_params, not to the params'
  # function (a cast meant for the float state would break the int32 record,
  # a params-shaped sharding would not fit it).
  params, loss = _problem()
  tx = dl.track_selection(dl.dessilbi(0.05, nu=1.0))
  _, state = _run(tx, params, loss, 3)
  record = optax.tree.get(state, 'first_step')
  assert record['conv']['kernel'].shape != params['conv']['kernel'].shape
  cast = optax.tree.map_params(tx, lambda x: x.astype(jnp.bfloat16), state)
  assert optax.tree.get(cast, 'gamma')['conv']['kernel'].dtype == jnp.bfloat16
  jax.tree.map(
    np.testing.assert_array_equal, optax.tree.get(cast, 'first_step'), record
  )
  mapped = _map_ranks(tx, state, params, 'other')
  assert optax.tree.get(mapped, 'z')['conv']['kernel'] == 4
  assert mapped.first_step == 'other'
  tx.update(jax.grad(loss)(params), cast, params)  # still a valid record


def test_multisteps_accumulates_then_applies_the_mean_gradient():
  params, loss = _problem()
  tx = optax.MultiSteps(dl.dessilbi(0.05, nu=1.0), every_k_schedule=3)
  state = tx.init(params)
  grads = [jax.grad(lambda p, i=i: loss(p) * (1 + i))(params) for i in range(3)]
  for g in grads[:2]:
    updates, state = tx.update(g, state, params)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
  updates, state = tx.update(grads[2], state, params)
  mean = jax.tree.map(lambda *g: sum(g) / 3, *grads)
  plain = dl.dessilbi(0.05, nu=1.0)
  want, _ = plain.update(mean, plain.init(params), params)
  _assert_trees_close(updates, want, rtol=1e-5, atol=1e-8)


def test_adam_driven_variant_trains_and_selects():
  params, loss = _problem()
  tx = optax.chain(optax.scale_by_adam(), dl.scale_by_dessilbi(0.01, nu=1.0))
  out, state = _run(tx, params, loss, 600)
  assert loss(out) < 0.01 * loss(params)
  gamma = optax.tree.get(state, 'gamma')
  # Γ found the target's support: conv filters 0 and 1, two dense weights.
  filters = np.asarray(jnp.any(gamma['conv']['kernel'] != 0, axis=(0, 1, 2)))
  np.testing.assert_array_equal(filters, [True, True, False, False])
  np.testing.assert_array_equal(
    np.argwhere(np.asarray(gamma['dense']['kernel']) != 0), [[0, 0], [3, 2]]
  )


def test_freeze_stops_selected_filters_only():
  params, loss = _problem()
  tx = dl.dessilbi(0.05, nu=1.0)
  params, state = _run(tx, params, loss, 40)
  gamma = optax.tree.get(state, 'gamma')
  selected = np.asarray(jnp.any(gamma['conv']['kernel'] != 0, axis=(0, 1, 2)))
  assert selected.any() and not selected.all()

  frozen = dl.dessilbi(0.05, nu=1.0, freeze=True)
  grads = jax.tree.map(lambda g: g + 1.0, jax.grad(loss)(params))  # all move
  updates, new_state = frozen.update(grads, state, params)
  conv_moved = np.asarray(
    jnp.any(updates['conv']['kernel'] != 0, axis=(0, 1, 2))
  )
  np.testing.assert_array_equal(conv_moved, ~selected)
  z_before = optax.tree.get(state, 'z')['conv']['kernel']
  z_after = optax.tree.get(new_state, 'z')['conv']['kernel']
  z_moved = np.asarray(jnp.any(z_after != z_before, axis=(0, 1, 2)))
  np.testing.assert_array_equal(z_moved, ~selected)
  # Elementwise and uncoupled leaves are not frozen.
  assert bool(jnp.all(updates['dense']['kernel'] != 0))
  assert bool(jnp.all(updates['dense']['bias'] != 0))


@pytest.mark.parametrize('store_gamma', [True, False])
def test_freeze_lets_a_selected_filter_whose_weights_are_zero_move(
  store_gamma,
):
  # The reference freezes the filters of W* = W · 1[Γ ≠ 0] (its
  # calculate_mask: ‖W*_g‖ ≠ 0): a selected filter whose W is zero on Γ's
  # support (pruned, say) moves on.
  kernel = jnp.zeros((1, 1, 2, 3)).at[0, 0, :, 1].set(0.3)
  kernel = kernel.at[0, 0, 1, 2].set(0.3)  # W of filter 2 off Γ's support
  z = jnp.zeros_like(kernel).at[0, 0, :, :2].set(5.0).at[0, 0, 0, 2].set(5.0)
  params = {'k': kernel}
  kw = dict(learning_rate=0.1, nu=1.0, store_gamma=store_gamma)
  # One unfrozen step with W = z and no gradient: z -> 1.1 z, Γ = Prox(z).
  core = dl.scale_by_dessilbi(**kw)
  zero = {'k': jnp.zeros_like(kernel)}
  state = core.update(zero, core.init(params)._replace(z={'k': z}), {'k': z})
  state = state[1]
  gamma = np.asarray(dl.get_gamma(state)['k'] != 0)[0, 0]
  np.testing.assert_array_equal(gamma, [[1, 1, 1], [1, 1, 0]])
  frozen = dl.scale_by_dessilbi(**kw, freeze=True)
  updates, new_state = frozen.update(
    {'k': jnp.ones_like(kernel)}, state, params
  )
  moved = np.asarray(jnp.any(updates['k'] != 0, axis=(0, 1, 2)))
  z_moved = np.asarray(
    jnp.any(new_state.z['k'] != state.z['k'], axis=(0, 1, 2))
  )
  # Filter 0: selected, W zero; filter 1: in W*; filter 2: selected, W zero
  # where Γ is not.
  np.testing.assert_array_equal(moved, [True, False, True])
  np.testing.assert_array_equal(z_moved, [True, False, True])


@pytest.mark.parametrize('freeze', [False, True])
def test_store_gamma_false_gives_the_same_path_with_less_memory(freeze):
  params, loss = _problem()
  kw = dict(learning_rate=0.05, kappa=2.0, nu=1.0, freeze=freeze)
  stored, stored_state = _run(dl.dessilbi(**kw), params, loss, 40)
  compact, compact_state = _run(
    dl.dessilbi(**kw, store_gamma=False), params, loss, 40
  )
  # The same path up to float rounding (XLA may contract z * scale into the
  # W update instead of rounding Γ first), and the same support.
  tol = dict(rtol=1e-5, atol=1e-7)
  _assert_trees_close(compact, stored, **tol)
  _assert_trees_close(
    optax.tree.get(compact_state, 'z'), optax.tree.get(stored_state, 'z'), **tol
  )
  gamma = dl.get_gamma(compact_state)
  _assert_trees_close(gamma, dl.get_gamma(stored_state), **tol)
  _assert_trees_close(
    dl.support(compact_state), dl.support(stored_state), rtol=0, atol=0
  )
  assert any(bool(jnp.any(g != 0)) for g in jax.tree.leaves(gamma))
  # The conv's Γ is not stored: one scale per filter instead; the lasso
  # leaf keeps its Γ.
  core = compact_state[-1]
  assert core.gamma['conv']['kernel'].shape == (1, 1, 1, 4)
  assert core.gamma['dense']['kernel'].shape == (4, 3)

  def nbytes(tree):
    return sum(x.nbytes for x in jax.tree.leaves(tree))

  saved = params['conv']['kernel'].nbytes - 4 * 4
  assert nbytes(stored_state) - nbytes(compact_state) == saved
  # The toolbox reads either storage.
  _assert_trees_close(
    dl.w_star(compact, compact_state),
    dl.w_star(stored, stored_state),
    **tol,
  )


def test_injected_float16_hyperparams_keep_a_float32_z_moving():
  # inject_hyperparams stores lr and ν in the params' dtype (float16); z's
  # step α/ν = 2e-8 is below float16's smallest subnormal and must be taken
  # in z's float32.
  params = {'w': jnp.full((4, 4), 0.5, jnp.float16)}
  grads = {'w': jnp.zeros((4, 4), jnp.float16)}
  kw = dict(learning_rate=1e-4, nu=5000.0, momentum=None)
  kw['state_dtype'] = jnp.float32
  plain = dl.dessilbi(**kw)
  injected = optax.inject_hyperparams(
    dl.dessilbi, static_args=('state_dtype',)
  )(**kw)
  a, b = plain.init(params), injected.init(params)
  for _ in range(3):
    _, a = plain.update(grads, a, params)
    _, b = jax.jit(injected.update)(grads, b, params)
  za, zb = optax.tree.get(a, 'z')['w'], optax.tree.get(b, 'z')['w']
  assert zb.dtype == jnp.float32
  # Equal up to the float16 rounding of the injected learning rate itself.
  np.testing.assert_allclose(zb, za, rtol=2e-3)
  np.testing.assert_allclose(za, 3 * 1e-4 / 5000 * 0.5, rtol=1e-5)


def test_a_field_named_value_keeps_its_name_for_the_rule():
  # Only the `.value` of a Flax NNX variable is dropped from a path; a
  # NamedTuple field called `value` is a name the rule must see.
  class Attn(NamedTuple):
    query: jax.Array
    key: jax.Array
    value: jax.Array

  params = {'attn': Attn(*(jnp.ones((4, 4)) for _ in range(3)))}
  seen = []

  def rule(path, leaf):
    seen.append(dl.path_str(path))
    return dl.Lasso()

  dl.scale_by_dessilbi(0.1, penalty=rule).init(params)
  assert seen == ['attn/query', 'attn/key', 'attn/value']
  tx = dl.dessilbi(0.1, penalty=dl.penalty_rule(overrides={'attn/value': None}))
  gamma = dl.get_gamma(tx.init(params))
  assert isinstance(gamma['attn'].value, optax.MaskedNode)
  assert gamma['attn'].query.shape == (4, 4)
  # An NNX variable's `.value` is still dropped.
  from flax import nnx

  model = nnx.Linear(2, 3, rngs=nnx.Rngs(0))
  seen.clear()
  dl.scale_by_dessilbi(0.1, penalty=rule).init(nnx.state(model, nnx.Param))
  assert sorted(seen) == ['bias', 'kernel']
