"""The path at one point: support, W*, residue and the sparsity summary."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dessilbi_jax as dl
from dessilbi_jax._trees import pure
from tests._golden import GOLDEN, STEPS, TOOLBOX_CASES, golden, replay


def _trained(steps=40, seed=0, penalty=None):
  """A conv + dense + bias problem trained until Γ is partly selected."""
  keys = jax.random.split(jax.random.key(seed), 3)
  target = {
    'conv': {
      'kernel': jax.random.normal(keys[0], (3, 3, 2, 6))
      * jnp.array([3.0, 0.0, -2.0, 0.1, 0.0, 1.5]),
      'bias': jnp.ones(6),
    },
    'dense': {
      'kernel': jax.random.normal(keys[1], (6, 4))
      * (jax.random.uniform(keys[2], (6, 4)) > 0.6)
      * 3
    },
  }
  params = jax.tree.map(jnp.zeros_like, target)
  tx = dl.dessilbi(0.05, nu=1.0, penalty=penalty)
  state = tx.init(params)

  @jax.jit
  def step(params, state):
    grads = jax.grad(
      lambda p: sum(
        jnp.sum((a - b) ** 2)
        for a, b in zip(
          jax.tree.leaves(p), jax.tree.leaves(target), strict=True
        )
      )
    )(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def test_support_per_weight_and_per_group():
  _, state = _trained()
  gamma = optax.tree.get(state, 'gamma')
  per_weight = dl.support(state)
  np.testing.assert_array_equal(
    per_weight['conv']['kernel'], gamma['conv']['kernel'] != 0
  )
  assert isinstance(per_weight['conv']['bias'], optax.MaskedNode)
  per_group = dl.support(state, by_group=True)
  filters = per_group['conv']['kernel']
  assert filters.shape == (6,) and filters.dtype == bool
  np.testing.assert_array_equal(
    filters, np.any(gamma['conv']['kernel'] != 0, axis=(0, 1, 2))
  )
  assert 0 < filters.sum() < 6
  # Lasso leaves: every weight is its own group.
  np.testing.assert_array_equal(
    per_group['dense']['kernel'], gamma['dense']['kernel'] != 0
  )
  # A custom rule defines other groups (one per input row of the dense
  # kernel); the state records them.
  _, state = _trained(penalty=dl.penalty_rule(dense=dl.GroupLasso(axes=0)))
  rows = dl.support(state, by_group=True)['dense']['kernel']
  assert rows.shape == (6,)
  # The summary names a Dense kernel's output groups neurons and leaves
  # other groups (its input rows, a conv's weights) unnamed.
  layers = dl.path_summary(
    *_trained(
      steps=1,
      penalty=dl.penalty_rule(conv=dl.Lasso(), dense=dl.GroupLasso(axes=0)),
    )
  ).layers
  assert [v.group_kind for v in layers.values()] == ['', '']
  layers = dl.path_summary(
    *_trained(steps=1, penalty=dl.penalty_rule(dense=dl.GroupLasso(axes=-1)))
  ).layers
  assert [v.group_kind for v in layers.values()] == ['filters', 'neurons']


def test_the_toolbox_takes_the_groups_the_state_records():
  # Trained with a lasso on the conv (single weights, not filters) and with
  # the dense kernel's rows as groups: without penalty=, every function of
  # the toolbox uses those groups, as if given the optimizer's rule.
  rule = dl.penalty_rule(conv=dl.Lasso(), dense=dl.GroupLasso(axes=0))
  params, state = _trained(penalty=rule)
  assert dl.get_penalty(state) == dl.PenaltyTable(
    (
      (('conv', 'kernel'), dl.Lasso()),
      (('dense', 'kernel'), dl.GroupLasso(axes=0)),
    ),
    ranks=(4, 2),
  )
  calls = {
    'support': lambda **kw: dl.support(state, by_group=True, **kw),
    'path_summary': lambda **kw: dl.path_summary(params, state, **kw).layers,
    'w_star': lambda **kw: dl.w_star(params, state, channels=True, **kw),
    'init_selection': lambda **kw: dl.init_selection(state, **kw),
    'update_selection': lambda **kw: dl.update_selection(
      dl.init_selection(state, penalty=rule), state, **kw
    ),
    'reference_prune_order': lambda **kw: dl.reference_prune_order(
      params, state, 0, **kw
    ),
  }
  for name, call in calls.items():
    mine, given = call(), call(penalty=rule)
    assert jax.tree.structure(mine) == jax.tree.structure(given), name
    jax.tree.map(np.testing.assert_array_equal, mine, given)
  assert dl.support(state, by_group=True)['dense']['kernel'].shape == (6,)
  # Another rule is refused, by name, whatever Γ holds.
  for call in calls.values():
    with pytest.raises(ValueError, match=r'records Lasso.*penalty out'):
      call(penalty=dl.default_penalty)
  # Functions that see params and a record, not a state, take the recorded
  # penalties as a rule.
  record = dl.magnitude_record(params, penalty=dl.get_penalty(state))
  assert record['dense']['kernel'].shape == (6,)
  ranks = dl.rank_groups(params, record, penalty=dl.get_penalty(state))
  jax.tree.map(
    np.testing.assert_array_equal,
    ranks,
    dl.rank_groups(params, record, penalty=rule),
  )


def test_a_state_without_a_record_is_checked_against_the_rule():
  # The same state with its record of penalties dropped (as by hand): the
  # toolbox is then asked for the default rule's groups, as if penalty= had
  # been forgotten, and Γ shows that they are not the optimizer's.
  rule = dl.penalty_rule(conv=dl.Lasso(), dense=dl.GroupLasso(axes=0))
  params, state = _trained(penalty=rule)
  state = optax.tree.set(state, penalties=None)
  gamma = optax.tree.get(state, 'gamma')
  # Partly selected filters: some weights of a filter in Γ, some not.
  conv = np.asarray(gamma['conv']['kernel'] != 0)
  assert np.any(conv.any(axis=(0, 1, 2)) & ~conv.all(axis=(0, 1, 2)))
  refused = (
    lambda: dl.support(state, by_group=True),
    lambda: dl.path_summary(params, state),
    lambda: dl.w_star(params, state, channels=True),
    lambda: dl.init_selection(state),
    lambda: dl.reference_prune_order(params, state, 0),
  )
  for call in refused:
    with pytest.raises(ValueError, match="Γ of 'conv/kernel' is not grouped"):
      call()
  # With the optimizer's rule, the groups are its own.
  rows = dl.support(state, by_group=True, penalty=rule)['dense']['kernel']
  assert rows.shape == (6,)
  # A row-grouped Γ read as a lasso: row 0 is in the support with its small
  # entry, row 1 is out of it with a larger one, which a lasso cannot do.
  zs = optax.tree.get(state, 'z')
  z = jnp.array([[3.0, 0.1, 0.0, 0.0], [0.8, 0.0, 0.0, 0.0]] + [[0.0] * 4] * 4)
  shrunk = dl.group_shrink(z, 1.0, reduce_axes=(1,))
  core = state[-1]._replace(
    z={**zs, 'dense': {**zs['dense'], 'kernel': z}},
    gamma={**gamma, 'dense': {**gamma['dense'], 'kernel': shrunk}},
  )
  row_state = (*state[:-1], core)
  conv_only = dl.penalty_rule(conv=dl.Lasso())
  with pytest.raises(ValueError, match="Γ of 'dense/kernel' is not grouped"):
    dl.support(row_state, by_group=True, penalty=conv_only)
  rows = dl.support(row_state, by_group=True, penalty=rule)['dense']['kernel']
  np.testing.assert_array_equal(rows, [True] + [False] * 5)
  # A diverged entry is not taken for a grouping error.
  _, state = _trained()
  state = optax.tree.set(state, penalties=None)
  zs = optax.tree.get(state, 'z')
  for layer in ('conv', 'dense'):
    bad = zs[layer]['kernel'].reshape(-1).at[0].set(jnp.nan)
    bad = {**zs[layer], 'kernel': bad.reshape(zs[layer]['kernel'].shape)}
    nan_state = (*state[:-1], state[-1]._replace(z={**zs, layer: bad}))
    dl.support(nan_state, by_group=True)
  # Under jax.jit the arrays are not known and nothing is checked.
  jitted = jax.jit(lambda s: dl.support(s, by_group=True))(state)
  assert jitted['conv']['kernel'].shape == (6,)


def test_w_star_masks_by_support_and_keeps_uncoupled_leaves():
  params, state = _trained()
  ws = dl.w_star(params, state)
  gamma = optax.tree.get(state, 'gamma')
  for layer in ('conv', 'dense'):
    want = np.where(gamma[layer]['kernel'] != 0, params[layer]['kernel'], 0.0)
    np.testing.assert_array_equal(ws[layer]['kernel'], want)
  np.testing.assert_array_equal(ws['conv']['bias'], params['conv']['bias'])
  # Jittable.
  jitted = jax.jit(dl.w_star)(params, state)
  jax.tree.map(np.testing.assert_array_equal, jitted, ws)


@pytest.mark.parametrize('case', TOOLBOX_CASES)
def test_w_star_matches_reference_golden(case, x64):
  del x64
  params, state = replay(case, STEPS - 1)
  want = golden(f'{case}/final/w_star')
  got = dl.w_star(params, state)
  for layer in want:
    np.testing.assert_allclose(
      got[layer]['kernel'], want[layer]['kernel'], rtol=0, atol=1e-12
    )
  assert GOLDEN[f'{case}/final/w_star/conv1.weight'].shape == (4, 3, 3, 3)


def test_residue_and_summary_count_both_signs():
  params, state = _trained()
  gamma = optax.tree.get(state, 'gamma')
  nu = 2.0
  want_res = sum(
    float(np.sum((params[k]['kernel'] - gamma[k]['kernel']) ** 2))
    for k in ('conv', 'dense')
  ) / (2 * nu)
  np.testing.assert_allclose(dl.residue(params, state, nu), want_res, rtol=1e-5)
  np.testing.assert_allclose(
    jax.jit(dl.residue)(params, state, nu), want_res, rtol=1e-5
  )

  s = dl.path_summary(params, state, nu=nu)
  assert s.step == 40
  conv, dense = s.layers['conv/kernel'], s.layers['dense/kernel']
  g_conv, g_dense = (
    np.asarray(gamma['conv']['kernel']),
    gamma['dense']['kernel'],
  )
  assert conv.penalty == 'group' and dense.penalty == 'elementwise'
  assert conv.groups_total == 6
  assert conv.groups_selected == int(np.any(g_conv != 0, axis=(0, 1, 2)).sum())
  assert conv.weights_selected == int((g_conv != 0).sum())
  assert dense.weights_selected == int((np.asarray(g_dense) != 0).sum())
  assert (np.asarray(g_dense) < 0).any()  # negative entries count too
  assert dense.groups_selected == dense.weights_selected
  assert dense.groups_total == dense.weights_total == 24
  total = sum(np.size(x) for x in jax.tree.leaves(params))
  kept = total - 3 * 3 * 2 * 6 - 24 + conv.weights_selected
  kept += dense.weights_selected
  assert (s.params_total, s.params_kept) == (total, kept)
  assert s.density == pytest.approx(kept / total)
  np.testing.assert_allclose(s.residue, want_res, rtol=1e-5)
  np.testing.assert_allclose(conv.residue + dense.residue, want_res, rtol=1e-5)
  text = str(s)
  assert 'conv/kernel' in text and 'dense/kernel' in text
  assert 'density of the whole model' in text
  assert f'{conv.groups_selected}/6' in text
  # Groups are named by what they are: the conv's filters; a lasso's
  # weights get no name.
  assert (conv.group_axes, conv.group_kind) == ((3,), 'filters')
  assert (dense.group_axes, dense.group_kind) == (None, '')
  assert text.count(' filters') == 1
  data = json.loads(json.dumps(s.as_dict()))
  assert data['layers']['conv/kernel']['shape'] == [3, 3, 2, 6]
  assert data['layers']['conv/kernel']['group_axes'] == [3]
  assert data['layers']['conv/kernel']['group_kind'] == 'filters'
  # Without ν there is no residue.
  assert dl.path_summary(params, state).residue is None


class _Net(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(4, rngs=rngs)
    self.fc = nnx.Linear(4 * 4 * 4, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    return self.fc(x.reshape(x.shape[0], -1))


def test_flax_nnx_states_work_directly():
  model = _Net(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, dl.dessilbi(0.1, nu=0.5), wrt=nnx.Param)
  x = jax.random.normal(jax.random.key(1), (16, 4, 4, 1))
  y = jnp.arange(16) % 2

  @nnx.jit
  def step(model, optimizer):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    optimizer.update(model, nnx.grad(loss_fn)(model))

  for _ in range(30):
    step(model, optimizer)
  params = nnx.state(model, nnx.Param)
  filters = dl.support(optimizer.opt_state, by_group=True)['conv1']['kernel']
  assert filters.shape == (4,)
  ws = dl.w_star(params, optimizer.opt_state)
  sparse = nnx.clone(model)
  nnx.update(sparse, ws)
  fc = np.asarray(sparse.fc.kernel[...])
  gamma = pure(optax.tree.get(optimizer.opt_state, 'gamma'))
  np.testing.assert_array_equal(fc != 0, np.asarray(gamma['fc']['kernel']) != 0)
  s = dl.path_summary(params, optimizer.opt_state, nu=0.5)
  assert set(s.layers) == {'conv1/kernel', 'fc/kernel'}
  assert s.params_total == sum(np.size(p) for p in jax.tree.leaves(params))


def test_errors_name_the_problem():
  params, state = _trained(steps=1)
  with pytest.raises(ValueError, match='DessiLBIState'):
    dl.support(optax.sgd(0.1).init(params))
  with pytest.raises(ValueError, match='dense/kernel'):
    dl.w_star({'conv': params['conv']}, state)
  bad = {**params, 'dense': {'kernel': jnp.zeros((4, 6))}}
  with pytest.raises(ValueError, match=r'dense/kernel.*shape'):
    dl.w_star(bad, state)
  with pytest.raises(ValueError, match='uncoupled'):
    dl.support(
      state, by_group=True, penalty=dl.penalty_rule(overrides={'dense': None})
    )


def test_w_star_with_channels_zeroes_bias_and_norm_of_unselected_filters():
  params = {
    'conv1': {'kernel': jnp.ones((3, 3, 1, 3)), 'bias': jnp.ones(3)},
    'bn1': {'scale': jnp.ones(3), 'bias': jnp.ones(3)},
    'fc': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)},
  }
  state = dl.scale_by_dessilbi(1.0).init(params)
  conv_gamma = jnp.zeros((3, 3, 1, 3)).at[..., 0].set(1.0).at[..., 2].set(2.0)
  fc_gamma = jnp.zeros((3, 2)).at[0, 0].set(1.0)
  state = state._replace(
    gamma={
      **state.gamma,
      'conv1': {**state.gamma['conv1'], 'kernel': conv_gamma},
      'fc': {**state.gamma['fc'], 'kernel': fc_gamma},
    }
  )
  plain = dl.w_star(params, state)
  np.testing.assert_array_equal(plain['conv1']['bias'], [1, 1, 1])
  np.testing.assert_array_equal(plain['bn1']['scale'], [1, 1, 1])
  out = dl.w_star(params, state, channels=True)
  np.testing.assert_array_equal(
    out['conv1']['kernel'], plain['conv1']['kernel']
  )
  np.testing.assert_array_equal(out['conv1']['bias'], [1, 0, 1])
  np.testing.assert_array_equal(out['bn1']['scale'], [1, 0, 1])
  np.testing.assert_array_equal(out['bn1']['bias'], [1, 0, 1])
  # Under a lasso, a neuron none of whose weights is selected is out as a
  # whole (slim drops it from the support): its bias goes too.
  np.testing.assert_array_equal(out['fc']['bias'], [1, 0])
  np.testing.assert_array_equal(out['fc']['kernel'], [[1, 0], [0, 0], [0, 0]])
  # Given a spec, only its layers lose filters, as slim's: the classifier,
  # which no spec lists, keeps its biases (all of them used to go).
  spec = dl.chain_spec(params, ['conv1', 'fc'])
  out = dl.w_star(params, state, channels=True, spec=spec)
  np.testing.assert_array_equal(out['conv1']['bias'], [1, 0, 1])
  np.testing.assert_array_equal(out['bn1']['bias'], [1, 0, 1])
  np.testing.assert_array_equal(out['fc']['bias'], [1, 1])
  np.testing.assert_array_equal(out['fc']['kernel'], [[1, 0], [0, 0], [0, 0]])
  slim = dl.slim(out, spec, dl.support(state, by_group=True)).params
  np.testing.assert_array_equal(slim['fc']['bias'], out['fc']['bias'])


def test_w_star_with_channels_takes_a_kernel_without_filters():
  params = {
    'conv': {'kernel': jnp.ones((3, 3, 2, 0)), 'bias': jnp.ones(0)},
    'fc': {'kernel': jnp.ones((4, 0))},
  }
  state = dl.dessilbi(0.1).init(params)
  out = dl.w_star(params, state, channels=True)
  assert jax.tree.map(jnp.shape, out) == jax.tree.map(jnp.shape, params)


@pytest.mark.parametrize('axes', [-1, (2, -1), 2])
def test_w_star_with_channels_zeroes_filters_without_a_weight_in_gamma(axes):
  """Whatever the groups, a filter none of whose weights is selected is out
  as a whole: its bias goes, so that it outputs exactly 0."""
  params = {'conv': {'kernel': jnp.ones((1, 1, 2, 3)), 'bias': jnp.ones(3)}}
  rule = dl.penalty_rule(conv=dl.GroupLasso(axes=axes))
  state = dl.scale_by_dessilbi(1.0, penalty=rule).init(params)
  gamma = jnp.zeros((1, 1, 2, 3))
  if axes == 2:  # per input: input 0 selected, so every filter has weights
    gamma = gamma.at[:, :, 0, :].set(1.0)
    want = [1, 1, 1]
  else:  # filters 0 and 1 selected
    gamma = gamma.at[..., :2].set(1.0)
    want = [1, 1, 0]
  state = state._replace(gamma={'conv': {'kernel': gamma}})
  out = dl.w_star(params, state, channels=True)
  np.testing.assert_array_equal(out['conv']['bias'], want)
  np.testing.assert_array_equal(
    out['conv']['kernel'], params['conv']['kernel'] * (gamma != 0)
  )


@pytest.mark.parametrize('nu', [0.0, -2.0, float('nan'), float('inf'), 0])
def test_residue_and_summary_refuse_the_nu_the_optimizer_refuses(nu):
  params, state = _trained(steps=1)
  msg = r'nu must be a finite number > 0'
  with pytest.raises(ValueError, match=msg):
    dl.scale_by_dessilbi(1.0, nu=nu)
  with pytest.raises(ValueError, match=msg):
    dl.residue(params, state, nu)
  with pytest.raises(ValueError, match=msg):
    dl.residue(params, state, jnp.asarray(nu, jnp.float32))
  with pytest.raises(ValueError, match=msg):
    dl.path_summary(params, state, nu=nu)
  with pytest.raises(TypeError, match=r'nu must be a real number'):
    dl.residue(params, state, True)
  # A traced ν cannot be checked; the residue is computed as before.
  np.testing.assert_allclose(
    jax.jit(dl.residue)(params, state, 4.0),
    dl.residue(params, state, 2.0) / 2,
    rtol=1e-6,
  )


def test_float16_underflow_in_a_new_filter_is_not_a_grouping_error():
  # A filter that has just entered: s = 1 - λ/‖z‖ is tiny, and the small
  # entry's z · s underflows to 0 in float16 while the filter is selected.
  params = {'conv': jnp.zeros((1, 1, 2, 1), jnp.float16)}
  state = dl.scale_by_dessilbi(1.0).init(params)
  z = jnp.array([1.0005, 1e-5], jnp.float16).reshape(1, 1, 2, 1)
  gamma = dl.group_shrink(z, 1.0, (0, 1, 2))
  assert gamma[0, 0, 0, 0] != 0 and gamma[0, 0, 1, 0] == 0
  state = state._replace(z={'conv': z}, gamma={'conv': gamma})
  np.testing.assert_array_equal(
    dl.support(state, by_group=True)['conv'], [True]
  )


def test_a_stacked_ensemble_of_states_is_refused_unless_under_vmap():
  # Γ of a jax.vmap-stacked ensemble has one more axis than the leaf the
  # penalties were resolved for: read directly, filter axis 3 would be the
  # members' input channels.
  params = {'conv': {'kernel': jnp.ones((3, 3, 2, 4))}}
  tx = dl.dessilbi(0.1)
  ensemble = jax.vmap(lambda _: tx.init(params))(jnp.arange(3))
  with pytest.raises(ValueError, match=r"'conv/kernel' has rank 5.*jax\.vmap"):
    dl.support(ensemble, by_group=True)
  per_member = jax.vmap(lambda s: dl.support(s, by_group=True))(ensemble)
  assert per_member['conv']['kernel'].shape == (3, 4)


def test_w_star_channels_checks_the_spec_and_refuses_stacked_layers():
  # A misnamed layer in the spec is named (it used to fall back to naming
  # and leave the norm's shift of unselected filters); a stacked bias (one
  # entry per filter and per layer) is refused, where its mask missed it.
  params = {
    'conv1': {'kernel': jnp.ones((3, 3, 2, 4)), 'bias': jnp.ones(4)},
    'bn1': {'scale': jnp.ones(4), 'bias': jnp.ones(4)},
    'conv2': {'kernel': jnp.ones((3, 3, 4, 2))},
  }
  state = dl.scale_by_dessilbi(0.1).init(params)
  spec = {'conv_1': dl.Link(norm='bn1', consumers=('conv2',))}
  with pytest.raises(ValueError, match="layer 'conv_1' has no kernel"):
    dl.w_star(params, state, channels=True, spec=spec)
  stacked = {
    'blocks': {
      'conv': {'kernel': jnp.ones((2, 3, 3, 3, 3)), 'bias': jnp.ones((2, 3))}
    }
  }
  rule = dl.penalty_rule(overrides={'kernel': dl.GroupLasso(axes=(0, -1))})
  state = dl.scale_by_dessilbi(0.1, penalty=rule).init(stacked)
  with pytest.raises(
    ValueError, match=r"'blocks/conv/bias' has shape \(2, 3\)"
  ):
    dl.w_star(stacked, state, channels=True)


def test_linen_variables_for_params_get_a_hint():
  params = {'conv1': {'kernel': jnp.ones((3, 3, 1, 4))}}
  variables = {'params': params, 'batch_stats': {}}
  state = dl.dessilbi(0.1).init(params)
  record = dl.magnitude_record(params)
  for call in (
    lambda: dl.w_star(variables, state),
    lambda: dl.prune(variables, record, 0.5),
    lambda: dl.rank_groups(variables, record),
  ):
    with pytest.raises(
      ValueError, match=r"variables\['params'\] in Flax Linen"
    ):
      call()


def _attention_params():
  attn = nnx.MultiHeadAttention(
    num_heads=2,
    in_features=8,
    qkv_features=8,
    decode=False,
    bias_init=nnx.initializers.normal(1.0),
    rngs=nnx.Rngs(0),
  )
  return nnx.state(attn, nnx.Param)


def test_w_star_channels_zeroes_an_attention_bias_in_every_head():
  # The key kernel (in, heads, head_dim) is grouped per last-axis index j
  # over every head (the default rule); with slices 1 and 3 out of Γ's
  # support, W* with channels zeroes bias[:, 1] and bias[:, 3] in both
  # heads (it used to refuse the (heads, head_dim) bias as stacked layers).
  params = _attention_params()
  state = dl.scale_by_dessilbi(0.1).init(params)
  gamma = jax.tree.map(jnp.ones_like, state.gamma)
  out_of_support = np.array([False, True, False, True])
  gamma['key']['kernel'] = jnp.where(out_of_support, 0.0, 1.0) * jnp.ones(
    (8, 2, 4)
  )
  state = state._replace(gamma=gamma)
  before = pure(params)
  out = dl.w_star(params, state, channels=True)
  key = out['key']
  assert not np.asarray(key['kernel'])[..., out_of_support].any()
  assert not np.asarray(key['bias'])[:, out_of_support].any()
  np.testing.assert_array_equal(
    key['bias'][:, ~out_of_support], before['key']['bias'][:, ~out_of_support]
  )
  assert np.asarray(before['key']['bias'])[:, out_of_support].all()
  for name in ('query', 'value', 'out'):  # all in the support: untouched
    np.testing.assert_array_equal(out[name]['bias'], before[name]['bias'])
  # Each output (h, j) of the key projection is then exactly zero.
  x = jax.random.normal(jax.random.key(1), (3, 8))
  y = np.asarray(jnp.einsum('bi,ihd->bhd', x, key['kernel']) + key['bias'])
  assert not y[..., out_of_support].any() and y[..., ~out_of_support].all()


def test_w_star_channels_refuses_a_stacked_bias_unless_filters_are_whole():
  # A stacked kernel (layers, h, w, in, out) grouped per layer and filter
  # loses filter j of one layer alone: a bias (layers, out) masked by one
  # entry per filter would miss it, so it is refused, naming the ways out.
  stacked = {
    'blocks': {
      'conv': {'kernel': jnp.ones((2, 3, 3, 3, 3)), 'bias': jnp.ones((2, 3))}
    }
  }
  rule = dl.penalty_rule(overrides={'kernel': dl.GroupLasso(axes=(0, -1))})
  state = dl.scale_by_dessilbi(0.1, penalty=rule).init(stacked)
  with pytest.raises(ValueError, match=r'w_star\(channels=False\).*layers='):
    dl.w_star(stacked, state, channels=True)
  # Under the default rule, one group per filter j of every layer together:
  # an unselected filter is out of every layer, and so is its bias.
  state = dl.scale_by_dessilbi(0.1).init(stacked)
  gamma = state.gamma
  gamma['blocks']['conv']['kernel'] = jnp.ones((2, 3, 3, 3, 3)) * jnp.array(
    [1.0, 0.0, 1.0]
  )
  gamma['blocks']['conv']['bias'] = jnp.ones((2, 3))
  out = dl.w_star(stacked, state._replace(gamma=gamma), channels=True)
  np.testing.assert_array_equal(
    out['blocks']['conv']['bias'], [[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]]
  )
