"""The multi-tensor Pallas prototype (benchmarks/multitensor.py) follows
``dessilbi`` step for step (Pallas interpret mode on the CPU), and lowers to
Triton kernels for a GPU (one, or two with the conv kernels' rows split)."""

import pathlib
import sys

import jax
import jax.numpy as jnp
import optax
import pytest

import dessilbi_jax as dl

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

from benchmarks import multitensor
from benchmarks.multitensor import dessilbi_multitensor


def _params():
  k = jax.random.split(jax.random.key(0), 4)
  # Widths that are not powers of 2, rows that are not multiples of a tile,
  # a bias (uncoupled), a Dense kernel (lasso) and conv kernels (groups).
  return {
    'conv1': {
      'kernel': jax.random.normal(k[0], (3, 3, 3, 20)),
      'bias': jax.random.normal(k[1], (20,)),
    },
    'conv2': {'kernel': jax.random.normal(k[2], (3, 3, 20, 40))},
    'fc': {'kernel': jax.random.normal(k[3], (70, 10)), 'bias': jnp.zeros(10)},
  }


def _run(tx, params, steps):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    grads = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)), params)
    updates, state = update(grads, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


@pytest.mark.parametrize('store_gamma', [True, False])
# (filters, rows per iteration, rows per program): the last splits conv2's
# 180 rows into chunks of 16 (12 programs per tile, a second kernel for Γ).
@pytest.mark.parametrize('tiles', [(16, 64, None), (8, 8, None), (8, 8, 16)])
def test_follows_dessilbi(store_gamma, tiles):
  # A schedule, read by the kernel at every step: 0.5, 0.5, 0.4, 0.4.
  lr = optax.piecewise_constant_schedule(0.5, {2: 0.8})
  kwargs = dict(
    learning_rate=lr, nu=2.0, weight_decay=1e-2, store_gamma=store_gamma
  )
  params = _params()
  want = _run(dl.dessilbi(**kwargs), params, 4)
  got = _run(
    dessilbi_multitensor(
      **kwargs,
      tile_cols=tiles[0],
      tile_rows=tiles[1],
      chunk_rows=tiles[2],
      block=64,
    ),
    params,
    4,
  )
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)
  # The comparison means something: some filters are selected, not all.
  gamma = dl.expand_gamma(want[1][3].gamma, want[1][3].z)
  filters = jnp.any(gamma['conv1']['kernel'] != 0, axis=(0, 1, 2))
  assert 0 < int(filters.sum()) < 20


@pytest.mark.parametrize('chunk_rows', [None, 64])
@pytest.mark.parametrize('store_gamma', [True, False])
def test_apply_writes_the_new_params(store_gamma, chunk_rows):
  kwargs = dict(learning_rate=0.5, nu=2.0, store_gamma=store_gamma)
  params = _params()
  want_params, want_state = _run(dl.dessilbi(**kwargs), params, 3)
  fused = dessilbi_multitensor(**kwargs, apply=True, chunk_rows=chunk_rows)
  state = fused.init(params)
  step = jax.jit(fused.step)
  got = params
  for t in range(3):
    grads = jax.tree.map(lambda p, t=t: jnp.sin(p * (t + 1)), got)
    got, state = step(grads, state, got)
  for a, b in zip(
    jax.tree.leaves((got, state)),
    jax.tree.leaves((want_params, want_state)),
    strict=True,
  ):
    assert jnp.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_bad_settings_raise_early():
  with pytest.raises(ValueError, match='tile_cols must be a power of 2'):
    dessilbi_multitensor(0.1, tile_cols=12)
  with pytest.raises(ValueError, match='chunk_rows must be None or a power'):
    dessilbi_multitensor(0.1, tile_rows=64, chunk_rows=32)
  with pytest.raises(ValueError, match='needs a momentum'):
    dessilbi_multitensor(0.1, momentum=None)
  # Groups along the input channels: not the layout the kernel supports.
  rule = dl.penalty_rule(conv=dl.GroupLasso(axes=(2,)))
  tx = dessilbi_multitensor(0.1, penalty=rule)
  params = _params()
  with pytest.raises(ValueError, match='all axes but the last'):
    tx.update(params, tx.init(params), params)


@pytest.mark.skipif(
  not hasattr(jax.sharding, 'AbstractDevice'),
  reason='lowering for a GPU without one needs jax.sharding.AbstractDevice',
)
@pytest.mark.parametrize('chunk_rows', [None, 64])
@pytest.mark.parametrize('apply', [False, True])
def test_lowers_to_triton_kernels(apply, chunk_rows):
  # One kernel; with chunk_rows, a second one for Γ.
  params = _params()
  tx = dessilbi_multitensor(
    0.1, apply=apply, chunk_rows=chunk_rows, interpret=False
  )
  state = tx.init(params)
  # Lowering for a GPU on a machine without one: newer JAX versions read the
  # target GPU from the abstract mesh.
  gpu = jax.sharding.AbstractDevice(
    device_kind='NVIDIA H100 80GB HBM3', num_cores=None, platform='gpu'
  )
  with jax.sharding.use_abstract_mesh(
    jax.sharding.AbstractMesh((), (), abstract_device=gpu)
  ):
    lowered = (
      jax.jit(tx.step if apply else tx.update)
      .trace(params, state, params)
      .lower(lowering_platforms=('cuda',))
    )
  text = lowered.as_text()
  assert text.count('stablehlo.custom_call') == (1 if chunk_rows is None else 2)
  assert 'triton' in text.lower()


def test_agreement_check_reports_matches_and_mismatches():
  # The check a GPU run makes before timing the kernel, here in interpret
  # mode: it finds the kernel equal to dessilbi with Γ partly selected.
  params = _params()
  out = multitensor.agreement(params, steps=3)
  assert set(out['results']) == set(multitensor.VARIANTS)
  for row in out['results'].values():
    assert row['ok']
    assert row['params_max_rel'] < 1e-5 and row['state_max_rel'] < 1e-5
    for unit, count in (('filters', 60), ('weights', 700)):
      assert row[unit]['count'] == count
      assert row[unit]['support_mismatches'] == 0
      assert 0.1 < row[unit]['selected_share'] < 0.95
  # And it would see a kernel that got one filter wrong.
  penalties, treedef = dl.resolve_penalties(params, None)
  tx = dl.dessilbi(0.5, nu=2.0)
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(params, state, params)
  gamma = state[3].gamma
  wrong = jax.tree.map(jnp.copy, gamma)
  wrong['conv2']['kernel'] = (
    wrong['conv2']['kernel']
    .at[..., 0]
    .set(1 - (gamma['conv2']['kernel'][..., 0] != 0))
  )
  row = multitensor._compare(
    (params, (*state[:3], state[3]._replace(gamma=wrong))),
    (params, state),
    penalties,
    treedef,
  )
  assert row['filters']['support_mismatches'] == 1 and not row['ok']
  assert row['state_max_abs'] > 0 and row['params_max_abs'] == 0


@pytest.mark.parametrize('state_dtype', [None, jnp.float32])
@pytest.mark.parametrize('apply', [False, True])
def test_bfloat16_params_follow_dessilbi(state_dtype, apply):
  # bfloat16 params and gradients, state in bfloat16 or float32: the kernel
  # computes in float32 and rounds to each output's dtype, where XLA may
  # round intermediate bfloat16 results too; one step then agrees to about a
  # bfloat16 rounding (2^-8 relative). Dropping the weight decay, say, would
  # be off by 3 % in the momentum.
  kwargs = dict(learning_rate=0.5, nu=2.0, weight_decay=1e-2)
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
  grads = jax.tree.map(jnp.sin, params)
  ref = dl.dessilbi(**kwargs, state_dtype=state_dtype)
  state = ref.init(params)
  updates, want_state = jax.jit(ref.update)(grads, state, params)
  want = (optax.apply_updates(params, updates), want_state)
  fused = dessilbi_multitensor(**kwargs, apply=apply)
  if apply:
    got = jax.jit(fused.step)(grads, state, params)
  else:
    updates, got_state = jax.jit(fused.update)(grads, state, params)
    got = (optax.apply_updates(params, updates), got_state)
  gammas = {id(x) for x in jax.tree.leaves(want[1][3].gamma)}
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype
    # With a bfloat16 state, dessilbi computes the shrink factor
    # 1 - λ/‖z_g‖ in bfloat16 too (an absolute error of ~2^-9 on a factor
    # that may be 0.1); the kernel keeps it in float32.
    loose = id(b) in gammas and b.dtype == jnp.bfloat16
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    assert bool(jnp.all((a != 0) == (b != 0)))  # the same support
    tolerance = 2**-4 if loose else 2**-7
    assert float(jnp.max(jnp.abs(a - b))) <= tolerance * float(
      jnp.max(jnp.abs(b))
    )
