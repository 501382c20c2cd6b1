"""Flax NNX and Linen: default penalties pick the right axes, models train."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx
from flax.training import train_state

import dessilbi_jax as dl
from dessilbi_jax._trees import pure


def _data(n=64, seed=0):
  """Images whose class is decided by the sign of one pixel pattern."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, 8, 8, 1)).astype(np.float32)
  y = (x[:, 2:5, 2:5, 0].mean(axis=(1, 2)) > 0).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


class NnxNet(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(1, 6, (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(6, rngs=rngs)
    self.fc = nnx.Linear(6 * 8 * 8, 2, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    return self.fc(x.reshape(x.shape[0], -1))


class LinenNet(linen.Module):
  @linen.compact
  def __call__(self, x):
    x = linen.relu(linen.Conv(6, (3, 3), name='conv1')(x))
    return linen.Dense(2, name='fc')(x.reshape(x.shape[0], -1))


def _check_default_penalties(params, conv_path, fc_path):
  penalties, _ = dl.resolve_penalties(params)
  by_name = {
    dl.path_str(p): choice
    for (p, _), choice in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], penalties, strict=True
    )
  }
  conv = next(v for k, v in by_name.items() if k.startswith(conv_path))
  fc = next(v for k, v in by_name.items() if k.startswith(fc_path))
  assert isinstance(conv, dl.GroupLasso)
  assert conv.reduce_axes(4) == (0, 1, 2)  # one group per output filter (HWIO)
  assert isinstance(fc, dl.Lasso)
  others = [
    v for k, v in by_name.items() if not k.startswith((conv_path, fc_path))
  ]
  others += [v for k, v in by_name.items() if k.endswith('bias')]
  assert others and all(v is None for v in others)


def _assert_filter_groups(gamma_kernel):
  """Each output filter of Γ is all zero or all non-zero (group support)."""
  nz = np.asarray(gamma_kernel != 0).reshape(-1, gamma_kernel.shape[-1])
  assert np.all(nz.all(axis=0) | ~nz.any(axis=0))


def _nnx_step():
  """A jitted NNX train step on the test data; returns the loss."""
  x, y = _data()

  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  return step


def test_nnx_optimizer_trains_with_group_and_elementwise_penalties():
  model = NnxNet(nnx.Rngs(0))
  _check_default_penalties(
    nnx.state(model, nnx.Param), 'conv1/kernel', 'fc/kernel'
  )
  optimizer = nnx.Optimizer(model, dl.dessilbi(0.1, nu=0.5), wrt=nnx.Param)
  step = _nnx_step()
  losses = [float(step(model, optimizer)) for _ in range(60)]
  assert losses[-1] < 0.5 * losses[0]
  gamma = optax.tree.get(pure(optimizer.opt_state), 'gamma')
  kernel = gamma['conv1']['kernel']
  assert kernel.shape == (3, 3, 1, 6)
  _assert_filter_groups(kernel)
  assert (
    0 < int(jnp.sum(gamma['fc']['kernel'] != 0)) < gamma['fc']['kernel'].size
  )
  # Uncoupled leaves (biases, batch-norm) hold no array in Γ.
  assert not jax.tree.leaves(gamma['conv1']['bias'])
  assert not jax.tree.leaves(gamma['bn1'])


def test_linen_train_state_trains_with_group_and_elementwise_penalties():
  model = LinenNet()
  x, y = _data()
  params = model.init(jax.random.key(0), x)['params']
  _check_default_penalties(params, 'conv1/kernel', 'fc/kernel')
  state = train_state.TrainState.create(
    apply_fn=model.apply, params=params, tx=dl.dessilbi(0.1, nu=0.5)
  )

  @jax.jit
  def step(state):
    def loss_fn(params):
      logits = state.apply_fn({'params': params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  for _ in range(60):
    state, loss = step(state)
    losses.append(float(loss))
  assert losses[-1] < 0.5 * losses[0]
  gamma = optax.tree.get(state.opt_state, 'gamma')
  _assert_filter_groups(gamma['conv1']['kernel'])
  assert isinstance(gamma['conv1']['bias'], optax.MaskedNode)
  assert (
    0 < int(jnp.sum(gamma['fc']['kernel'] != 0)) < gamma['fc']['kernel'].size
  )


def test_nnx_optimizer_with_gamma_rebuilt_from_z_follows_the_same_path():
  step = _nnx_step()
  runs = []
  for store_gamma in (True, False):
    model = NnxNet(nnx.Rngs(0))
    tx = dl.dessilbi(0.1, nu=0.5, store_gamma=store_gamma)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    for _ in range(30):
      step(model, optimizer)
    runs.append((nnx.state(model, nnx.Param), optimizer.opt_state))
  (params, stored), (params_z, compact) = runs
  # The same path up to rounding: inside one fused kernel XLA may contract
  # z * scale into the W update instead of rounding Γ first. Over 30 steps
  # that leaves ~1e-7 in entries that are about 0 (biases near zero).
  close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
  jax.tree.map(close, params_z, params)
  gamma = dl.get_gamma(compact)
  jax.tree.map(close, gamma, dl.get_gamma(stored))
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(a != 0, b != 0),
    dl.support(compact),
    dl.support(stored),
  )
  assert int(jnp.sum(gamma['conv1']['kernel'] != 0)) > 0
  scale = optax.tree.get(pure(compact), 'gamma')['conv1']['kernel']
  assert scale.shape == (1, 1, 1, 6)
