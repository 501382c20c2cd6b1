"""Numerics at the edges: zero groups, subnormals, huge values, low and high
precision, and a 100,000-step path."""

import functools

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl

LASSO = lambda path, leaf: dl.Lasso()  # noqa: E731
TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32


def _finite(tree):
  return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


def test_zero_norm_groups_are_exact_also_in_gradients():
  """Γ of a zero group is exactly 0, and differentiating through an update
  (as meta-learning or implicit differentiation would) gives no NaN."""
  params = {'conv': jnp.zeros((3, 3, 2, 4)).at[..., 0].set(1.0)}
  rules = [
    dl.penalty_rule(conv=dl.GroupLasso()),
    dl.penalty_rule(conv=dl.GroupLasso(lam=0.0)),
    dl.penalty_rule(conv=dl.GroupLasso(scale_by_size=True)),
  ]
  for rule in rules:
    tx = dl.scale_by_dessilbi(0.5, nu=0.01, penalty=rule)
    state = tx.init(params)

    def total(p, state=state, tx=tx):
      updates, new_state = tx.update(p, state, p)
      return jnp.sum(updates['conv']) + jnp.sum(new_state.gamma['conv'])

    grad = jax.grad(total)(params)
    assert _finite(grad)
    _, new_state = tx.update(params, state, params)
    gamma = new_state.gamma['conv']
    # Filter 0 entered (z = 50 per entry), the three zero filters are exact 0.
    assert bool(jnp.all(gamma[..., 0] != 0))
    assert bool(jnp.all(gamma[..., 1:] == 0))
    # From a zero state and zero params, everything stays exactly zero.
    zero = jax.tree.map(jnp.zeros_like, params)
    updates, s = tx.update(zero, tx.init(zero), zero)
    assert not bool(jnp.any(updates['conv'])) and not bool(
      jnp.any(s.gamma['conv'])
    )
    assert _finite(jax.grad(total)(zero))


def test_subnormal_inputs_behave_as_zero_or_exactly():
  """XLA on the CPU flushes subnormal results to zero: a step on subnormal
  float32 gradients and parameters then moves nothing (a backend that keeps
  subnormals computes them exactly). Either way nothing is NaN, and z that
  small never enters the support: the square of a subnormal group's norm
  underflows to 0, and Γ is exactly 0."""
  sub = 1e-39
  assert 0 < np.float32(sub) < TINY
  params = {
    'dense': jnp.full((2, 3), sub, jnp.float32).at[0, 0].set(1.0),
    'conv': jnp.full((1, 1, 2, 3), sub, jnp.float32),
  }
  grads = jax.tree.map(lambda p: jnp.full(p.shape, sub, jnp.float32), params)
  tx = dl.scale_by_dessilbi(0.1, nu=1.0)
  state = tx.init(params)
  for _ in range(3):
    # exact = -0.1·(g + (W - Γ)/ν), in float64
    exact = jax.tree.map(
      lambda g, w, gm: -0.1 * (np.float64(g) + np.float64(w) - gm),
      grads,
      params,
      state.gamma,
    )
    updates, state = tx.update(grads, state, params)
    jax.tree.map(
      lambda u, e: np.testing.assert_allclose(u, e, rtol=1e-6, atol=TINY),
      updates,
      exact,
    )
    if jax.default_backend() == 'cpu':  # flushed to zero
      assert not bool(jnp.any(updates['conv']))
      assert not bool(jnp.any(state.z['conv']))
    params = optax.apply_updates(params, updates)
  assert _finite((params, state))
  assert not bool(jnp.any(state.gamma['conv']))
  assert not bool(jnp.any(state.gamma['dense']))
  # A subnormal z (set by hand) in a group with λ = 0 still gives no NaN.
  z = jnp.full((1, 1, 2, 3), sub, jnp.float32)
  assert _finite(dl.prox(z, dl.GroupLasso(lam=0.0)))


def test_huge_values_stay_finite_and_exact():
  """Squares of large z overflow in a group norm; the shrink factor is then
  1, which is what the exact factor 1 - λ/‖z_g‖ rounds to anyway."""
  f32max = float(np.finfo(np.float32).max)
  z = jnp.full((1, 1, 4, 2), 1e20, jnp.float32).at[..., 1].set(-3e37)
  gamma = dl.prox(z, dl.GroupLasso())
  np.testing.assert_array_equal(gamma, z)  # ‖z_g‖² = inf, Γ = z exactly
  np.testing.assert_array_equal(
    dl.prox(jnp.array([f32max, -f32max]), dl.Lasso()),
    jnp.array([f32max, -f32max]),  # max - 1 rounds back to max
  )
  # A full step with huge params, z and gradients: finite, formula-exact.
  tx = dl.scale_by_dessilbi(1e-3, nu=10.0)
  params = {'conv': z, 'dense': jnp.full((2, 2), 1e30)}
  grads = {'conv': jnp.full(z.shape, 1e37), 'dense': jnp.full((2, 2), 1e36)}
  state = tx.init(params)
  updates, state = tx.update(grads, state, params)
  assert _finite((updates, state))
  np.testing.assert_allclose(updates['dense'], -1e-3 * (1e36 + 1e30 / 10))
  np.testing.assert_allclose(state.z['conv'], 1e-4 * z, rtol=1e-6)
  # In float16 (max 65504) a group of z = 200s already overflows its norm;
  # Γ = z then differs from the exact shrink by λ/‖z_g‖ (0.2 % here).
  z16 = jnp.full((1, 1, 6, 2), 200.0, jnp.float16)
  exact = dl.prox(z16.astype(jnp.float32), dl.GroupLasso())
  got = dl.prox(z16, dl.GroupLasso())
  assert got.dtype == jnp.float16 and _finite(got)
  np.testing.assert_allclose(got.astype(jnp.float32), exact, rtol=3e-3)


def _regression(dtype, steps, state_dtype=None):
  """A conv-, dense- and bias-shaped regression with a sparse target."""
  target = {
    'conv': jnp.zeros((3, 3, 2, 4)).at[..., :2].set(0.5),
    'dense': jnp.zeros((4, 3)).at[0, 0].set(2.0).at[3, 2].set(-1.5),
    'bias': jnp.array([0.5, -0.5, 0.0]),
  }
  keys = dict(zip(target, jax.random.split(jax.random.key(0), 3), strict=True))
  params = {
    k: (0.01 * jax.random.normal(keys[k], t.shape)).astype(dtype)
    for k, t in target.items()
  }

  def loss(p):
    return sum(
      jnp.sum((p[k].astype(jnp.float32) - target[k]) ** 2) for k in target
    )

  tx = dl.dessilbi(0.02, nu=0.5, state_dtype=state_dtype)

  @jax.jit
  def run(params):
    def step(carry, _):
      params, state = carry
      updates, state = tx.update(jax.grad(loss)(params), state, params)
      return (optax.apply_updates(params, updates), state), None

    return jax.lax.scan(step, (params, tx.init(params)), length=steps)[0]

  return run(params)


@functools.cache
def _reference():
  return _regression(jnp.float32, 150)


@pytest.mark.parametrize(
  'dtype, state_dtype, atol',
  [
    (jnp.bfloat16, jnp.float32, 0.02),
    (jnp.bfloat16, None, 0.05),
    (jnp.float16, jnp.float32, 0.005),
    (jnp.float16, None, 0.02),
  ],
)
def test_low_precision_params_follow_the_float32_path(dtype, state_dtype, atol):
  ref_params, ref_state = _reference()
  params, state = _regression(dtype, 150, state_dtype)
  assert all(p.dtype == dtype for p in jax.tree.leaves(params))
  z_dtype = dtype if state_dtype is None else state_dtype
  assert all(
    z.dtype == z_dtype for z in jax.tree.leaves(optax.tree.get(state, 'z'))
  )
  assert _finite((params, state))
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(
      np.asarray(a, np.float32), b, atol=atol
    ),
    params,
    ref_params,
  )
  # The same structure is selected (some of it, not all).
  support = lambda s: jax.tree.map(  # noqa: E731
    lambda g: np.asarray(g != 0), optax.tree.get(s, 'gamma')
  )
  ref = np.concatenate([s.ravel() for s in jax.tree.leaves(support(ref_state))])
  assert 0 < ref.sum() < ref.size
  jax.tree.map(
    np.testing.assert_array_equal, support(state), support(ref_state)
  )


def test_float64_matches_numpy_and_float32_stays_float32(x64):
  params = {
    'conv': jnp.linspace(-1, 1, 24, dtype=jnp.float64).reshape(1, 2, 3, 4),
    'dense': jnp.linspace(-2, 2, 6, dtype=jnp.float64).reshape(2, 3),
  }
  grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
  lr, kappa, nu = 0.3, 2.0, 0.7
  tx = dl.scale_by_dessilbi(lr, kappa=kappa, nu=nu)
  state = tx.init(params)
  w = {k: np.asarray(v) for k, v in params.items()}
  z = {k: np.zeros_like(v) for k, v in w.items()}
  g = {k: np.zeros_like(v) for k, v in w.items()}
  for _ in range(5):
    grads = jax.tree.map(lambda p: jnp.cos(3 * p), params)
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
    for k in w:  # the same step in NumPy float64
      d = np.cos(3 * w[k])
      diff = w[k] - g[k]
      w[k] = w[k] - kappa * lr * (d + diff / nu)
      z[k] = z[k] + lr / nu * diff
      if k == 'conv':
        norm = np.sqrt(np.sum(z[k] ** 2, axis=(0, 1, 2), keepdims=True))
        factor = np.where(norm > 1, 1 - 1 / np.maximum(norm, 1e-300), 0)
        g[k] = kappa * z[k] * factor
      else:
        g[k] = kappa * np.sign(z[k]) * np.maximum(np.abs(z[k]) - 1, 0)
  for k in w:
    assert params[k].dtype == jnp.float64
    np.testing.assert_allclose(params[k], w[k], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.z[k], z[k], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.gamma[k], g[k], rtol=1e-12, atol=1e-12)
  assert any(bool(jnp.any(x != 0)) for x in jax.tree.leaves(state.gamma))
  # float32 params under x64, with a schedule (float64 values): still float32.
  p32 = jax.tree.map(lambda p: p.astype(jnp.float32), params)
  tx = dl.dessilbi(optax.cosine_decay_schedule(0.1, 10), nu=1.0)
  updates, state = jax.jit(tx.update)(p32, tx.init(p32), p32)
  for tree in (
    updates,
    optax.tree.get(state, 'z'),
    optax.tree.get(state, 'gamma'),
  ):
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(tree))


def _conv_run(steps):
  """A conv kernel after ``steps`` DessiLBI steps (ν small, so Γ is non-zero
  after a few), and the optimizer and its jitted update."""
  rng = np.random.default_rng(0)
  params = {'conv': jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32)}
  grads = {'conv': jnp.asarray(rng.normal(size=(3, 3, 8, 16)), jnp.float32)}
  tx = dl.scale_by_dessilbi(0.37, nu=0.33)
  update = jax.jit(tx.update)
  state = tx.init(params)
  for _ in range(steps):
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, grads, state, tx, update


def test_z_step_is_z_plus_step_times_w_minus_gamma_exactly():
  """scale_by_dessilbi writes z's step from Γ - W (see the next test); its
  numbers are those of z + (α/ν)(W - Γ) compiled the same way, bit for
  bit."""
  params, grads, state, _, update = _conv_run(3)
  assert bool(jnp.any(state.gamma['conv'] != 0))
  _, new = update(grads, state, params)
  expected = jax.jit(lambda z, w, g: z + (jnp.float32(0.37) / 0.33) * (w - g))(
    state.z['conv'], params['conv'], state.gamma['conv']
  )
  np.testing.assert_array_equal(new.z['conv'], expected)


def test_z_step_shares_no_w_minus_gamma_with_the_update():
  """The update's W - Γ and z's difference are separate operations, so XLA
  cannot share one between them (on a GPU it would then compute z's path
  in cuDNN's filter layout: a kernel more per conv kernel, and a slower
  compile; benchmarks/README.md)."""
  params, grads, state, tx, _ = _conv_run(0)
  args = (grads, state, params)
  closed, out_shape = jax.make_jaxpr(tx.update, return_shape=True)(*args)
  jaxpr = closed.jaxpr
  leaves = jax.tree.leaves(args)
  w_var = jaxpr.invars[
    next(i for i, x in enumerate(leaves) if x is params['conv'])
  ]
  g_var = jaxpr.invars[
    next(i for i, x in enumerate(leaves) if x is state.gamma['conv'])
  ]
  out_paths = [
    jax.tree_util.keystr(path)
    for path, _ in jax.tree_util.tree_flatten_with_path(out_shape)[0]
  ]
  z_out = jaxpr.outvars[out_paths.index("[1].z['conv']")]
  update_out = jaxpr.outvars[out_paths.index("[0]['conv']")]
  producer = {v: e for e in jaxpr.eqns for v in e.outvars}

  def differences(var):
    """The subtractions of W and Γ that ``var`` is computed from."""
    found, todo, seen = set(), [var], set()
    while todo:
      v = todo.pop()
      e = producer.get(v)
      if e is None or id(e) in seen:
        continue
      seen.add(id(e))
      if e.primitive.name == 'sub' and set(e.invars) == {w_var, g_var}:
        found.add(id(e))
      todo.extend(x for x in e.invars if not isinstance(x, jex.core.Literal))
    return found

  assert differences(z_out) and differences(update_out)
  assert not differences(z_out) & differences(update_out)


def test_a_100k_step_scan_stays_finite_with_a_sane_support_path():
  """Sparse linear regression (n = 80, p = 20, 4 true variables, a little
  noise) along 100,000 DessiLBI steps inside one lax.scan: the true variables
  enter first, the support only grows, everything stays finite, and late on
  the path W fits the true coefficients."""
  n, p = 80, 20
  k1, k2 = jax.random.split(jax.random.key(0))
  x = jax.random.normal(k1, (n, p)) / jnp.sqrt(n)
  true = jnp.array([2, 7, 11, 16])
  beta = jnp.zeros(p).at[true].set(jnp.array([3.0, -2.5, 2.0, -1.5]))
  y = x @ beta + 0.05 * jax.random.normal(k2, (n,))
  tx = dl.scale_by_dessilbi(1e-3, nu=1.0, penalty=LASSO)

  def loss(w):
    return 0.5 * jnp.sum((x @ w['w'] - y) ** 2)

  @jax.jit
  def path(w):
    def step(carry, _):
      w, state = carry
      updates, state = tx.update(jax.grad(loss)(w), state, w)
      return (optax.apply_updates(w, updates), state), None

    def block(carry, _):  # 1,000 steps, then one record
      carry = jax.lax.scan(step, carry, length=1000)[0]
      return carry, (carry[1].gamma['w'] != 0, _finite_traced(carry))

    return jax.lax.scan(block, (w, tx.init(w)), length=100)

  (w, state), (support, finite) = path({'w': jnp.zeros(p)})
  support = np.asarray(support)
  assert int(state.count) == 100_000
  assert bool(np.all(finite))
  sizes = support.sum(axis=1)
  assert np.all(np.diff(sizes) >= 0), sizes  # the support only grows
  first = np.argmax(sizes > 0)
  assert set(np.flatnonzero(support[first])) == set(np.asarray(true).tolist())
  assert 4 < sizes[-1] < p  # noise variables enter late, not all of them
  np.testing.assert_allclose(w['w'][true], beta[true], atol=0.2)


def _finite_traced(tree):
  return jnp.all(
    jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)])
  )
