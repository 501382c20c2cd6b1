"""Surgery: orthogonal re-initialisation, widening, slimming, FLOPs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx
from sklearn.datasets import load_digits

import dessilbi_jax as dl
from dessilbi_jax._trees import pure

NS = dl.NOT_SELECTED


@functools.lru_cache
def _digits():
  """Real inputs: scikit-learn's 8x8 digits as NHWC float32."""
  d = load_digits()
  x = (d.images.astype(np.float32) / 16.0 - 0.3)[..., None]
  return jnp.asarray(x[:256]), jnp.asarray(d.target[:256].astype(np.int32))


def _train(model, tx, steps, batch=64):
  """A few DessiLBI steps of an NNX model on the digits."""
  x, y = _digits()
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, xb, yb):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(
        model(xb), yb
      ).mean()

    optimizer.update(model, nnx.grad(loss_fn)(model))

  for i in range(steps):
    j = (i * batch) % (len(x) - batch)
    step(model, optimizer, x[j : j + batch], y[j : j + batch])
  return optimizer


# ----------------------------------------------------------------------------
# Models: LeNet-5 (NNX), a VGG-style chain (Linen), a ResNet block (NNX).


class LeNet5(nnx.Module):
  """LeNet-5 for 8x8 digits (SAME padding): 2 convs, 3 Dense layers."""

  def __init__(self, widths=None, *, rngs):
    w = {'conv1': 6, 'conv2': 16, 'fc1': 120, 'fc2': 84, **(widths or {})}
    self.conv1 = nnx.Conv(1, w['conv1'], (5, 5), rngs=rngs)
    self.conv2 = nnx.Conv(w['conv1'], w['conv2'], (5, 5), rngs=rngs)
    self.fc1 = nnx.Linear(2 * 2 * w['conv2'], w['fc1'], rngs=rngs)
    self.fc2 = nnx.Linear(w['fc1'], w['fc2'], rngs=rngs)
    self.fc3 = nnx.Linear(w['fc2'], 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.max_pool(nnx.relu(self.conv1(x)), (2, 2), (2, 2))
    x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
    x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
    return self.fc3(nnx.relu(self.fc2(x)))


# Hidden Dense layers grouped per neuron, so whole neurons can be removed.
LENET_RULE = dl.penalty_rule(
  dense=dl.GroupLasso(axes=-1), overrides={'fc3': dl.Lasso()}
)


class Vgg(linen.Module):
  widths: tuple[int, ...] = (8, 8, 16)

  @linen.compact
  def __call__(self, x, train=False):
    for i, w in enumerate(self.widths):
      x = linen.Conv(w, (3, 3), use_bias=False, name=f'conv{i + 1}')(x)
      x = linen.BatchNorm(use_running_average=not train, name=f'bn{i + 1}')(x)
      x = linen.relu(x)
      if i % 2:
        x = linen.max_pool(x, (2, 2), (2, 2))
    return linen.Dense(10, name='fc')(x.reshape(x.shape[0], -1))


class Block(nnx.Module):
  def __init__(self, channels, hidden, rngs):
    self.conv1 = nnx.Conv(channels, hidden, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(hidden, rngs=rngs)
    self.conv2 = nnx.Conv(hidden, channels, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(channels, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    return nnx.relu(x + self.bn2(self.conv2(y)))


class ResNet(nnx.Module):
  def __init__(self, hidden=8, *, rngs):
    self.stem = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.block = Block(4, hidden, rngs)
    self.fc = nnx.Linear(4, 10, rngs=rngs)

  def __call__(self, x):
    x = self.block(nnx.relu(self.stem(x)))
    return self.fc(x.mean(axis=(1, 2)))


def _build(cls, *args):
  """A model built in one compiled program (fast on CPU)."""
  return nnx.jit(lambda: cls(*args, rngs=nnx.Rngs(0)))()


@nnx.jit
def _call(model, x):
  return model(x)


def _shell(cls, *args):
  """An abstract model to load a state into (no initialisation at all)."""
  return nnx.eval_shape(lambda: cls(*args, rngs=nnx.Rngs(0)))


@functools.lru_cache
def _trained_lenet_cached():
  model = _build(LeNet5)
  tx = dl.track_selection(
    dl.dessilbi(0.1, nu=1.0, penalty=LENET_RULE), LENET_RULE
  )
  optimizer = _train(model, tx, 30)
  return model, pure(optimizer.opt_state), tx


def _trained_lenet():
  """LeNet-5 after 30 DessiLBI steps (shared): a copy, its state, its tx."""
  model, opt_state, tx = _trained_lenet_cached()
  return nnx.clone(model), opt_state, tx


@functools.lru_cache
def _vgg_variables():
  x, _ = _digits()
  return jax.jit(Vgg().init)(jax.random.key(0), x[:2])


RESNET_SPEC = {
  'block/conv1': dl.Link(norm='block/bn1', consumers='block/conv2')
}


# ----------------------------------------------------------------------------
# Re-initialisation.


def test_reinit_is_orthogonal_to_kept_filters_and_resets_state():
  model, state, _ = _trained_lenet()
  params = pure(nnx.state(model, nnx.Param))
  # A fixed split of the conv2 filters, half kept.
  keep = np.arange(16) % 2 == 0
  new_params, new_state = dl.reinit_unselected(
    jax.random.key(1),
    params,
    state,
    ['conv2'],
    keep={'conv2': keep},
    penalty=LENET_RULE,
  )
  old = np.asarray(params['conv2']['kernel']).reshape(-1, 16)
  new = np.asarray(new_params['conv2']['kernel']).reshape(-1, 16)
  np.testing.assert_array_equal(new[:, keep], old[:, keep])
  inner = new[:, keep].T @ new[:, ~keep]
  scale = np.linalg.norm(new[:, keep]) * np.linalg.norm(new[:, ~keep])
  assert np.abs(inner).max() < 1e-5 * scale
  # The new filters are orthonormal among themselves (up to their norm).
  gram = new[:, ~keep].T @ new[:, ~keep]
  np.testing.assert_allclose(gram, np.diag(np.diag(gram)), atol=1e-4)
  np.testing.assert_allclose(
    np.sqrt(np.diag(gram)),
    np.linalg.norm(old[:, keep], axis=0).mean(),
    rtol=1e-4,
  )
  assert not np.asarray(new_params['conv2']['bias'])[~keep].any()
  for field in ('z', 'gamma', 'trace'):
    buf = optax.tree.get(new_state, field)['conv2']['kernel']
    old_buf = optax.tree.get(state, field)['conv2']['kernel']
    assert not np.asarray(buf)[..., ~keep].any(), field
    np.testing.assert_array_equal(
      np.asarray(buf)[..., keep], np.asarray(old_buf)[..., keep]
    )
  bias_trace = optax.tree.get(new_state, 'trace')['conv2']['bias']
  assert not np.asarray(bias_trace)[~keep].any()
  record = optax.tree.get(new_state, 'first_step')['conv2']['kernel']
  assert (np.asarray(record)[~keep] == NS).all()
  # Other layers are untouched.
  np.testing.assert_array_equal(
    new_params['conv1']['kernel'], params['conv1']['kernel']
  )


def test_reinit_defaults_to_the_support_and_errors():
  params = {
    'conv': {
      'kernel': jnp.asarray(
        np.random.default_rng(0).normal(size=(1, 1, 3, 5)), jnp.float32
      )
    }
  }
  state = dl.scale_by_dessilbi(0.1).init(params)
  gamma = jnp.zeros((1, 1, 3, 5)).at[..., 1].set(1.0).at[..., 3].set(2.0)
  state = state._replace(gamma={'conv': {'kernel': gamma}})
  new, _ = dl.reinit_unselected(jax.random.key(0), params, state, ['conv'])
  w = np.asarray(new['conv']['kernel']).reshape(3, 5)
  np.testing.assert_allclose(w[:, [1, 3]].T @ w[:, [0, 2, 4]], 0, atol=1e-6)
  # 3 new filters in the 1-dimensional complement of 2 kept 3-d filters:
  # orthogonal to the kept ones, not to each other.
  with pytest.raises(ValueError, match=r"'conv'.*span the whole"):
    keep = {'conv': np.array([True, True, True, False, False])}
    dl.reinit_unselected(jax.random.key(0), params, state, ['conv'], keep=keep)
  with pytest.raises(ValueError, match="'fc'"):
    dl.reinit_unselected(jax.random.key(0), params, state, ['fc'])


# ----------------------------------------------------------------------------
# Widening.


def test_widen_keeps_the_function_and_carries_optimizer_state():
  model, opt_state, tx = _trained_lenet()
  x, _ = _digits()
  before = _call(model, x)
  spec = dl.chain_spec(
    nnx.state(model, nnx.Param), ['conv1', 'conv2', 'fc1', 'fc2', 'fc3']
  )
  out = dl.widen(
    jax.random.key(0),
    nnx.state(model, nnx.Param),
    spec,
    'conv2',
    4,
    opt_state=opt_state,
  )
  assert out.widths == {'conv2': 20}
  wide = _shell(LeNet5, {'conv2': 20})
  nnx.update(wide, out.params)
  np.testing.assert_allclose(_call(wide, x), before, rtol=1e-5, atol=1e-5)
  # The new filters are live (orthogonal to the old ones), their outgoing
  # weights start at zero.
  k = np.asarray(wide.conv2.kernel[...]).reshape(-1, 20)
  assert np.abs(k[:, :16].T @ k[:, 16:]).max() < 1e-4
  assert np.linalg.norm(k[:, 16:], axis=0).min() > 0
  fc1 = np.asarray(wide.fc1.kernel[...]).reshape(4, 20, 120)
  assert not fc1[:, 16:].any()
  np.testing.assert_array_equal(
    fc1[:, :16], np.asarray(model.fc1.kernel[...]).reshape(4, 16, 120)
  )
  # Optimizer state: old entries carried over, new ones zero / NOT_SELECTED.
  old_state = opt_state
  for field in ('z', 'gamma', 'trace'):
    old_buf = np.asarray(optax.tree.get(old_state, field)['conv2']['kernel'])
    buf = np.asarray(optax.tree.get(out.opt_state, field)['conv2']['kernel'])
    np.testing.assert_array_equal(buf[..., :16], old_buf)
    assert not buf[..., 16:].any()
    fc_buf = np.asarray(optax.tree.get(out.opt_state, field)['fc1']['kernel'])
    assert fc_buf.shape == (80, 120)
  record = optax.tree.get(out.opt_state, 'first_step')['conv2']['kernel']
  assert record.shape == (20,) and (np.asarray(record)[16:] == NS).all()
  # The wide model trains on with the carried state.
  new_optimizer = nnx.Optimizer(wide, tx, wrt=nnx.Param)
  dl.set_nnx_opt_state(new_optimizer, out.opt_state)
  np.testing.assert_array_equal(
    pure(optax.tree.get(new_optimizer.opt_state, 'z'))['conv2']['kernel'],
    optax.tree.get(out.opt_state, 'z')['conv2']['kernel'],
  )


def test_widen_linen_with_batch_stats_and_errors():
  model = Vgg()
  x, _ = _digits()
  variables = _vgg_variables()
  params, stats = variables['params'], variables['batch_stats']
  stats = jax.tree.map(lambda s: s + 0.3, stats)
  before = jax.jit(model.apply)({'params': params, 'batch_stats': stats}, x)
  spec = dl.chain_spec(params, ['conv1', 'conv2', 'conv3', 'fc'])
  assert spec['conv1'] == dl.Link(norm='bn1', consumers=('conv2',))
  out = dl.widen(jax.random.key(0), params, spec, 'conv1', 3, batch_stats=stats)
  wide = Vgg(widths=(11, 8, 16))
  after = jax.jit(wide.apply)(
    {'params': out.params, 'batch_stats': out.batch_stats}, x
  )
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.batch_stats['bn1']['var'][8:], 1.0)
  with pytest.raises(ValueError, match=r"'fc'.*not in the spec"):
    dl.widen(jax.random.key(0), params, spec, 'fc', 2)
  bad = {'conv3': dl.Link(norm='bn3', consumers=('conv2',))}
  with pytest.raises(ValueError, match=r"'conv2' has 8 input.*'conv3' has 16"):
    dl.widen(jax.random.key(0), params, bad, 'conv3', 2)


# ----------------------------------------------------------------------------
# Slimming.


def test_slim_lenet5_nnx_equals_pruned_model_with_fewer_params_and_flops():
  model, opt_state, tx = _trained_lenet()
  record = optax.tree.get(opt_state, 'first_step')
  hidden = ['conv1', 'conv2', 'fc1', 'fc2']
  pruned, masks = dl.prune(
    nnx.state(model, nnx.Param), record, 0.5, layers=hidden, penalty=LENET_RULE
  )
  nnx.update(model, pruned)
  spec = dl.chain_spec(pruned, [*hidden, 'fc3'])
  out = dl.slim(nnx.state(model), spec, masks, opt_state=opt_state)
  assert out.widths == {'conv1': 3, 'conv2': 8, 'fc1': 60, 'fc2': 42}
  small = _shell(LeNet5, out.widths)
  nnx.update(small, out.params)
  x, _ = _digits()
  np.testing.assert_allclose(
    _call(small, x), _call(model, x), rtol=1e-5, atol=1e-5
  )

  def forward(state, graphdef, x):
    return nnx.merge(graphdef, state)(x)

  g_big, s_big = nnx.split(model)
  g_small, s_small = nnx.split(small)
  before = (dl.param_count(s_big), dl.flops(forward, s_big, g_big, x))
  del forward
  fwd = lambda s, x, g=g_small: nnx.merge(g, s)(x)  # noqa: E731
  after = (dl.param_count(s_small), dl.flops(fwd, s_small, x))
  assert after[0] < before[0] / 2
  assert after[1] < before[1] / 2
  # The carried optimizer state fits an optimizer of the small model.
  small_opt = nnx.Optimizer(small, tx, wrt=nnx.Param)
  dl.set_nnx_opt_state(small_opt, out.opt_state)
  gamma = pure(optax.tree.get(small_opt.opt_state, 'gamma'))
  assert gamma['fc1']['kernel'].shape == (2 * 2 * 8, 60)


def test_slim_vgg_linen_with_batch_stats_and_the_support():
  model = Vgg()
  x, y = _digits()
  variables = _vgg_variables()
  params, stats = variables['params'], variables['batch_stats']
  tx = dl.dessilbi(0.1, nu=1.0)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state):
    def loss_fn(params):
      logits, new = model.apply(
        {'params': params, 'batch_stats': stats},
        x,
        train=True,
        mutable=['batch_stats'],
      )
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      return loss.mean(), new['batch_stats']

    grads, stats = jax.grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state

  for _ in range(20):
    params, stats, opt_state = step(params, stats, opt_state)
  # The sparse model W*, with the norm of every unselected filter zeroed
  # (prune with fraction 0 on the support: the channel semantics only).
  keep = dl.support(opt_state, by_group=True)
  selected = {
    k: np.asarray(keep[k]['kernel']) for k in ('conv1', 'conv2', 'conv3')
  }
  assert all(0 < v.sum() < v.size for v in selected.values()), selected
  sparse = dl.w_star(params, opt_state)
  for i, layer in enumerate(('conv1', 'conv2', 'conv3'), 1):
    for leaf in ('scale', 'bias'):
      sparse[f'bn{i}'][leaf] = jnp.where(
        selected[layer], sparse[f'bn{i}'][leaf], 0.0
      )
  spec = dl.chain_spec(params, ['conv1', 'conv2', 'conv3', 'fc'])
  out = dl.slim(sparse, spec, keep, batch_stats=stats, opt_state=opt_state)
  widths = tuple(out.widths[k] for k in ('conv1', 'conv2', 'conv3'))
  assert widths == tuple(int(v.sum()) for v in selected.values())
  small = Vgg(widths=widths)
  want = jax.jit(model.apply)({'params': sparse, 'batch_stats': stats}, x)
  got = jax.jit(small.apply)(
    {'params': out.params, 'batch_stats': out.batch_stats}, x
  )
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # The carried state has the small model's layout: the step goes on.
  small_params = out.params
  jax.eval_shape(
    tx.update,
    jax.tree.map(jnp.zeros_like, small_params),
    out.opt_state,
    small_params,
  )
  f_big = dl.flops(
    lambda p, s, x: model.apply({'params': p, 'batch_stats': s}, x),
    params,
    stats,
    x,
  )
  f_small = dl.flops(
    lambda p, s, x: small.apply({'params': p, 'batch_stats': s}, x),
    out.params,
    out.batch_stats,
    x,
  )
  assert f_small < f_big
  assert dl.param_count(out.params) < dl.param_count(params)


def test_slim_resnet_block_inside_and_errors_name_the_layer():
  model = _build(ResNet)
  x, _ = _digits()
  _call(model, x)
  model.block.bn1.mean[...] = jnp.linspace(-1, 1, 8)
  model.eval()
  record = {
    'block': {
      'conv1': {'kernel': jnp.array([0, NS, 1, NS, 2, 3, NS, NS], jnp.int32)}
    }
  }
  pruned, masks = dl.prune(nnx.state(model, nnx.Param), record, 0.5)
  nnx.update(model, pruned)
  out = dl.slim(nnx.state(model), RESNET_SPEC, masks)
  assert out.widths == {'block/conv1': 4}
  small = _shell(ResNet, 4)
  small.eval()
  nnx.update(small, out.params)
  np.testing.assert_allclose(
    _call(small, x), _call(model, x), rtol=1e-5, atol=1e-5
  )
  assert small.block.bn1.mean.shape == (4,)
  # The block's second conv feeds the residual addition: not in the spec.
  with pytest.raises(ValueError, match="'block/conv2' is not in the spec"):
    dl.slim(nnx.state(model), RESNET_SPEC, {'block/conv2': np.ones(4, bool)})
  with pytest.raises(ValueError, match="'block/conv1' would lose all"):
    dl.slim(nnx.state(model), RESNET_SPEC, {'block/conv1': np.zeros(8, bool)})
  bad = {'block/conv1': dl.Link(norm='block/bn2', consumers=('block/conv2',))}
  with pytest.raises(ValueError, match=r"'block/conv1'.*'block/bn2/.*4"):
    dl.slim(nnx.state(model), bad, masks)
  with pytest.raises(ValueError, match=r"'block/conv1'.*shape"):
    dl.slim(nnx.state(model), RESNET_SPEC, {'block/conv1': np.ones(3, bool)})


def test_slim_and_widen_carry_a_state_with_gamma_rebuilt_from_z():
  # store_gamma=False keeps one scale per filter instead of Γ: slimming and
  # widening must carry it like z, and the result must keep training.
  key = jax.random.key(0)
  params = {
    'conv1': {'kernel': jax.random.normal(key, (3, 3, 1, 6)) * 0.3},
    'conv2': {'kernel': jax.random.normal(key, (3, 3, 6, 4)) * 0.3},
  }
  tx = dl.dessilbi(0.5, nu=0.5, store_gamma=False)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: -jnp.ones_like(p), params)
  for _ in range(20):
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  gamma = dl.get_gamma(state)
  spec = dl.chain_spec(params, ['conv1', 'conv2'])
  keep = {'conv1': np.array([True, False, True, True, False, True])}
  out = dl.slim(params, spec, keep, opt_state=state)
  slim_gamma = dl.get_gamma(out.opt_state)
  np.testing.assert_array_equal(
    slim_gamma['conv1']['kernel'], gamma['conv1']['kernel'][..., keep['conv1']]
  )
  np.testing.assert_array_equal(
    slim_gamma['conv2']['kernel'],
    gamma['conv2']['kernel'][:, :, keep['conv1'], :],
  )
  small = jax.tree.map(lambda p: -jnp.ones_like(p), out.params)
  updates, _ = tx.update(small, out.opt_state, out.params)
  assert updates['conv1']['kernel'].shape == (3, 3, 1, 4)

  grown = dl.widen(key, params, spec, 'conv1', 2, opt_state=state)
  grown_gamma = dl.get_gamma(grown.opt_state)['conv1']['kernel']
  assert grown_gamma.shape == (3, 3, 1, 8)
  np.testing.assert_array_equal(grown_gamma[..., :6], gamma['conv1']['kernel'])
  assert not bool(jnp.any(grown_gamma[..., 6:] != 0))
  updates, _ = tx.update(
    jax.tree.map(jnp.ones_like, grown.params), grown.opt_state, grown.params
  )
  assert updates['conv2']['kernel'].shape == (3, 3, 8, 4)


def test_slim_accepts_lists_and_tuples_and_refuses_unknown_layers():
  params = {
    'fc1': {'kernel': jnp.arange(12.0).reshape(3, 4), 'bias': jnp.ones(4)},
    'fc2': {'kernel': jnp.ones((4, 1))},
  }
  spec = dl.chain_spec(params, ['fc1', 'fc2'])
  want = dl.slim(params, spec, {'fc1': np.array([1, 0, 0, 1], bool)})
  for mask in ([True, False, False, True], (1, 0, 0, 1)):
    out = dl.slim(params, spec, {'fc1': mask})
    assert out.widths == {'fc1': 2}
    np.testing.assert_array_equal(
      out.params['fc1']['kernel'], want.params['fc1']['kernel']
    )
    assert out.params['fc2']['kernel'].shape == (2, 1)
  # A typo is not ignored: the error lists the layers that can be slimmed.
  typo = {'fc1': [True, False, False, True], 'fc_typo': [True]}
  with pytest.raises(ValueError, match=r"'fc_typo' is not a layer.*\['fc1'\]"):
    dl.slim(params, spec, typo)
  with pytest.raises(ValueError, match=r"'fc2' is not in the spec.*\['fc1'\]"):
    dl.slim(params, spec, {'fc2': [True]})
  with pytest.raises(TypeError, match=r"layer 'fc1' must hold bools or ints"):
    dl.slim(params, spec, {'fc1': [0.5, 1.0, 0.0, 1.0]})
  with pytest.raises(ValueError, match=r"'fc1'.*shape \(3,\)"):
    dl.slim(params, spec, {'fc1': [True, False, True]})
  # A masks tree naming a kernel the params lack belongs to another model.
  other = {'fc1': {'kernel': np.ones(4, bool)}, 'fc9': {'kernel': np.ones(1)}}
  with pytest.raises(ValueError, match=r"'fc9/kernel', which is not a leaf"):
    dl.slim(params, spec, other)
  # A masks tree of the params' layout still works, non-spec layers ignored.
  tree = {
    'fc1': {'kernel': np.array([0, 1, 1, 1], bool), 'bias': optax.MaskedNode()},
    'fc2': {'kernel': np.ones((4, 1), bool)},
  }
  assert dl.slim(params, spec, tree).widths == {'fc1': 3}


def test_set_nnx_opt_state_checks_structure_shape_and_dtype():
  model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
  tx = dl.dessilbi(0.1)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  params = pure(nnx.state(model, nnx.Param))
  before = pure(optimizer.opt_state)

  def load(state):
    dl.set_nnx_opt_state(optimizer, state)

  with pytest.raises(TypeError, match=r'optimizer must be an nnx\.Optimizer'):
    dl.set_nnx_opt_state(model, before)

  half = jax.tree.map(lambda a: a.astype(jnp.float16), params)
  with pytest.raises(
    ValueError, match=r"opt_state: leaf '2/trace/bias' has dtype float16"
  ):
    load(tx.init(half))
  wide = pure(nnx.state(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Param))
  with pytest.raises(
    ValueError, match=r"opt_state: leaf '2/trace/bias' has shape \(4,\)"
  ):
    load(tx.init(wide))
  with pytest.raises(ValueError, match=r"opt_state: at '<root>'.*SelectionSt"):
    load(dl.track_selection(tx).init(params))
  with pytest.raises(ValueError, match=r"opt_state: has no entry '2'"):
    load(optax.sgd(0.1, momentum=0.9).init(params))
  uncoupled = dl.dessilbi(0.1, penalty=dl.penalty_rule(dense=None))
  with pytest.raises(ValueError, match=r"opt_state: at '3/z/kernel'"):
    load(uncoupled.init(params))
  # The same layout made under other penalties (rows as groups).
  rows = dl.dessilbi(0.1, penalty=dl.penalty_rule(dense=dl.GroupLasso(axes=0)))
  with pytest.raises(ValueError, match=r"at '3/penalties'.*other penalties"):
    load(rows.init(params))
  # Nothing was written by the refused loads.
  jax.tree.map(np.testing.assert_array_equal, pure(optimizer.opt_state), before)
  # A state of the optimizer's layout loads, and training goes on.
  grads = jax.tree.map(jnp.ones_like, params)
  _, state = tx.update(grads, tx.init(params), params)
  load(state)
  np.testing.assert_array_equal(
    dl.get_gamma(optimizer.opt_state)['kernel'], dl.get_gamma(state)['kernel']
  )
  optimizer.update(
    model, jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))
  )
  assert int(optax.tree.get(optimizer.opt_state, 'count')) == 2
  # Penalties dropped on purpose: the state takes the optimizer's.
  load(optax.tree.set(rows.init(params), penalties=None))
  assert dl.get_penalty(optimizer.opt_state) == dl.get_penalty(state)


def test_orthogonal_filters_and_widen_name_bad_counts():
  key = jax.random.key(0)
  kernel = jax.random.normal(key, (3, 3, 2, 4))
  with pytest.raises(ValueError, match=r'existing: expected .* \(d, k\)'):
    dl.orthogonal_filters(key, kernel, 2)
  for bad in (2.0, -1, True):
    with pytest.raises(ValueError, match='count must be an int >= 0'):
      dl.orthogonal_filters(key, kernel.reshape(-1, 4), bad)
  new = dl.orthogonal_filters(key, kernel.reshape(-1, 4), np.int64(2))
  assert new.shape == (18, 2)
  # A NaN or negative norm, and integer filters (the new ones rounded to 0),
  # were taken as given.
  for bad in (np.nan, -1.0):
    with pytest.raises(ValueError, match='norm must be a finite number >= 0'):
      dl.orthogonal_filters(key, kernel.reshape(-1, 4), 2, norm=bad)
  with pytest.raises(TypeError, match='existing: expected floating-point'):
    dl.orthogonal_filters(key, jnp.eye(4, 2, dtype=jnp.int32), 2)
  zero = dl.orthogonal_filters(key, kernel.reshape(-1, 4), 2, norm=0)
  assert not np.asarray(zero).any()
  params = {
    'fc1': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)},
    'fc2': {'kernel': jnp.ones((2, 1))},
  }
  spec = dl.chain_spec(params, ['fc1', 'fc2'])
  out = dl.widen(key, params, spec, 'fc1', np.int64(2))
  assert out.params['fc1']['kernel'].shape == (3, 4)


def test_slim_takes_a_keep_tree_with_lists_of_layers():
  # {'blocks': [layer, layer]}: a list of subtrees is a tree, not a mask.
  params = {
    'blocks': [
      {'kernel': jnp.ones((3, 4)), 'bias': jnp.zeros(4)},
      {'kernel': jnp.ones((4, 2)), 'bias': jnp.zeros(2)},
    ]
  }
  spec = dl.chain_spec(params, ['blocks/0', 'blocks/1'])
  keep = {
    'blocks': [
      {'kernel': jnp.array([True, False, True, True]), 'bias': None},
      {'kernel': jnp.array([True, True]), 'bias': None},
    ]
  }
  out = dl.slim(params, spec, keep)
  assert out.params['blocks'][0]['kernel'].shape == (3, 3)
  assert out.params['blocks'][1]['kernel'].shape == (3, 2)


def _mlp_forward(p, x):
  h = jax.nn.relu(x @ p['fc1']['kernel'] + p['fc1']['bias'])
  return h @ p['fc2']['kernel'] + p['fc2']['bias']


def test_slim_keeps_the_function_for_lasso_layers():
  # fc1 under a lasso: neuron 1 has no selected weight, neuron 2 one.
  key = jax.random.key(0)
  params = {
    'fc1': {
      'kernel': jax.random.normal(key, (4, 3)),
      'bias': jnp.array([0.3, 0.5, -0.2]),
    },
    'fc2': {'kernel': jnp.ones((3, 2)), 'bias': jnp.zeros(2)},
  }
  rule = dl.penalty_rule(dense=dl.Lasso(), overrides={'fc2': None})
  state = dl.scale_by_dessilbi(1.0, penalty=rule).init(params)
  gamma = jnp.zeros((4, 3)).at[:, 0].set(1.0).at[2, 2].set(1.0)
  state = state._replace(
    gamma={**state.gamma, 'fc1': {**state.gamma['fc1'], 'kernel': gamma}}
  )
  spec = dl.chain_spec(params, ['fc1', 'fc2'])
  x = jax.random.normal(jax.random.key(1), (5, 4))
  # W* with channels and the slim network built from the support agree.
  sparse = dl.w_star(params, state, channels=True, penalty=rule)
  np.testing.assert_array_equal(sparse['fc1']['bias'] != 0, [True, False, True])
  out = dl.slim(sparse, spec, dl.support(state, by_group=True, penalty=rule))
  assert out.widths == {'fc1': 2}
  np.testing.assert_allclose(
    _mlp_forward(out.params, x), _mlp_forward(sparse, x), rtol=1e-6
  )
  # prune under a lasso cuts weights, not neurons: a neuron that lost every
  # weight still outputs its bias, so slim keeps it.
  record = jnp.where(gamma != 0, 0, dl.NOT_SELECTED).astype(jnp.int32)
  record = {'fc1': {'kernel': record}, 'fc2': {'kernel': optax.MaskedNode()}}
  pruned, masks = dl.prune(params, record, 0.75, spec=spec, penalty=rule)
  assert not np.asarray(masks['fc1']['kernel'])[:, 1].any()
  out = dl.slim(pruned, spec, masks)
  assert out.widths == {'fc1': 3}
  np.testing.assert_allclose(
    _mlp_forward(out.params, x), _mlp_forward(pruned, x), rtol=1e-6
  )


def test_trees_whose_paths_do_not_line_up_are_refused_before_any_edit():
  variables = _vgg_variables()
  params, stats = variables['params'], variables['batch_stats']
  wrapped = {'params': params}
  spec = dl.chain_spec(wrapped, ['params/conv1', 'params/conv2'])
  keep = {'params/conv1': np.arange(8) < 6}
  # Statistics under another prefix than their norm's parameters.
  with pytest.raises(
    ValueError, match=r"batch_stats: 'bn1/mean'.*'params/bn1'"
  ):
    dl.slim(wrapped, spec, keep, batch_stats=stats)
  with pytest.raises(ValueError, match=r"batch_stats: 'bn1/mean'"):
    dl.widen(
      jax.random.key(0), wrapped, spec, 'params/conv1', 2, batch_stats=stats
    )
  # The whole variables dict as params: the statistics sit under
  # 'batch_stats/', the norm under 'params/'.
  spec = dl.chain_spec(variables, ['params/conv1', 'params/conv2'])
  with pytest.raises(ValueError, match=r"params: 'batch_stats/bn1/mean'"):
    dl.slim(variables, spec, keep)
  # A state built on params laid out otherwise matches no parameter.
  opt_state = dl.dessilbi(0.1).init(params)
  with pytest.raises(
    ValueError, match=r"opt_state: leaf '2/trace/.*' matches no parameter"
  ):
    dl.slim(
      wrapped,
      dl.chain_spec(wrapped, ['params/conv1', 'params/conv2']),
      keep,
      opt_state=opt_state,
    )
  # Laid out alike, everything follows.
  spec = dl.chain_spec(params, ['conv1', 'conv2'])
  out = dl.slim(
    params,
    spec,
    {'conv1': keep['params/conv1']},
    opt_state=opt_state,
    batch_stats=stats,
  )
  assert out.batch_stats['bn1']['mean'].shape == (6,)
  assert optax.tree.get(out.opt_state, 'z')['conv1']['kernel'].shape[-1] == 6


def test_a_consumer_grouped_per_input_has_its_record_cut_with_its_rows():
  params = {
    'fc1': {'kernel': jnp.ones((4, 6)), 'bias': jnp.ones(6)},
    'fc2': {'kernel': jnp.ones((6, 3)), 'bias': jnp.ones(3)},
  }
  rule = dl.penalty_rule(
    dense=dl.GroupLasso(axes=-1), overrides={'fc2': dl.GroupLasso(axes=0)}
  )
  tx = dl.track_selection(dl.dessilbi(0.1, penalty=rule), penalty=rule)
  state = tx.init(params)
  record = optax.tree.get(state, 'first_step')
  assert record['fc2']['kernel'].shape == (6,)  # one group per input row
  record = {
    'fc1': {**record['fc1'], 'kernel': jnp.arange(6, dtype=jnp.int32)},
    'fc2': {**record['fc2'], 'kernel': 10 + jnp.arange(6, dtype=jnp.int32)},
  }
  state = state._replace(first_step=record)
  spec = dl.chain_spec(params, ['fc1', 'fc2'])
  keep = {'fc1': np.array([True, False, True, True, False, True])}
  out = dl.slim(params, spec, keep, opt_state=state)
  new = optax.tree.get(out.opt_state, 'first_step')
  np.testing.assert_array_equal(new['fc1']['kernel'], [0, 2, 3, 5])
  np.testing.assert_array_equal(new['fc2']['kernel'], [10, 12, 13, 15])
  assert out.params['fc2']['kernel'].shape == (4, 3)


def test_square_kernels_have_their_records_cut_along_their_group_axis():
  # Square Dense kernels, where the shape cannot tell rows from columns: the
  # penalty the state records says which axis a per-group record runs along.
  params = {
    'fc0': {'kernel': jnp.ones((4, 6))},
    'fc1': {'kernel': jnp.ones((6, 6))},  # grouped per input row
    'fc2': {'kernel': jnp.ones((6, 6))},  # grouped per output column
    'fc3': {'kernel': jnp.ones((6, 3))},
  }
  rule = dl.penalty_rule(
    dense=dl.GroupLasso(axes=-1),
    overrides={'fc1': dl.GroupLasso(axes=0), 'fc3': dl.Lasso()},
  )
  tx = dl.track_selection(dl.dessilbi(0.1, penalty=rule))
  state = tx.init(params)
  record = {
    name: {'kernel': 10 * i + jnp.arange(6, dtype=jnp.int32)}
    for i, name in enumerate(('fc0', 'fc1', 'fc2'))
  }
  record['fc3'] = optax.tree.get(state, 'first_step')['fc3']
  state = state._replace(first_step=record)
  spec = dl.chain_spec(params, ['fc0', 'fc1', 'fc2', 'fc3'])
  keep = {
    'fc0': np.array([True, False, True, True, False, True]),
    'fc1': np.array([False, True, True, True, True, False]),
  }
  out = dl.slim(params, spec, keep, opt_state=state)
  new = optax.tree.get(out.opt_state, 'first_step')
  np.testing.assert_array_equal(new['fc0']['kernel'], [0, 2, 3, 5])
  # fc1's rows follow fc0's kept outputs; its own outputs do not touch them.
  np.testing.assert_array_equal(new['fc1']['kernel'], [10, 12, 13, 15])
  # fc2's columns stay; its rows (fc1's outputs) are cut.
  np.testing.assert_array_equal(new['fc2']['kernel'], 20 + np.arange(6))
  assert out.params['fc1']['kernel'].shape == (4, 4)
  assert out.params['fc2']['kernel'].shape == (4, 6)
  z = optax.tree.get(out.opt_state, 'z')
  assert z['fc1']['kernel'].shape == (4, 4)


def test_slim_reads_the_penalties_of_every_core_of_a_partition():
  # Two DessiLBI cores (one per optax.partition branch), each with a record:
  # conv2's square-free but per-input groups follow conv1's kept filters.
  params = {
    'conv1': {'kernel': jnp.ones((3, 3, 2, 4))},
    'conv2': {'kernel': jnp.ones((3, 3, 4, 4))},
  }
  rule = dl.penalty_rule(overrides={'conv2': dl.GroupLasso(axes=2)})
  branch = dl.track_selection(dl.dessilbi(0.1, penalty=rule))
  tx = optax.partition({'a': branch, 'b': branch}, {'conv1': 'a', 'conv2': 'b'})
  state = tx.init(params)
  inner = state.inner_states

  def with_record(name, values):
    sel = inner[name].inner_state
    record = {
      **sel.first_step,
      name.replace('a', 'conv1').replace('b', 'conv2'): {
        'kernel': jnp.asarray(values, jnp.int32)
      },
    }
    return inner[name]._replace(inner_state=sel._replace(first_step=record))

  state = state._replace(
    inner_states={
      'a': with_record('a', [0, 1, 2, 3]),
      'b': with_record('b', [10, 11, 12, 13]),
    }
  )
  spec = dl.chain_spec(params, ['conv1', 'conv2'])
  out = dl.slim(
    params,
    spec,
    {'conv1': np.array([True, False, True, False])},
    opt_state=state,
  )
  records = [
    s.inner_state.first_step for s in out.opt_state.inner_states.values()
  ]
  np.testing.assert_array_equal(records[0]['conv1']['kernel'], [0, 2])
  np.testing.assert_array_equal(records[1]['conv2']['kernel'], [10, 12])


def test_reinit_reads_filters_from_weights_whatever_the_groups():
  # conv grouped per input channel, square: input 0 selected gives every
  # output filter a selected weight, so no filter is re-initialised (a
  # per-input support read as per filter would renew filters 1..3).
  kernel = jax.random.normal(jax.random.key(0), (3, 3, 4, 4))
  params = {'conv': {'kernel': kernel}}
  tx = dl.dessilbi(0.1, penalty=dl.penalty_rule(conv=dl.GroupLasso(axes=2)))
  state = tx.init(params)
  gamma = jnp.zeros((3, 3, 4, 4)).at[:, :, 0, :].set(1.0)
  state = optax.tree.set(state, gamma={'conv': {'kernel': gamma}})
  assert dl.support(state, by_group=True)['conv']['kernel'].tolist() == [
    True,
    False,
    False,
    False,
  ]
  new, _ = dl.reinit_unselected(jax.random.key(1), params, state, ['conv'])
  np.testing.assert_array_equal(new['conv']['kernel'], kernel)
  # Nothing selected: every filter is new.
  empty = optax.tree.set(
    state, gamma={'conv': {'kernel': jnp.zeros_like(gamma)}}
  )
  new, _ = dl.reinit_unselected(jax.random.key(1), params, empty, ['conv'])
  assert not np.any(np.isclose(new['conv']['kernel'], kernel))
