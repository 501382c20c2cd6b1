"""Surgery at the edges: other groupings, numbered layers, one-filter
layers, half precision, and the arguments it refuses."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dessilbi_jax as dl


def _conv_chain(x, params, names):
  for name in names:
    x = jax.lax.conv_general_dilated(
      x,
      params[name]['kernel'],
      (1, 1),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    x = jax.nn.relu(x)
  return x


def _per_input_state(inputs, outputs):
  """Three convs; conv2 (``inputs`` × ``outputs``) grouped per input
  channel, with Γ selecting its input channels 0 and 1 (so every filter of
  conv2 has selected weights) and all of conv1 and conv3."""
  keys = jax.random.split(jax.random.key(0), 3)
  params = {
    'conv1': {'kernel': jax.random.normal(keys[0], (3, 3, 2, inputs))},
    'conv2': {'kernel': jax.random.normal(keys[1], (3, 3, inputs, outputs))},
    'conv3': {'kernel': jax.random.normal(keys[2], (3, 3, outputs, 3))},
  }
  rule = dl.penalty_rule(overrides={'conv2': dl.GroupLasso(axes=2)})
  tx = dl.dessilbi(0.1, nu=1.0, penalty=rule)
  state = tx.init(params)
  gamma = dict(params)
  gamma['conv2'] = {
    'kernel': params['conv2']['kernel'].at[:, :, 2:, :].set(0.0)
  }
  z = jax.tree.map(lambda g: 2.0 * g, gamma)
  state = optax.tree.set(state, gamma=gamma, z=z)
  return params, state


def test_slim_reads_a_support_tree_by_the_groups_the_state_records():
  params, state = _per_input_state(4, 4)
  sup = dl.support(state, by_group=True)
  assert sup['conv2']['kernel'].shape == (4,)  # one entry per input channel
  spec = dl.chain_spec(params, ['conv1', 'conv2', 'conv3'])
  out = dl.slim(params, spec, sup, opt_state=state)
  # Every filter of conv2 has a selected weight: none may go. (Read per
  # output channel, the mask would have dropped filters 2 and 3.)
  assert out.widths == {'conv1': 4, 'conv2': 4}
  w = dl.w_star(params, state)
  small = dl.slim(w, spec, sup, opt_state=state).params
  x = jax.random.normal(jax.random.key(3), (2, 5, 5, 2))
  names = ['conv1', 'conv2', 'conv3']
  np.testing.assert_allclose(
    _conv_chain(x, small, names), _conv_chain(x, w, names), rtol=1e-6
  )


def test_slim_asks_for_the_state_to_read_a_mask_of_other_groups():
  params, state = _per_input_state(4, 6)
  sup = dl.support(state, by_group=True)
  spec = dl.chain_spec(params, ['conv1', 'conv2', 'conv3'])
  with pytest.raises(
    ValueError, match=r"keep: the mask of 'conv2'.*opt_state="
  ):
    dl.slim(params, spec, sup)
  assert dl.slim(params, spec, sup, opt_state=state).widths['conv2'] == 6


def _trained_shift(key, shape, dtype):
  return jnp.array([0.5, 1.0, 1.5, 2.0], dtype)


def _sequential(rngs):
  return nnx.Sequential(
    nnx.Conv(3, 4, (3, 3), rngs=rngs),
    nnx.BatchNorm(4, bias_init=_trained_shift, rngs=rngs),
    nnx.relu,
    nnx.Conv(4, 5, (3, 3), rngs=rngs),
  )


def test_numbered_layers_of_a_sequential_need_their_norm_named():
  model = _sequential(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  with pytest.raises(
    ValueError, match=r'numbers it by position \(layers/1 has'
  ):
    dl.chain_spec(params, ['layers/0', 'layers/3'])
  record = dl.magnitude_record(params)
  with pytest.raises(ValueError, match='numbers it by position'):
    dl.prune(params, record, 0.5, layers=['layers/0'])
  spec = dl.chain_spec(
    params, ['layers/0', 'layers/3'], norms={'layers/0': 'layers/1'}
  )
  pruned, masks = dl.prune(params, record, 0.5, layers=['layers/0'], spec=spec)
  kept = np.asarray(masks['layers'][0]['bias'])
  assert kept.sum() == 2
  np.testing.assert_array_equal(
    np.asarray(pruned['layers'][1]['bias'])[~kept], 0
  )
  nnx.update(model, pruned)
  model.eval()
  x = jax.random.normal(jax.random.key(2), (2, 6, 6, 3))
  hidden = model.layers[2](model.layers[1](model.layers[0](x)))
  np.testing.assert_array_equal(np.asarray(hidden)[..., ~kept], 0.0)
  out = dl.slim(nnx.state(model), spec, masks)
  assert out.params['layers'][1]['scale'].shape == (2,)
  # A numbered chain without norms needs nothing named.
  plain = nnx.Sequential(
    nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)),
    nnx.relu,
    nnx.Conv(4, 5, (3, 3), rngs=nnx.Rngs(1)),
  )
  spec = dl.chain_spec(nnx.state(plain, nnx.Param), ['layers/0', 'layers/2'])
  assert spec['layers/0'].norm is None


def test_a_norm_given_to_one_numbered_layer_is_no_candidate_for_another():
  """The last layer of a chain has no link; its norm is looked for by naming
  when pruning. A norm the spec gives another layer is not its."""
  model = nnx.Sequential(
    nnx.Conv(2, 8, (3, 3), rngs=nnx.Rngs(0)),
    nnx.BatchNorm(8, rngs=nnx.Rngs(1)),
    nnx.relu,
    nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(2)),
    nnx.relu,
    nnx.Conv(8, 8, (3, 3), rngs=nnx.Rngs(3)),
  )
  params = nnx.state(model, nnx.Param)
  names = ['layers/0', 'layers/3', 'layers/5']
  spec = dl.chain_spec(params, names, norms={'layers/0': 'layers/1'})
  assert spec['layers/3'].norm is None
  record = dl.magnitude_record(params)
  _, masks = dl.prune(params, record, 0.5, spec=spec)
  assert np.asarray(masks['layers'][5]['bias']).sum() == 4
  state = dl.dessilbi(0.1).init(params)
  dl.w_star(params, state, channels=True, spec=spec)


def test_parallel_lists_and_linen_sequential_need_their_norms_named():
  class Lists(nnx.Module):
    def __init__(self, rngs):
      self.convs = nnx.List(
        [nnx.Conv(3, 4, (3, 3), rngs=rngs), nnx.Conv(4, 6, (3, 3), rngs=rngs)]
      )
      self.norms = nnx.List([nnx.BatchNorm(4, rngs=rngs)])

  linen = {
    'layers_0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
    'layers_1': {'scale': jnp.ones(4), 'bias': jnp.ones(4)},
    'layers_3': {'kernel': jnp.ones((4, 2)), 'bias': jnp.ones(2)},
  }
  for params, layers, norm in (
    (
      nnx.state(Lists(nnx.Rngs(0)), nnx.Param),
      ['convs/0', 'convs/1'],
      'norms/0',
    ),
    (linen, ['layers_0', 'layers_3'], 'layers_1'),
  ):
    with pytest.raises(ValueError, match=rf'numbers it by position \({norm}'):
      dl.chain_spec(params, layers)
    spec = dl.chain_spec(params, layers, norms={layers[0]: norm})
    assert spec[layers[0]].norm == norm
  # A name ending in a number whose norm naming finds is not in doubt, and
  # the norm naming gives another layer is not this one's.
  named = {
    'conv_1': {'kernel': jnp.ones((3, 3, 1, 4))},
    'conv_2': {'kernel': jnp.ones((3, 3, 4, 4))},
    'bn_2': {'scale': jnp.ones(4), 'bias': jnp.ones(4)},
    'conv_3': {'kernel': jnp.ones((3, 3, 4, 2))},
  }
  spec = dl.chain_spec(named, ['conv_1', 'conv_2', 'conv_3'])
  assert spec['conv_1'].norm is None and spec['conv_2'].norm == 'bn_2'


@pytest.mark.parametrize('layer', ['conv1', 'conv2'])
def test_widen_a_layer_of_one_filter_or_reading_one_channel(layer):
  """A per-filter scale (store_gamma=False) is size 1 along a kernel's
  input axis; with one input channel that axis is still not a group axis."""
  keys = jax.random.split(jax.random.key(0), 3)
  params = {
    'conv1': {'kernel': jax.random.normal(keys[0], (3, 3, 2, 1))},
    'conv2': {'kernel': jax.random.normal(keys[1], (3, 3, 1, 4))},
    'conv3': {'kernel': jax.random.normal(keys[2], (3, 3, 4, 2))},
  }
  for penalties in ('recorded', 'dropped'):
    tx = dl.dessilbi(0.1, nu=1.0, store_gamma=False)
    state = tx.init(params)
    grads = jax.tree.map(jnp.ones_like, params)
    p = params
    for _ in range(3):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    if penalties == 'dropped':
      state = optax.tree.set(state, penalties=None)
    spec = dl.chain_spec(p, ['conv1', 'conv2', 'conv3'])
    out = dl.widen(jax.random.key(1), p, spec, layer, 2, opt_state=state)
    fresh = tx.init(out.params)
    shapes = [x.shape for x in jax.tree.leaves(out.opt_state)]
    assert shapes == [x.shape for x in jax.tree.leaves(fresh)], penalties
    if penalties == 'dropped':
      out = out._replace(
        opt_state=optax.tree.set(out.opt_state, penalties=None)
      )
    grads = jax.tree.map(jnp.ones_like, out.params)
    tx.update(grads, out.opt_state, out.params)  # accepted


def test_widen_and_reinit_float16_params():
  keys = jax.random.split(jax.random.key(0), 2)
  params = {
    'conv1': {'kernel': jax.random.normal(keys[0], (3, 3, 2, 3), jnp.float16)},
    'conv2': {'kernel': jax.random.normal(keys[1], (3, 3, 3, 4), jnp.float16)},
  }
  tx = dl.dessilbi(0.1, nu=1.0, state_dtype=jnp.float32)
  state = tx.init(params)
  spec = dl.chain_spec(params, ['conv1', 'conv2'])
  out = dl.widen(jax.random.key(1), params, spec, 'conv1', 2, opt_state=state)
  kernel = out.params['conv1']['kernel']
  assert kernel.dtype == jnp.float16 and kernel.shape == (3, 3, 2, 5)
  new = np.asarray(kernel, np.float64).reshape(-1, 5)
  np.testing.assert_allclose(new[:, :3].T @ new[:, 3:], 0.0, atol=1e-2)
  assert optax.tree.get(out.opt_state, 'z')['conv1']['kernel'].dtype == (
    jnp.float32
  )
  fresh, _ = dl.reinit_unselected(jax.random.key(2), params, state, ['conv1'])
  assert fresh['conv1']['kernel'].dtype == jnp.float16
  assert np.isfinite(np.asarray(fresh['conv1']['kernel'])).all()


def test_new_float16_filters_take_the_norm_of_large_filters():
  # Filters of norm ≈ 270: their sum of squares passes float16's 65504, and
  # the new filters were scaled to an infinite norm.
  kernel = np.random.default_rng(0).normal(size=(1, 1, 512, 4)) * 12
  params = {
    'conv1': {'kernel': kernel.astype(jnp.float16)},
    'conv2': {'kernel': jnp.ones((1, 1, 4, 2), jnp.float16)},
  }
  state = dl.dessilbi(0.1).init(params)
  spec = dl.chain_spec(params, ['conv1', 'conv2'])
  key = jax.random.key(1)
  fresh, _ = dl.reinit_unselected(
    key, params, state, ['conv1'], keep={'conv1': [1, 1, 0, 0]}
  )
  wide = dl.widen(key, params, spec, 'conv1', 2).params
  old = np.linalg.norm(np.asarray(kernel).reshape(512, 4), axis=0)
  for new, want in (
    (fresh['conv1']['kernel'][..., 2:], old[:2].mean()),
    (wide['conv1']['kernel'][..., 4:], old.mean()),
  ):
    norms = np.linalg.norm(np.asarray(new, np.float64).reshape(512, 2), axis=0)
    np.testing.assert_allclose(norms, want, rtol=1e-2)


def _two_convs():
  keys = jax.random.split(jax.random.key(0), 3)
  return {
    'conv1': {
      'kernel': jax.random.normal(keys[0], (3, 3, 2, 4)),
      'bias': jnp.zeros(4),
    },
    'conv2': {
      'kernel': jax.random.normal(keys[1], (3, 3, 4, 6)),
      'bias': jnp.zeros(6),
    },
    'conv3': {'kernel': jax.random.normal(keys[2], (3, 3, 6, 5))},
  }


def test_slim_refuses_a_keep_it_cannot_read():
  params = _two_convs()
  spec = dl.chain_spec(params, ['conv1', 'conv2', 'conv3'])
  _, masks = dl.prune(
    params, dl.magnitude_record(params), 0.5, layers=['conv1']
  )
  with pytest.raises(TypeError, match='keep: expected a dict'):
    dl.slim(params, spec, None)
  with pytest.raises(TypeError, match='keep: expected a dict'):
    dl.slim(params, spec, [True, False, True, True])
  with pytest.raises(TypeError, match="keep: the mask of layer 'conv1' must"):
    dl.slim(params, spec, {'conv1': jnp.array([0.9, 0.0, 0.4, 0.1])})
  mixed = {**masks, 'conv2': np.array([1, 1, 0, 1, 0, 1], bool)}
  with pytest.raises(ValueError, match=r"keep: has a mask for 'conv2'.*mixed"):
    dl.slim(params, spec, mixed)
  assert dl.slim(params, spec, masks).widths['conv1'] == 2
  # A selection record or ranks are ints too, but no mask: NOT_SELECTED
  # read as True kept every unselected filter, and rank 0, the best
  # filter, was the one dropped.
  record = {'conv1': {'kernel': jnp.array([5, dl.NOT_SELECTED, 7, 0])}}
  ranks = dl.rank_groups(params, record)
  state = dl.dessilbi(0.1).init(params)
  for call in (
    lambda: dl.slim(params, spec, record),
    lambda: dl.slim(params, spec, ranks),
    lambda: dl.slim(params, spec, {'conv1': [3, 0, 2, 1]}),
    lambda: dl.reinit_unselected(
      jax.random.key(0),
      params,
      state,
      ['conv1'],
      keep={'conv1': ranks['conv1']['kernel']},
    ),
  ):
    with pytest.raises(ValueError, match='a selection record or ranks'):
      call()
  with pytest.raises(TypeError, match="keep: the mask of layer 'conv1' must"):
    dl.reinit_unselected(
      jax.random.key(0), params, state, ['conv1'], keep={'conv1': [0.2, 0.9]}
    )
  assert dl.slim(params, spec, {'conv1': [1, 0, 1, 1]}).widths['conv1'] == 3


def test_surgery_arguments_are_checked_early():
  params = _two_convs()
  spec = dl.chain_spec(params, ['conv1', 'conv2', 'conv3'])
  state = dl.dessilbi(0.1).init(params)
  key = jax.random.key(0)
  for scale in (float('nan'), -1.0, 0.0, float('inf')):
    with pytest.raises(ValueError, match='scale must be a finite number > 0'):
      dl.widen(key, params, spec, 'conv1', 1, scale=scale)
    with pytest.raises(ValueError, match='scale must be a finite number > 0'):
      dl.reinit_unselected(key, params, state, ['conv1'], scale=scale)
  with pytest.raises(TypeError, match='scale must be a real'):
    dl.widen(key, params, spec, 'conv1', 1, scale='1')
  with pytest.raises(TypeError, match='layer: expected one layer path'):
    dl.widen(key, params, spec, ['conv1'], 1)
  with pytest.raises(TypeError, match='layers: expected layer paths'):
    dl.reinit_unselected(key, params, state, [1])
  with pytest.raises(TypeError, match='consumers: expected a layer path'):
    dl.Link(norm='bn1', consumers=None)
  with pytest.raises(TypeError, match='norm: expected the path'):
    dl.Link(norm=3)
  with pytest.raises(TypeError, match='penalty must be a rule'):
    dl.magnitude_record(params, penalty='group')
  with pytest.raises(TypeError, match='penalty must be a rule'):
    dl.resolve_penalties(params, 'group')


def _both_storages(params, edit):
  """Three steps of each storage of Γ, then ``edit(params, spec, state)``
  (a Surgery), then a step: per ``store_gamma``, the edited state's Γ and
  the params after that step; the edited state must be laid out as the
  optimizer's init lays out a state for the edited params."""
  rule = dl.penalty_rule(dense=dl.GroupLasso(axes=-1, lam=0.1))
  results = {}
  for store in (True, False):
    tx = dl.dessilbi(0.1, nu=1.0, penalty=rule, store_gamma=store)
    state, p = tx.init(params), params
    grads = jax.tree.map(jnp.ones_like, params)
    for _ in range(3):
      updates, state = tx.update(grads, state, p)
      p = optax.apply_updates(p, updates)
    out = edit(p, dl.chain_spec(p, ['fc1', 'fc2']), state)
    assert [x.shape for x in jax.tree.leaves(out.opt_state)] == [
      x.shape for x in jax.tree.leaves(tx.init(out.params))
    ]
    gamma = dl.get_gamma(out.opt_state)['fc2']['kernel']
    grads = jax.tree.map(jnp.ones_like, out.params)
    updates, _ = tx.update(grads, out.opt_state, out.params)
    results[store] = gamma, optax.apply_updates(out.params, updates)
  assert np.any(results[True][0] != 0)
  np.testing.assert_allclose(results[False][0], results[True][0], rtol=1e-6)
  np.testing.assert_allclose(
    results[False][1]['fc2']['kernel'],
    results[True][1]['fc2']['kernel'],
    rtol=1e-6,
  )


def test_slim_to_one_input_stores_gamma_as_the_optimizer_does():
  """store_gamma=False keeps one scale per group, but Γ itself where each
  group is one weight; a Dense consumer slimmed to one input must hold Γ,
  or the next step reads the scale as Γ."""
  keys = jax.random.split(jax.random.key(0), 2)
  params = {
    'fc1': {'kernel': jax.random.normal(keys[0], (4, 3))},
    'fc2': {'kernel': jax.random.normal(keys[1], (3, 5))},
  }
  keep = {'fc1': np.array([True, False, False])}
  _both_storages(
    params, lambda p, spec, state: dl.slim(p, spec, keep, opt_state=state)
  )


def test_a_record_per_input_and_filter_follows_the_edits():
  """A record of groups per (input, filter) has one axis per group axis:
  an edit of the producer's filters takes its last axis, and of the
  consumer's inputs its first."""
  keys = jax.random.split(jax.random.key(0), 2)
  params = {
    'conv1': {'kernel': jax.random.normal(keys[0], (3, 3, 2, 4))},
    'conv2': {'kernel': jax.random.normal(keys[1], (3, 3, 4, 5))},
  }
  rule = dl.penalty_rule(conv=dl.GroupLasso(axes=(-2, -1), lam=0.5))
  tx = dl.track_selection(dl.dessilbi(0.1, nu=1.0, penalty=rule))
  state, p = tx.init(params), params
  for _ in range(3):
    updates, state = tx.update(jax.tree.map(lambda w: -w, p), state, p)
    p = optax.apply_updates(p, updates)
  record = optax.tree.get(state, 'first_step')
  r1, r2 = record['conv1']['kernel'], record['conv2']['kernel']
  assert r1.shape == (2, 4) and r2.shape == (4, 5)
  assert np.any(r1 != dl.NOT_SELECTED) and np.any(r2 != dl.NOT_SELECTED)
  spec = dl.chain_spec(p, ['conv1', 'conv2'])
  kept = [0, 2, 3]
  keep = {'conv1': np.isin(np.arange(4), kept)}
  edits = {
    'slim': dl.slim(p, spec, keep, opt_state=state),
    'widen': dl.widen(jax.random.key(1), p, spec, 'conv1', 2, opt_state=state),
  }
  unset = functools.partial(np.full, fill_value=dl.NOT_SELECTED)
  want = {
    'slim': (r1[:, kept], r2[kept, :]),
    'widen': (np.hstack([r1, unset((2, 2))]), np.vstack([r2, unset((2, 5))])),
  }
  for name, out in edits.items():
    got = optax.tree.get(out.opt_state, 'first_step')
    np.testing.assert_array_equal(got['conv1']['kernel'], want[name][0])
    np.testing.assert_array_equal(got['conv2']['kernel'], want[name][1])
    grads = jax.tree.map(jnp.ones_like, out.params)
    tx.update(grads, out.opt_state, out.params)  # accepted
  _, reset = dl.reinit_unselected(
    jax.random.key(2), p, state, ['conv1'], keep=keep
  )
  got = optax.tree.get(reset, 'first_step')['conv1']['kernel']
  np.testing.assert_array_equal(got, np.where(keep['conv1'], r1, unset(1)))


def test_widen_from_one_input_stores_the_scale_as_the_optimizer_does():
  """The reverse of the above: a Dense consumer of one input holds Γ under
  store_gamma=False (groups of one weight); widened, its groups grow and
  the optimizer keeps their scale, which the edited state must hold too
  (an NNX optimizer refuses a slot of another shape)."""
  keys = jax.random.split(jax.random.key(0), 2)
  params = {
    'fc1': {'kernel': jax.random.normal(keys[0], (4, 1))},
    'fc2': {'kernel': jax.random.normal(keys[1], (1, 5))},
  }
  _both_storages(
    params,
    lambda p, spec, state: dl.widen(
      jax.random.key(1), p, spec, 'fc1', 2, opt_state=state
    ),
  )


@pytest.mark.parametrize(
  'tx, leaf',
  [
    (optax.sm3(0.1), "'0/mu/conv1/bias/0' of shape (4,)"),
    (optax.adafactor(0.1, min_dim_size_to_factor=2), "'0/v_row/conv1/kernel'"),
  ],
  ids=['sm3', 'adafactor'],
)
def test_a_state_kept_per_axis_is_refused_by_name(tx, leaf):
  # Factored or per-axis statistics are not params-shaped: the state cannot
  # follow the edit. SM3's used to be blamed on the trees' layout.
  params = {
    'conv1': {'kernel': jnp.ones((3, 3, 1, 4)), 'bias': jnp.zeros(4)},
    'conv2': {'kernel': jnp.ones((3, 3, 4, 8))},
  }
  spec = dl.chain_spec(params, ['conv1', 'conv2'])
  keep = {'conv1': np.array([True, False, True, True])}
  with pytest.raises(ValueError, match='cannot follow a channel edit') as err:
    dl.slim(params, spec, keep, opt_state=tx.init(params))
  assert leaf in str(err.value)
  assert 'laid out alike' not in str(err.value)


class _ConvBn(nnx.Module):
  def __init__(self, width, rngs):
    self.conv1 = nnx.Conv(1, width, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(width, rngs=rngs)
    self.fc = nnx.Linear(width, 2, rngs=rngs)

  def __call__(self, x):
    return self.fc(nnx.relu(self.bn1(self.conv1(x))).mean(axis=(1, 2)))


def test_a_module_is_refused_where_params_are_returned_edited():
  # The result would be a module whose attributes (its widths) do not
  # describe its arrays; reading functions take the module as a pytree.
  model = _ConvBn(4, nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, dl.dessilbi(0.1), wrt=nnx.Param)
  spec = dl.chain_spec(model, ['conv1', 'fc'])
  assert spec == dl.chain_spec(nnx.state(model), ['conv1', 'fc'])
  assert dl.param_count(model) == dl.param_count(nnx.state(model))
  key = jax.random.key(0)
  record = dl.init_selection(optimizer.opt_state)
  calls = [
    lambda: dl.widen(key, model, spec, 'conv1', 2),
    lambda: dl.slim(model, spec, {'conv1': jnp.ones(4, bool)}),
    lambda: dl.w_star(model, optimizer.opt_state),
    lambda: dl.prune(model, record, 0.5),
    lambda: dl.magnitude_record(model),
    lambda: dl.reinit_unselected(key, model, optimizer.opt_state, ['conv1']),
  ]
  for call in calls:
    with pytest.raises(TypeError, match=r'params: got the Flax NNX module'):
      call()


def test_widen_refuses_a_kernel_holding_nan():
  params = {
    'fc1': {'kernel': jnp.ones((3, 2)).at[0, 0].set(jnp.nan)},
    'fc2': {'kernel': jnp.ones((2, 1))},
  }
  spec = dl.chain_spec(params, ['fc1', 'fc2'])
  with pytest.raises(ValueError, match=r"params: the kernel of layer 'fc1'"):
    dl.widen(jax.random.key(0), params, spec, 'fc1', 1)


def test_reinit_names_a_kept_filter_holding_nan_and_a_keep_of_no_layer():
  # NumPy's 'SVD did not converge' and 'has no entry for layer' used to be
  # all a user learnt.
  params = {'fc1': {'kernel': jnp.ones((4, 3)).at[0, 0].set(jnp.nan)}}
  state = dl.dessilbi(0.1).init(params)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match=r"layer 'fc1': the existing filters"):
    dl.reinit_unselected(key, params, state, ['fc1'], keep={'fc1': [1, 0, 0]})
  with pytest.raises(ValueError, match=r"layer 'fc1'.*NaN or inf"):
    dl.orthogonal_filters(key, params['fc1']['kernel'], 1, layer='fc1')
  # The NaN filter is the one re-initialised: nothing to refuse.
  new, _ = dl.reinit_unselected(
    key, params, state, ['fc1'], keep={'fc1': [0, 1, 1]}
  )
  assert np.isfinite(np.asarray(new['fc1']['kernel'])).all()
  with pytest.raises(TypeError, match=r'keep: expected a dict \{layer: mask'):
    dl.reinit_unselected(key, params, state, ['fc1'], keep=[1, 0, 0])
  with pytest.raises(ValueError, match=r"'fc1' \(its keys: \['fc1/kernel'\]"):
    dl.reinit_unselected(
      key, params, state, ['fc1'], keep={'fc1/kernel': [1, 0, 0]}
    )


class _NormBlock(nnx.Module):
  def __init__(self, cin, cout, norm, *, rngs):
    self.conv = nnx.Conv(cin, cout, (3, 3), rngs=rngs)
    self.norm = norm(cout, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.norm(self.conv(x)))


class _TwoNorms(nnx.Module):
  """A LayerNorm and a BatchNorm that share their leaf name ('norm')."""

  def __init__(self, *, rngs):
    self.stem = _NormBlock(1, 8, nnx.LayerNorm, rngs=rngs)
    self.body = _NormBlock(8, 8, nnx.BatchNorm, rngs=rngs)

  def __call__(self, x):
    return self.body(self.stem(x))


def test_a_norm_without_statistics_beside_one_of_its_name_is_edited():
  # body/norm's statistics are body/norm's (it has its own scale and bias):
  # they are no misplaced statistics of stem/norm, a LayerNorm.
  model = _TwoNorms(rngs=nnx.Rngs(0))
  model.eval()
  state = nnx.state(model)
  spec = {'stem/conv': dl.Link(norm='stem/norm', consumers=('body/conv',))}
  keep = np.arange(8) % 2 == 0
  out = dl.slim(state, spec, {'stem/conv': keep})
  assert out.widths == {'stem/conv': 4}
  assert out.params['stem']['norm']['scale'].shape == (4,)
  assert out.params['body']['norm']['mean'].shape == (8,)  # untouched
  small = _TwoNorms(rngs=nnx.Rngs(0))
  small.stem = _NormBlock(1, 4, nnx.LayerNorm, rngs=nnx.Rngs(0))
  small.body = _NormBlock(4, 8, nnx.BatchNorm, rngs=nnx.Rngs(0))
  nnx.update(small, out.params)
  small.eval()
  assert small(jnp.ones((2, 6, 6, 1))).shape == (2, 6, 6, 8)
  widened = dl.widen(jax.random.key(2), state, spec, 'stem/conv', 2)
  assert widened.widths == {'stem/conv': 10}


def test_widen_takes_a_spec_whose_other_link_claims_the_norm():
  # 'bn1' is named as fc1's norm: conv1, which names none, does not want it.
  params = {
    'conv1': {'kernel': jnp.ones((3, 3, 1, 4)), 'bias': jnp.zeros(4)},
    'fc1': {'kernel': jnp.ones((64, 4)), 'bias': jnp.zeros(4)},
    'bn1': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)},
    'fc2': {'kernel': jnp.ones((4, 10))},
  }
  spec = {
    'conv1': dl.Link(norm=None, consumers=('fc1',)),
    'fc1': dl.Link(norm='bn1', consumers=('fc2',)),
  }
  dl.check_spec(params, spec)
  assert dl.slim(params, spec, {'conv1': [1, 1, 0, 1]}).widths == {'conv1': 3}
  out = dl.widen(jax.random.key(0), params, spec, 'conv1', 2)
  assert out.widths == {'conv1': 6}
  assert out.params['bn1']['scale'].shape == (4,)  # fc1's norm, untouched
  assert out.params['fc1']['kernel'].shape == (96, 4)
  # A spec wrong elsewhere is refused by widen too, as by slim.
  bad = {**spec, 'fc1': dl.Link(norm='bn1', consumers=('fc3',))}
  with pytest.raises(ValueError, match="'fc3'"):
    dl.widen(jax.random.key(0), params, bad, 'conv1', 2)


def test_reinit_takes_layers_from_a_generator():
  params = {'fc1': {'kernel': jnp.eye(4, 3)}}
  state = dl.dessilbi(0.1).init(params)
  key = jax.random.key(0)
  keep = {'fc1': [1, 0, 0]}
  want, _ = dl.reinit_unselected(key, params, state, ['fc1'], keep=keep)
  got, _ = dl.reinit_unselected(
    key, params, state, (n for n in ['fc1']), keep=keep
  )
  np.testing.assert_array_equal(got['fc1']['kernel'], want['fc1']['kernel'])
  assert not np.array_equal(got['fc1']['kernel'], params['fc1']['kernel'])
  with pytest.raises(TypeError, match='layers: expected layer paths as str'):
    dl.reinit_unselected(key, params, state, 3, keep=keep)
