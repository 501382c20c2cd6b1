"""Order of selection: the on-device record, rankings, reference compatibility."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dessilbi_jax as dl
from dessilbi_jax import selection
from dessilbi_jax._trees import pure
from tests._golden import (
  GOLDEN,
  STEPS,
  STEPS_PER_EPOCH,
  TOOLBOX_CASES,
  golden,
  replay,
)


@pytest.mark.parametrize('case', TOOLBOX_CASES)
def test_epoch_record_and_prune_order_match_reference_golden(case, x64):
  """``update_prune_order(epoch)`` after every 5 steps, epochs 0, 1, ..."""
  del x64
  order = None
  for t in range(STEPS):
    if (t + 1) % STEPS_PER_EPOCH:
      continue
    params, state = replay(case, t)
    epoch = (t + 1) // STEPS_PER_EPOCH - 1
    order = dl.reference_prune_order(params, state, epoch, previous=order)
  want_record = golden(f'{case}/final/epoch_record')
  for layer in ('conv1', 'fc'):
    np.testing.assert_array_equal(
      order.epoch_record[layer]['kernel'], want_record[layer]['kernel']
    )
  # Per filter for the conv (4 filters), per weight (Flax (in, out)) for fc.
  want_conv = GOLDEN[f'{case}/final/prune_order/conv1.weight']
  np.testing.assert_allclose(
    order.prune_order['conv1']['kernel'], want_conv, rtol=0, atol=1e-12
  )
  want_fc = GOLDEN[f'{case}/final/prune_order/fc.weight'].T  # (in, out)
  np.testing.assert_allclose(
    order.prune_order['fc']['kernel'], want_fc, rtol=0, atol=1e-12
  )
  assert order.prune_order['conv1']['kernel'].shape == (4,)


def _problem():
  """A quadratic pull towards a target with strong, weak and zero filters."""
  target = {
    'conv': {
      'kernel': jnp.ones((2, 2, 1, 5)) * jnp.array([3.0, 0.0, 1.5, 0.6, 3.0]),
      'bias': jnp.ones(5),
    },
    'dense': {'kernel': jnp.array([[2.0, 0.0, -1.0], [0.0, 0.5, 0.0]])},
  }

  def loss(p):
    return sum(
      jnp.sum((a - b) ** 2)
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True)
    )

  return jax.tree.map(jnp.zeros_like, target), loss


def test_tracked_record_is_the_first_step_of_support():
  params, loss = _problem()
  tx = dl.track_selection(dl.dessilbi(0.05, nu=1.0))
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  first = {}
  for t in range(1, 31):
    params, state = step(params, state)
    for layer, g in optax.tree.get(state, 'gamma').items():
      nz = np.asarray(g['kernel'] != 0)
      if layer == 'conv':
        nz = nz.any(axis=(0, 1, 2))
      prev = first.get(layer, np.full(nz.shape, dl.NOT_SELECTED))
      first[layer] = np.where(nz & (prev == dl.NOT_SELECTED), t, prev)
  record = optax.tree.get(state, 'first_step')
  assert record['conv']['kernel'].dtype == jnp.int32
  for layer in ('conv', 'dense'):
    np.testing.assert_array_equal(record[layer]['kernel'], first[layer])
  assert isinstance(record['conv']['bias'], optax.MaskedNode)
  conv = np.asarray(record['conv']['kernel'])
  # The strong filters enter first, the zero filter never.
  assert conv[0] == conv[4] < conv[2] < dl.NOT_SELECTED
  assert conv[1] == dl.NOT_SELECTED
  # The rest of the toolbox finds the core through the wrapper.
  assert dl.support(state, by_group=True)['conv']['kernel'].sum() >= 3


def test_track_selection_records_the_groups_of_the_inner_rule():
  # Dense kernels grouped per input row: without penalty=, the record has
  # one entry per row (the inner state's groups), not one per weight.
  params, loss = _problem()
  rule = dl.penalty_rule(dense=dl.GroupLasso(axes=0, lam=0.1))
  tx = dl.track_selection(dl.dessilbi(0.05, nu=1.0, penalty=rule))
  state = tx.init(params)
  for _ in range(20):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    params = optax.apply_updates(params, updates)
  record = optax.tree.get(state, 'first_step')
  rows = np.asarray(record['dense']['kernel'])
  assert rows.shape == (2,)
  gamma = optax.tree.get(state, 'gamma')['dense']['kernel']
  np.testing.assert_array_equal(
    rows < dl.NOT_SELECTED, np.any(gamma != 0, axis=1)
  )
  assert (rows < dl.NOT_SELECTED).any()


def test_recording_has_no_host_callbacks_and_matches_manual_updates():
  params, loss = _problem()
  inner = dl.dessilbi(0.05, nu=1.0)
  tx = dl.track_selection(inner)
  jaxpr = jax.make_jaxpr(lambda g, s, p: tx.update(g, s, p))(
    params, tx.init(params), params
  )
  text = str(jaxpr)
  assert 'callback' not in text and 'io_' not in text

  # init_selection / update_selection by hand, once per "epoch" of 5 steps.
  state = inner.init(params)
  record = dl.init_selection(state)
  update = jax.jit(dl.update_selection)
  for epoch in range(6):
    for _ in range(5):
      updates, state = inner.update(jax.grad(loss)(params), state, params)
      params = optax.apply_updates(params, updates)
    record = update(record, state, epoch)
  conv = np.asarray(record['conv']['kernel'])
  assert conv[0] < dl.NOT_SELECTED and conv[1] == dl.NOT_SELECTED
  assert conv.max(initial=0, where=conv < dl.NOT_SELECTED) <= 5


def test_track_selection_in_a_flax_nnx_optimizer():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = dl.track_selection(dl.dessilbi(0.1, nu=0.5))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.eye(3)
  y = jnp.array([[2.0, 0.0], [0.0, 0.0], [0.0, -1.0]])

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.sum((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  for _ in range(20):
    step(model, optimizer)
  record = pure(optax.tree.get(optimizer.opt_state, 'first_step'))
  kernel = np.asarray(record['kernel'])
  assert kernel.shape == (3, 2)
  assert kernel[0, 0] < dl.NOT_SELECTED and kernel[2, 1] < dl.NOT_SELECTED
  ranks = dl.rank_groups(nnx.state(model, nnx.Param), record)
  assert sorted(np.asarray(ranks['kernel']).ravel()) == list(range(6))


def test_ranking_earliest_first_ties_by_norm():
  params = {
    'conv': {
      'kernel': jnp.ones((1, 1, 1, 4)) * jnp.array([1.0, 3.0, 2.0, 9.0])
    },
    'fc': {'kernel': jnp.array([[0.1, -5.0], [2.0, 0.3]])},
  }
  ns = dl.NOT_SELECTED
  record = {
    'conv': {'kernel': jnp.array([7, 2, 7, ns], jnp.int32)},
    'fc': {'kernel': jnp.array([[1, 1], [ns, 3]], jnp.int32)},
  }
  ranks = dl.rank_groups(params, record)
  np.testing.assert_array_equal(ranks['conv']['kernel'], [2, 0, 1, 3])
  np.testing.assert_array_equal(ranks['fc']['kernel'], [[1, 0], [3, 2]])
  # Global: all 8 groups ranked together (by step, then norm).
  g = dl.rank_groups(params, record, scope='global')
  np.testing.assert_array_equal(g['fc']['kernel'], [[1, 0], [7, 3]])
  np.testing.assert_array_equal(g['conv']['kernel'], [5, 2, 4, 6])
  with pytest.raises(ValueError, match='scope'):
    dl.rank_groups(params, record, scope='model')
  with pytest.raises(ValueError, match='conv/kernel'):
    dl.rank_groups(
      params, {**record, 'conv': {'kernel': jnp.zeros(3, jnp.int32)}}
    )


def test_ties_in_step_and_norm_go_by_position_on_every_backend():
  ns = dl.NOT_SELECTED
  params = {'conv': {'kernel': jnp.ones((1, 1, 1, 6))}}  # equal norms
  record = {'conv': {'kernel': jnp.array([3, 1, 3, 1, ns, ns], jnp.int32)}}
  ranks = dl.rank_groups(params, record)
  np.testing.assert_array_equal(ranks['conv']['kernel'], [2, 0, 3, 1, 4, 5])
  # The position is a key of the sort: XLA's sort need not be stable (on a
  # GPU it is not for several keys), so stability cannot order the ties.
  steps, norms = jnp.zeros(6, jnp.int32), jnp.ones(6)
  jaxpr = jax.make_jaxpr(selection._ranks)(steps, norms).jaxpr
  sorts = [e for e in jaxpr.eqns if e.primitive.name == 'sort']
  assert [e.params['num_keys'] for e in sorts] == [3]


def test_reference_epochs_stay_exact_beside_bfloat16_gamma():
  params = {'w': jnp.ones((1, 2), jnp.bfloat16)}
  state = dl.scale_by_dessilbi(1.0).init(params)
  state = state._replace(gamma={'w': jnp.array([[0.0, 1.0]], jnp.bfloat16)})
  order = dl.reference_prune_order(params, state, epoch=257)
  assert order.epoch_record['w'].dtype == jnp.float32
  np.testing.assert_array_equal(order.epoch_record['w'], [[2000.0, 257.0]])


def test_magnitude_record_ranks_and_prunes_by_norm():
  k = jax.random.split(jax.random.key(3), 3)
  params = {
    'conv1': {
      'kernel': jax.random.normal(k[0], (3, 3, 2, 6)),
      'bias': jnp.arange(6.0),
    },
    'bn1': {'scale': jnp.ones(6), 'bias': jnp.ones(6)},
    'fc': {'kernel': jax.random.normal(k[1], (4, 3))},
  }
  record = dl.magnitude_record(params)
  # Laid out like the record of an optimizer built with the same rule.
  tracked = dl.init_selection(dl.dessilbi(0.1).init(params))
  assert jax.tree.structure(record) == jax.tree.structure(tracked)
  pairs = zip(jax.tree.leaves(record), jax.tree.leaves(tracked), strict=True)
  for a, b in pairs:
    assert a.shape == b.shape and a.dtype == b.dtype
    assert bool(jnp.all(a == dl.NOT_SELECTED))

  norms = jnp.linalg.norm(params['conv1']['kernel'].reshape(-1, 6), axis=0)
  ranks = dl.rank_groups(params, record)
  np.testing.assert_array_equal(
    ranks['conv1']['kernel'], jnp.argsort(jnp.argsort(-norms))
  )
  np.testing.assert_array_equal(
    ranks['fc']['kernel'].ravel(),
    jnp.argsort(jnp.argsort(-jnp.abs(params['fc']['kernel'].ravel()))),
  )
  pruned, _ = dl.prune(params, record, 0.5, layers=['conv1'])
  kept = jnp.any(pruned['conv1']['kernel'] != 0, axis=(0, 1, 2))
  np.testing.assert_array_equal(kept, norms >= jnp.median(norms))
  np.testing.assert_array_equal(pruned['bn1']['scale'] != 0, kept)


class _WithDropout(nnx.Module):
  def __init__(self, *, rngs):
    self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)


def test_magnitude_record_of_a_whole_nnx_state_skips_its_rng_state():
  # nnx.state(model) is what prune and slim take; with a Dropout it holds
  # integer RNG leaves, which are no weights to rank.
  model = _WithDropout(rngs=nnx.Rngs(0))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 4))
  model.conv1.kernel[...] = kernel
  state = nnx.state(model)
  record = dl.magnitude_record(state)
  assert set(
    dl.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(pure(record))
  ) == {'conv1/kernel'}
  want = dl.magnitude_record(nnx.state(model, nnx.Param))
  np.testing.assert_array_equal(
    pure(dl.rank_groups(state, record))['conv1']['kernel'],
    pure(dl.rank_groups(nnx.state(model, nnx.Param), want))['conv1']['kernel'],
  )
  _, masks = dl.prune(state, record, 0.5)
  norms = jnp.linalg.norm(kernel.reshape(-1, 4), axis=0)
  kept = norms >= jnp.median(norms)
  np.testing.assert_array_equal(pure(masks)['bn1']['mean'], kept)


def test_magnitude_record_follows_the_penalty_rule():
  params = {'conv': {'kernel': jnp.ones((3, 3, 2, 4))}, 'fc': jnp.ones((5, 2))}
  rule = dl.penalty_rule(conv=dl.GroupLasso(axes=(2,)), dense=None)
  record = dl.magnitude_record(params, penalty=rule)
  assert record['conv']['kernel'].shape == (2,)  # one group per input channel
  assert isinstance(record['fc'], optax.MaskedNode)
  ranks = dl.rank_groups(params, record, penalty=rule)
  assert ranks['conv']['kernel'].shape == (2,)
  # Ranking it under another rule (here the default) names the fix.
  with pytest.raises(ValueError, match='pass penalty='):
    dl.rank_groups(params, record)


def test_reference_prune_order_checks_shapes_against_gamma():
  def state(width):  # Γ with filter 0 selected
    params = {'conv1': jnp.ones((3, 3, 1, width))}
    s = dl.scale_by_dessilbi(1.0).init(params)
    g = jnp.zeros((3, 3, 1, width)).at[..., 0].set(1.0)
    return params, s._replace(gamma={'conv1': g})

  params4, state4 = state(4)
  params1, state1 = state(1)
  before = dl.reference_prune_order(params4, state4, epoch=1)
  # An order kept from before the layer was slimmed.
  with pytest.raises(ValueError, match="previous: leaf 'conv1' has shape"):
    dl.reference_prune_order(params1, state1, epoch=2, previous=before)
  # Params of another width than Γ.
  with pytest.raises(ValueError, match="params: leaf 'conv1' has shape"):
    dl.reference_prune_order(params1, state4, epoch=1)
  after = dl.reference_prune_order(params1, state1, epoch=2)
  assert after.prune_order['conv1'].shape == (1,)
  # previous= is the whole ReferenceOrder, not its epoch record.
  with pytest.raises(TypeError, match='previous: expected the ReferenceOrder'):
    dl.reference_prune_order(
      params1, state1, epoch=3, previous=after.epoch_record
    )
  # A NaN epoch would stay in the record for good (the minimum keeps it).
  for bad in (float('nan'), float('inf')):
    with pytest.raises(ValueError, match='epoch must be a finite number'):
      dl.reference_prune_order(params1, state1, epoch=bad, previous=after)


def test_update_selection_refuses_a_record_lacking_a_coupled_leaf():
  params = {'a': jnp.ones((1, 1, 1, 3)), 'b': jnp.ones((2, 2))}
  state = dl.dessilbi(0.5, nu=1.0).init(params)
  record = dl.init_selection(state)
  assert set(record) == {'a', 'b'}
  # Leaf 'b' would never be recorded again.
  with pytest.raises(ValueError, match="record: has no entry for leaf 'b'"):
    dl.update_selection({'a': record['a']}, state)


def test_update_selection_refuses_steps_the_record_cannot_hold():
  params = {'w': jnp.zeros((1, 1, 1, 3))}
  state = dl.scale_by_dessilbi(0.5, nu=1.0).init(params)
  record = dl.init_selection(state)
  for bad in (2.7, float('nan'), 2**31):
    with pytest.raises(ValueError, match='step must be a whole number'):
      dl.update_selection(record, state, step=bad)
  with pytest.raises(TypeError, match='step must be a scalar'):
    dl.update_selection(record, state, step=jnp.array([1, 2]))
  # Not numbers: NumPy's isfinite used to fail on them without naming step.
  for bad in ('3', object(), 3 + 0j):
    with pytest.raises(TypeError, match='step must be a scalar step number'):
      dl.update_selection(record, state, step=bad)
  # A JAX float is not read back to check it is whole: its dtype is refused.
  with pytest.raises(TypeError, match='integer dtype'):
    dl.update_selection(record, state, step=jnp.float32(2.5))
  # A support mask is not a record (it would be read as steps 0 and 1).
  with pytest.raises(TypeError, match="record: leaf 'w' has dtype bool"):
    dl.update_selection(dl.support(state, by_group=True), state, step=1)
  # Nor is a record in integers too narrow for NOT_SELECTED, which becomes
  # -1 there: never-selected groups would rank first, as selected at -1.
  narrow = jax.tree.map(lambda r: r.astype(jnp.int16), record)
  assert int(narrow['w'][0]) == -1
  for call in (
    lambda: dl.update_selection(narrow, state, step=1),
    lambda: dl.rank_groups(params, narrow),
    lambda: dl.prune(params, narrow, 0.5),
  ):
    with pytest.raises(TypeError, match='cannot hold NOT_SELECTED'):
      call()
  # Whole numbers of any type, and traced steps, are fine.
  for good in (3, 3.0, np.int64(3), jnp.int32(3)):
    dl.update_selection(record, state, step=good)
  jax.jit(lambda s: dl.update_selection(record, state, step=s))(jnp.int32(4))


def test_reference_prune_order_takes_zero_size_leaves():
  params = {'conv': {'kernel': jnp.zeros((3, 3, 0, 4))}}
  state = dl.scale_by_dessilbi(0.5).init(params)
  order = dl.reference_prune_order(params, state, epoch=1)
  assert order.epoch_record['conv']['kernel'].shape == (3, 3, 0, 4)
  np.testing.assert_array_equal(
    order.prune_order['conv']['kernel'], -dl.REFERENCE_NEVER
  )


def _per_input_state():
  """A conv grouped per input channel, trained until Γ selects input 0
  only, with the penalties dropped from the state (as a state built by
  hand has none)."""
  target = jnp.full((1, 1, 3, 3), 0.05).at[0, 0, 0, :].set(5.0)
  params = {'conv': {'kernel': jnp.zeros((1, 1, 3, 3))}}
  rule = dl.penalty_rule(conv=dl.GroupLasso(axes=2))
  tx = dl.dessilbi(0.5, nu=1.0, penalty=rule)
  state = tx.init(params)
  for _ in range(8):
    grads = {'conv': {'kernel': 2 * (params['conv']['kernel'] - target)}}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  selected = dl.get_gamma(state)['conv']['kernel'][0, 0] != 0
  np.testing.assert_array_equal(selected.any(axis=1), [True, False, False])
  return optax.tree.set(state, penalties=None), rule


def test_update_selection_checks_the_rule_against_gamma():
  # The default rule (per filter) read this state's per-input groups as
  # three filters all selected, without a word.
  state, rule = _per_input_state()
  record = dl.init_selection(state, penalty=rule)
  with pytest.raises(ValueError, match="Γ of 'conv/kernel' is not grouped"):
    dl.update_selection(record, state, step=1)
  right = dl.update_selection(record, state, step=1, penalty=rule)
  np.testing.assert_array_equal(
    right['conv']['kernel'], [1, dl.NOT_SELECTED, dl.NOT_SELECTED]
  )
  # Under jit Γ cannot be read: a record of other groups is refused by
  # shape, and the message names penalty= as a cause.
  dense = {'fc': {'kernel': jnp.zeros((4, 3))}}
  rule = dl.penalty_rule(dense=dl.GroupLasso(axes=-1))
  state = optax.tree.set(
    dl.dessilbi(0.1, penalty=rule).init(dense), penalties=None
  )
  record = dl.init_selection(state, penalty=rule)
  with pytest.raises(ValueError, match="pass the optimizer's rule as penalty="):
    jax.jit(dl.update_selection)(record, state)


def test_float16_filters_are_ranked_by_their_norm():
  # A float16 sum of squares passes 65504: every norm was inf, and the tie
  # break by position ranked the filters.
  kernel = jnp.ones((3, 3, 64, 3), jnp.float16) * jnp.array(
    [20.0, 30.0, 40.0], jnp.float16
  )
  params = {'conv': {'kernel': kernel}}
  ranks = dl.rank_groups(params, dl.magnitude_record(params))
  np.testing.assert_array_equal(ranks['conv']['kernel'], [2, 1, 0])
  state = dl.dessilbi(0.1).init(params)
  order = dl.reference_prune_order(params, state, epoch=1)
  assert np.isfinite(order.prune_order['conv']['kernel']).all()


@pytest.mark.parametrize('epoch', [jnp.array([1, 2, 3]), [1, 2], 'x', True])
def test_reference_prune_order_refuses_an_epoch_that_is_no_number(epoch):
  params = {'conv': {'kernel': jnp.ones((1, 1, 2, 3))}}
  state = dl.dessilbi(0.1).init(params)
  with pytest.raises(TypeError, match='epoch must be a scalar epoch number'):
    dl.reference_prune_order(params, state, epoch=epoch)
