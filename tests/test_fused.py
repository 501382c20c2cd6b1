"""``fused_dessilbi``: its Pallas kernels (interpret mode on the CPU) follow
``dessilbi`` step for step, its state is ``dessilbi``'s, it lowers to a
few Triton kernels for a GPU, and it refuses what it does not support
early."""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl
from tests._small_model import small_params as _params


def _grads(params, t):
  return jax.tree.map(lambda p: jnp.sin(p * (t + 1)), params)


def _run_update(tx, params, steps):
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t in range(steps):
    updates, state = update(_grads(params, t), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _run_step(opt, params, steps):
  state = opt.init(params)
  step = jax.jit(opt.step, donate_argnums=(1, 2))
  params = jax.tree.map(jnp.copy, params)
  for t in range(steps):
    params, state = step(_grads(params, t), state, params)
  return params, state


def _assert_close(got, want, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.shape == b.shape and a.dtype == b.dtype
    assert jnp.allclose(a, b, rtol=rtol, atol=atol)


# (filters per program, rows per iteration, rows per program): conv2's 180
# rows in one program, or in 12 chunks of 16 (and conv1's 27 rows in 2).
TILINGS = [(64, 16, 256), (8, 8, 16)]


# Each pair of choices of the three (Γ stored or not, tiling, update or
# step) once: four runs where all combinations would take eight.
@pytest.mark.parametrize(
  'store_gamma, tiles, apply',
  [
    (True, TILINGS[0], False),
    (True, TILINGS[1], True),
    (False, TILINGS[0], True),
    (False, TILINGS[1], False),
  ],
)
def test_follows_dessilbi(store_gamma, tiles, apply):
  # A schedule, read by the kernels at every step: 0.5, 0.5, 0.4, 0.4.
  lr = optax.piecewise_constant_schedule(0.5, {2: 0.8})
  kwargs = dict(
    learning_rate=lr, nu=2.0, weight_decay=1e-2, store_gamma=store_gamma
  )
  params = _params()
  want = _run_update(dl.dessilbi(**kwargs), params, 4)
  opt = dl.fused_dessilbi(
    **kwargs,
    implementation='pallas',
    tile_cols=tiles[0],
    tile_rows=tiles[1],
    chunk_rows=tiles[2],
    block=64,
  )
  got = _run_step(opt, params, 4) if apply else _run_update(opt, params, 4)
  _assert_close(got, want)
  # The comparison means something: some filters are selected, not all.
  filters = jnp.any(
    dl.get_gamma(want[1])['conv1']['kernel'] != 0, axis=(0, 1, 2)
  )
  assert 0 < int(filters.sum()) < 20


@pytest.mark.parametrize(
  'per_kernel, store_gamma', [(1, True), (2, True), (1, False)]
)
def test_leaves_split_across_launches_follow_dessilbi(per_kernel, store_gamma):
  # Each leaf in a launch of its own, or two conv kernels in one launch and
  # the three others in two.
  kwargs = dict(
    learning_rate=0.5, nu=2.0, weight_decay=1e-2, store_gamma=store_gamma
  )
  params = _params()
  want = _run_update(dl.dessilbi(**kwargs), params, 3)
  opt = dl.fused_dessilbi(
    **kwargs, implementation='pallas', block=64, leaves_per_kernel=per_kernel
  )
  _assert_close(_run_step(opt, params, 3), want)
  jaxpr = str(jax.make_jaxpr(opt.step)(params, opt.init(params), params))
  # Launches of the first kernel (one per kind and per_kernel leaves) and
  # of the second (for the group lassos' launches).
  assert jaxpr.count('pallas_call[') == {1: 5 + 2, 2: 3 + 1}[per_kernel]


def test_the_toolbox_reads_its_state():
  params = _params()
  opt = dl.fused_dessilbi(0.5, nu=2.0, implementation='pallas', block=64)
  _, state = _run_step(opt, params, 3)
  ref = dl.dessilbi(0.5, nu=2.0)
  _, want = _run_update(ref, params, 3)
  support = dl.support(state, by_group=True)
  assert jax.tree.structure(support) == jax.tree.structure(
    dl.support(want, by_group=True)
  )
  for a, b in zip(
    jax.tree.leaves(support),
    jax.tree.leaves(dl.support(want, by_group=True)),
    strict=True,
  ):
    assert bool(jnp.all(a == b))
  # The order of selection is recorded from it as from dessilbi's.
  record = dl.update_selection(dl.init_selection(state), state, step=3)
  for a, b in zip(
    jax.tree.leaves(record),
    jax.tree.leaves(dl.update_selection(dl.init_selection(want), want, step=3)),
    strict=True,
  ):
    assert bool(jnp.all(a == b))
  assert any(bool(jnp.any(r == 3)) for r in jax.tree.leaves(record))
  # And dessilbi steps on from it: the two share one state.
  updates, _ = jax.jit(ref.update)(params, state, params)
  assert jax.tree.structure(updates) == jax.tree.structure(params)


def test_xla_implementation_is_dessilbi():
  params = _params()
  kwargs = dict(learning_rate=0.3, nu=2.0)
  want = _run_update(dl.dessilbi(**kwargs), params, 2)
  for implementation in ('xla', None):  # None: XLA off the GPU
    opt = dl.fused_dessilbi(**kwargs, implementation=implementation)
    if jax.default_backend() != 'gpu' or implementation == 'xla':
      # The same computation (XLA may fuse the applies differently).
      _assert_close(_run_step(opt, params, 2), want)
      _assert_close(_run_update(opt, params, 2), want, rtol=0, atol=0)


def test_groups_of_one_weight_keep_gamma_without_store_gamma():
  # A Dense kernel of one input grouped per output unit: groups of one
  # weight, for which the state keeps Γ itself even with store_gamma=False.
  params = {'w': jax.random.normal(jax.random.key(1), (1, 8)), 'b': jnp.ones(8)}
  rule = dl.penalty_rule(dense=dl.GroupLasso(axes=(-1,), lam=0.3))
  kwargs = dict(learning_rate=0.5, nu=2.0, penalty=rule, store_gamma=False)
  want = _run_update(dl.dessilbi(**kwargs), params, 3)
  opt = dl.fused_dessilbi(**kwargs, implementation='pallas')
  _assert_close(_run_step(opt, params, 3), want)
  gamma = want[1][3].gamma['w']
  assert gamma.shape == (1, 8) and 0 < int(jnp.sum(gamma != 0)) < 8


@pytest.mark.parametrize(
  'mask',
  [
    lambda params: jax.tree.map(lambda x: x.ndim == 1, params),  # biases only
    {'conv1': True, 'conv2': False, 'fc': {'kernel': False, 'bias': True}},
  ],
)
def test_weight_decay_mask(mask):
  params = _params()
  kwargs = dict(learning_rate=0.5, nu=2.0, weight_decay=0.1)
  want = _run_update(dl.dessilbi(**kwargs, weight_decay_mask=mask), params, 2)
  opt = dl.fused_dessilbi(
    **kwargs, weight_decay_mask=mask, implementation='pallas', block=64
  )
  _assert_close(_run_step(opt, params, 2), want)
  # The mask matters here: the default mask gives other params.
  other = _run_update(dl.dessilbi(**kwargs), params, 2)[0]
  assert not jnp.allclose(other['conv1']['bias'], want[0]['conv1']['bias'])


def test_composes_with_optax_chain():
  params = _params()
  kwargs = dict(learning_rate=0.5, nu=2.0)
  clip = optax.clip_by_global_norm(1.0)
  want = _run_update(optax.chain(clip, dl.dessilbi(**kwargs)), params, 2)
  fused = dl.fused_dessilbi(**kwargs, implementation='pallas', block=64)
  got = _run_update(optax.chain(clip, fused), params, 2)
  _assert_close(got, want)


@pytest.mark.parametrize('state_dtype', [None, jnp.float32])
@pytest.mark.parametrize('apply', [False, True])
def test_bfloat16_params_follow_dessilbi(state_dtype, apply):
  # bfloat16 params and gradients, state in bfloat16 or float32: the kernels
  # compute in float32 and round to each output's dtype, where XLA may
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
  fused = dl.fused_dessilbi(
    **kwargs, state_dtype=state_dtype, implementation='pallas'
  )
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
    # that may be 0.1); the kernels keep it in float32.
    loose = id(b) in gammas and b.dtype == jnp.bfloat16
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    assert bool(jnp.all((a != 0) == (b != 0)))  # the same support
    tolerance = 2**-4 if loose else 2**-7
    assert float(jnp.max(jnp.abs(a - b))) <= tolerance * float(
      jnp.max(jnp.abs(b))
    )


def test_float32_gradients_for_bfloat16_params_promote_the_momentum():
  # optax.trace promotes the momentum to the gradients' dtype when no
  # state_dtype fixes it; the kernels write it in that dtype too.
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
  grads = jax.tree.map(lambda p: jnp.sin(p).astype(jnp.float32), params)
  kwargs = dict(learning_rate=0.5, nu=2.0)
  ref = dl.dessilbi(**kwargs)
  state = ref.init(params)
  _, want = jax.jit(ref.update)(grads, state, params)
  fused = dl.fused_dessilbi(**kwargs, implementation='pallas')
  _, got = jax.jit(fused.step)(grads, state, params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype


def test_bad_settings_raise_at_construction():
  with pytest.raises(ValueError, match='tile_cols must be a power of 2'):
    dl.fused_dessilbi(0.1, tile_cols=12)
  with pytest.raises(ValueError, match='chunk_rows must be a power of 2'):
    dl.fused_dessilbi(0.1, chunk_rows=True)
  with pytest.raises(ValueError, match=r'chunk_rows \(32\) must be at least'):
    dl.fused_dessilbi(0.1, tile_rows=64, chunk_rows=32)
  with pytest.raises(ValueError, match='needs a momentum'):
    dl.fused_dessilbi(0.1, momentum=None)
  with pytest.raises(ValueError, match="implementation must be None, 'xla'"):
    dl.fused_dessilbi(0.1, implementation='triton')
  for bad in (0, True, 2.0):
    with pytest.raises(ValueError, match='leaves_per_kernel must be a pos'):
      dl.fused_dessilbi(0.1, leaves_per_kernel=bad)
  dl.fused_dessilbi(0.1, leaves_per_kernel=3)  # any positive int
  with pytest.raises(TypeError, match='interpret must be None or a bool'):
    dl.fused_dessilbi(0.1, interpret='yes')
  # NumPy integers are ints; arrays and other NumPy scalars are not.
  dl.fused_dessilbi(0.1, block=np.int64(1024))
  with pytest.raises(TypeError, match=r'block .* must be a Python int'):
    dl.fused_dessilbi(0.1, block=np.float64(1024))
  with pytest.raises(TypeError, match=r'tile_rows .* must be a Python int'):
    dl.fused_dessilbi(0.1, tile_rows=jnp.asarray(16))
  with pytest.raises(ValueError, match='nu'):  # dessilbi's own checks
    dl.fused_dessilbi(0.1, nu=-1.0)


def test_arguments_after_momentum_are_keyword_only():
  # dessilbi has nesterov after momentum: a positional call copied from it
  # would bind its weight decay to another argument.
  with pytest.raises(TypeError, match='positional'):
    dl.fused_dessilbi(0.1, 1.0, 100.0, 0.9, 5e-4)
  dl.fused_dessilbi(0.1, 1.0, 100.0, 0.9, weight_decay=5e-4)


def test_float64_state_dtype_with_x64_is_refused_at_construction(x64):
  # It used to pass construction and be refused at init.
  with pytest.raises(TypeError, match='state_dtype: fused_dessilbi supports'):
    dl.fused_dessilbi(0.1, state_dtype=jnp.float64)


def test_float64_state_dtype_without_x64_is_float32_as_in_dessilbi():
  params = _params()
  grads = _grads(params, 0)
  ref = dl.dessilbi(0.1, state_dtype=jnp.float64)
  fused = dl.fused_dessilbi(
    0.1, state_dtype=jnp.float64, implementation='pallas'
  )
  # JAX says so, at init, for both.
  with pytest.warns(UserWarning, match='truncated to dtype float32'):
    state = ref.init(params)
  with pytest.warns(UserWarning, match='truncated to dtype float32'):
    fused_state = fused.init(params)
  want_updates, want = ref.update(grads, state, params)
  new_params, got = fused.step(grads, fused_state, params)
  _assert_close(new_params, optax.apply_updates(params, want_updates))
  _assert_close(got, want)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    assert a.dtype == b.dtype


def test_under_inject_hyperparams():
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  untold = optax.inject_hyperparams(dl.fused_dessilbi)(learning_rate=0.1)
  with pytest.raises(TypeError, match=r'block .* Python int.*static_args='):
    untold.init(params)
  # The kernels read their scalars at every step: an injected value changed
  # between steps is the one the next step uses, as in dessilbi.
  runs = []
  for factory, static in (
    (dl.dessilbi, ()),
    (dl.fused_dessilbi, dl.fused.TILING),
  ):
    kwargs = {'implementation': 'pallas'} if static else {}
    opt = optax.inject_hyperparams(factory, static_args=static)(
      learning_rate=0.3, nu=2.0, **kwargs
    )
    state, p = opt.init(params), params
    for nu in (2.0, 0.5):
      state.hyperparams['nu'] = jnp.asarray(nu)
      updates, state = jax.jit(opt.update)(grads, state, p)
      p = optax.apply_updates(p, updates)
    runs.append((p, state.inner_state))
  _assert_close(runs[1], runs[0])


def test_without_a_triton_backend(monkeypatch):
  # JAX 0.12 deprecates Pallas's Triton backend: where it is gone, the
  # default steps with XLA even on a GPU, and 'pallas' says why it can't.
  monkeypatch.setattr(dl.fused, '_triton_backend', lambda: False)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  pallas = dl.fused_dessilbi(0.1, implementation='pallas')
  with pytest.raises(ImportError, match='no Pallas Triton backend'):
    pallas.step(grads, pallas.init(params), params)
  default = dl.fused_dessilbi(0.1)
  state = default.init(params)
  monkeypatch.setattr(dl.fused, '_gpu_backend', lambda: True)
  jaxpr = str(jax.make_jaxpr(default.step)(grads, state, params))
  assert 'pallas_call' not in jaxpr
  # (With the backend, the same trace holds the kernels; a new optimizer,
  # as JAX caches the trace of a function it has seen.)
  monkeypatch.setattr(dl.fused, '_triton_backend', lambda: True)
  default = dl.fused_dessilbi(0.1)
  jaxpr = str(jax.make_jaxpr(default.step)(grads, state, params))
  assert 'pallas_call' in jaxpr


def test_unsupported_inputs_raise_early():
  params = _params()
  # Groups along the input channels: refused at init, before any step.
  rule = dl.penalty_rule(conv=dl.GroupLasso(axes=(2,)))
  with pytest.raises(
    ValueError, match=r"one group per index of the last axis.*'conv1/kernel'"
  ):
    dl.fused_dessilbi(0.1, penalty=rule).init(params)
  opt = dl.fused_dessilbi(0.1, implementation='pallas')
  state = opt.init(params)
  with pytest.raises(ValueError, match='params'):
    opt.update(params, state, None)
  with pytest.raises(TypeError, match='state must be the state'):
    opt.step(params, state[3], params)
  # A state of dessilbi without momentum has no momentum to update.
  with pytest.raises(TypeError, match='state must be the state'):
    opt.step(params, dl.dessilbi(0.1, momentum=None).init(params), params)
  # A momentum buffer of another model is named, as by dessilbi.
  trace = state[2]._replace(trace={**state[2].trace, 'extra': jnp.ones(3)})
  other = (*state[:2], trace, state[3])
  for implementation in ('pallas', 'xla'):
    opt = dl.fused_dessilbi(0.1, implementation=implementation)
    with pytest.raises(ValueError, match=r'momentum \(optax.trace\) does not'):
      opt.step(params, other, params)
  # A traced weight-decay mask cannot choose the kernels' leaves.
  traced = dl.fused_dessilbi(
    0.1,
    weight_decay=0.1,
    weight_decay_mask=lambda p: jax.tree.map(lambda x: jnp.sum(x) > 0, p),
    implementation='pallas',
  )
  with pytest.raises(TypeError, match=r'weight_decay_mask: .*traced'):
    jax.jit(traced.step)(params, traced.init(params), params)


@pytest.mark.skipif(
  not hasattr(jax.sharding, 'AbstractDevice'),
  reason='lowering for a GPU without one needs jax.sharding.AbstractDevice',
)
@pytest.mark.parametrize('apply', [False, True])
@pytest.mark.parametrize('devices', [None, 8])
def test_lowers_to_a_triton_kernel_per_kind(apply, devices):
  params = _params()
  opt = dl.fused_dessilbi(0.1, implementation='pallas', interpret=False)
  state = opt.init(params)
  # Lowering for a GPU on a machine without one: newer JAX versions read the
  # target GPU from the abstract mesh. With 8 GPUs and sharding in types,
  # the replicated params are stepped on each device (a manual computation).
  gpu = jax.sharding.AbstractDevice(
    device_kind='NVIDIA H100 80GB HBM3', num_cores=None, platform='gpu'
  )
  if devices is None:
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=gpu)
  else:
    mesh = jax.sharding.AbstractMesh(
      (devices,),
      ('data',),
      axis_types=(jax.sharding.AxisType.Explicit,),
      abstract_device=gpu,
    )
  with jax.sharding.use_abstract_mesh(mesh):
    lowered = (
      jax.jit(opt.step if apply else opt.update)
      .trace(params, state, params)
      .lower(lowering_platforms=('cuda',))
    )
  text = lowered.as_text()
  # The update kernel for the conv kernels and for the other leaves, the
  # norms kernel, and nothing per leaf but reshapes.
  assert text.count('custom_call @__gpu$xla.gpu.triton') == 3
  assert text.count('name = "dessilbi_fused"') == 2
  assert text.count('name = "dessilbi_fused_norms"') == 1
  if devices is None:  # no other custom call (GSPMD writes shardings as such)
    assert text.count('stablehlo.custom_call') == 3
  # (Shardy's sdy.manual_computation, or GSPMD's {manual} sharding.)
  assert ('manual' in text.lower()) == (devices is not None)


def test_default_is_decided_where_the_step_is_lowered(monkeypatch):
  # In a process with a GPU (pretended here), the default traces both steps
  # and the platform the step is lowered for picks one: arrays on the CPU
  # of such a machine step with XLA, not with kernels compiled for a GPU.
  monkeypatch.setattr(dl.fused, '_gpu_backend', lambda: True)
  params = _params()
  grads = jax.tree.map(lambda x: 0.1 * jnp.ones_like(x), params)
  opt = dl.fused_dessilbi(0.1, nu=1.0)
  xla = dl.fused_dessilbi(0.1, nu=1.0, implementation='xla')
  state = opt.init(params)
  for fn in ('step', 'update'):
    got = jax.jit(getattr(opt, fn))(grads, state, params)
    want = jax.jit(getattr(xla, fn))(grads, state, params)
    _assert_close(got, want, rtol=0, atol=0)
  traced = jax.jit(opt.step).trace(grads, state, params)
  assert 'pallas_call' in str(traced.jaxpr)
  assert 'triton' not in traced.lower(lowering_platforms=('cpu',)).as_text()
  # Lowered for a GPU: the kernels, compiled by Triton (not interpreted).
  # Newer JAX versions read the target GPU from the abstract mesh.
  target = contextlib.nullcontext()
  if hasattr(jax.sharding, 'AbstractDevice'):
    gpu = jax.sharding.AbstractDevice(
      device_kind='NVIDIA H100 80GB HBM3', num_cores=None, platform='gpu'
    )
    mesh = jax.sharding.AbstractMesh((), (), abstract_device=gpu)
    target = jax.sharding.use_abstract_mesh(mesh)
  with target:
    lowered = jax.jit(opt.step).trace(grads, state, params)
    text = lowered.lower(lowering_platforms=('cuda',)).as_text()
  assert text.count('custom_call @__gpu$xla.gpu.triton') == 3


def _follows(kwargs, params, steps=2, state=None, rtol=1e-5, atol=1e-6):
  """The fused step's params and state against dessilbi's, from ``state``
  (or a fresh one)."""
  ref = dl.dessilbi(**kwargs)
  fused = dl.fused_dessilbi(**kwargs, implementation='pallas')

  def ref_step(g, s, p):
    updates, s = ref.update(g, s, p)
    return optax.apply_updates(p, updates), s

  runs = []
  for step in (ref_step, fused.step):
    s = ref.init(params) if state is None else state
    p = params
    for t in range(steps):
      p, s = jax.jit(step)(_grads(p, t), s, p)
    runs.append((p, s))
  _assert_close(runs[1], runs[0], rtol=rtol, atol=atol)
  return runs


def test_kappa_and_other_thresholds_follow_dessilbi():
  # κ ≠ 1 scales Γ and W's step but not z's; thresholds λ·√(group size) and
  # a lasso λ ≠ 1 shrink z; all read as dessilbi reads them.
  rule = dl.penalty_rule(
    conv=dl.GroupLasso(lam=0.15, scale_by_size=True), dense=dl.Lasso(0.4)
  )
  kwargs = dict(learning_rate=0.5, kappa=2.0, nu=3.0, penalty=rule)
  # Steps of 2·0.5 move W by up to ~4 in four steps: float32 roundings of
  # a few 1e-6 (5e-6 at most with JAX 0.7.1, 2e-6 with 0.10).
  runs = _follows(kwargs, _params(), steps=4, atol=2e-5)
  gamma = runs[0][1][3].gamma
  filters = jnp.any(gamma['conv2']['kernel'] != 0, axis=(0, 1, 2))
  assert 0 < int(filters.sum()) < filters.size
  assert 0 < float(jnp.mean(gamma['fc']['kernel'] != 0)) < 1


@pytest.mark.parametrize('store_gamma', [True, False])
def test_leaves_of_size_zero(store_gamma):
  # dessilbi takes them (a layer pruned to nothing); so does the fused step,
  # which leaves them out of the kernels.
  params = {
    'a': jnp.ones((3, 3, 0, 5)),
    'b': jnp.ones((3, 3, 4, 0)),
    'c': jnp.ones((0,)),
    'd': jnp.ones((0, 4)),
    'e': jnp.ones((3, 3, 2, 4)),
  }
  _follows(dict(learning_rate=0.5, nu=2.0, store_gamma=store_gamma), params)


@pytest.mark.parametrize('empty', [(), None])
def test_empty_state_slots_of_uncoupled_leaves(empty):
  # Flax NNX turns optax.MaskedNode() into (), and a restored state may hold
  # None there; dessilbi steps such a state, the fused step too (a leaf of
  # size 0 among them).
  params = {'c': jnp.ones((0,)), 'b': jnp.ones((5,)), 'e': jnp.ones((3, 2))}
  state = dl.dessilbi(0.5, nu=2.0).init(params)
  core, slots = state[3], {'c': empty, 'b': empty}
  state = (
    *state[:3],
    core._replace(z={**core.z, **slots}, gamma={**core.gamma, **slots}),
  )
  runs = _follows(dict(learning_rate=0.5, nu=2.0), params, 1, state)
  assert runs[1][1][3].z['c'] == empty


@pytest.mark.parametrize('store_gamma', [True, False])
def test_a_scalar_group_of_one_weight(store_gamma):
  # GroupLasso(axes=()) on a scalar: one group of one weight, whose group
  # shrinkage is a soft threshold (dessilbi keeps Γ itself there).
  def rule(path, x):
    return dl.GroupLasso(axes=(), lam=0.3) if x.ndim == 0 else None

  params = {'s': jnp.asarray(0.7), 't': jnp.asarray(-0.2), 'b': jnp.ones(3)}
  kwargs = dict(
    learning_rate=0.5, nu=2.0, penalty=rule, store_gamma=store_gamma
  )
  runs = _follows(kwargs, params, steps=3)
  assert runs[1][1][3].gamma['s'].shape == ()


def test_weakly_typed_hyper_parameters_round_to_the_state_dtype():
  # A Python float is weakly typed: optax.trace multiplies a bfloat16
  # momentum by β rounded to bfloat16 (0.9 -> 0.8984375), so the kernels
  # do too. With β in float32, after 10 steps here, the momentum was off by
  # 15 % of its largest value and the float32 params by 2 %; now they agree
  # to the last bit.
  params = _params()
  params = {'fc': params['fc'], 'b': params['conv1']['bias']}
  kwargs = dict(
    learning_rate=0.05, nu=2.0, weight_decay=1e-2, state_dtype=jnp.bfloat16
  )
  _follows(kwargs, params, steps=10, rtol=0, atol=0)


def test_narrow_state_dtype_rounds_only_the_stored_momentum():
  # optax.trace passes on the float32 direction and casts only the momentum
  # it keeps to bfloat16: W moves with the unrounded direction (rounding it
  # first was off by 1e-3 here).
  kwargs = dict(learning_rate=0.5, nu=2.0, state_dtype=jnp.bfloat16)
  # The bfloat16 state agrees to a bfloat16 rounding (Γ and its norms are
  # computed in float32 here), the float32 params to float32 roundings.
  runs = _follows(kwargs, _params(), steps=1, rtol=2**-7, atol=2**-7)
  _assert_close(runs[1][0], runs[0][0], rtol=0, atol=1e-6)
  assert runs[1][1][2].trace['conv1']['kernel'].dtype == jnp.bfloat16


@pytest.mark.parametrize('name', ['momentum', 'weight_decay'])
def test_array_hyper_parameters_promote_as_in_optax(name):
  # A float32 array hyper-parameter (not weakly typed) promotes bfloat16
  # gradients in optax's add_decayed_weights and trace: the momentum is
  # float32 in both optimizers.
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), _params())
  kwargs = dict(learning_rate=0.5, nu=2.0, weight_decay=1e-3)
  kwargs[name] = jnp.asarray(kwargs.get(name, 0.9), jnp.float32)
  runs = _follows(kwargs, params, steps=1, rtol=2**-7, atol=2**-7)
  assert runs[1][1][2].trace['conv1']['kernel'].dtype == jnp.float32


@pytest.mark.parametrize('store_gamma', [True, False])
def test_state_of_the_other_storage_is_read_and_rewritten(store_gamma):
  # A state built with the other store_gamma: read as it is, written as
  # this optimizer keeps Γ (as dessilbi does).
  params = _params()
  other = dl.dessilbi(0.5, nu=2.0, store_gamma=not store_gamma)
  _, state = _run_update(other, params, 2)
  runs = _follows(
    dict(learning_rate=0.5, nu=2.0, store_gamma=store_gamma), params, 1, state
  )
  gamma = runs[1][1][3].gamma['conv2']['kernel']
  assert gamma.shape == ((3, 3, 20, 40) if store_gamma else (1, 1, 1, 40))


def test_thresholds_are_rounded_to_the_state_dtype():
  # With bfloat16 z, dessilbi thresholds at λ rounded to bfloat16 (0.3 ->
  # 0.30078125): z equal to that rounded λ is not selected.
  rule = dl.penalty_rule(conv=dl.GroupLasso(lam=0.3), dense=dl.Lasso(lam=0.3))
  params = {
    'fc': jnp.zeros((2, 2), jnp.bfloat16),
    'conv': jnp.zeros((1, 1, 1, 2), jnp.bfloat16),
  }
  grads = jax.tree.map(jnp.zeros_like, params)
  state = dl.dessilbi(0.1, penalty=rule).init(params)
  z = jax.tree.map(lambda p: jnp.full(p.shape, 0.30078125, p.dtype), params)
  state = (*state[:3], state[3]._replace(z=z))
  fused = dl.fused_dessilbi(0.1, penalty=rule, implementation='pallas')
  _, new = fused.step(grads, state, params)
  for leaf in jax.tree.leaves(new[3].gamma):
    assert not bool(jnp.any(leaf != 0))


def test_zero_weight_decay_adds_nothing():
  # optax.add_decayed_weights skips a literal 0: an inf weight does not
  # turn its momentum into NaN (0·inf).
  params = {'w': jnp.array([[1.0, jnp.inf], [1.0, 1.0]])}
  grads = jax.tree.map(jnp.ones_like, params)
  fused = dl.fused_dessilbi(
    0.1, weight_decay=0.0, penalty=lambda p, x: None, implementation='pallas'
  )
  _, state = fused.step(grads, fused.init(params), params)
  assert bool(jnp.all(state[2].trace['w'] == 1.0))


def test_steps_the_params_of_an_nnx_model():
  # The README's NNX recipe: split out the nnx.Param state, step it, update
  # the model; the same as dessilbi on that state.
  from flax import nnx

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(1, 6, (3, 3), rngs=rngs)
      self.fc = nnx.Linear(6, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc(self.conv(x).mean(axis=(1, 2)))

  model = Net(nnx.Rngs(0))
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  x = jax.random.normal(jax.random.key(1), (4, 5, 5, 1))

  def loss(params):
    return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

  grads = jax.grad(loss)(params)
  fused = dl.fused_dessilbi(0.1, nu=10.0, implementation='pallas')
  new, state = jax.jit(fused.step)(grads, fused.init(params), params)
  ref = dl.dessilbi(0.1, nu=10.0)
  updates, want_state = ref.update(grads, ref.init(params), params)
  _assert_close(
    (new, state), (optax.apply_updates(params, updates), want_state)
  )
  before = jnp.array(model.fc.kernel[...])
  nnx.update(model, new)
  assert jnp.allclose(model.fc.kernel[...], new['fc']['kernel'][...])
  assert not jnp.allclose(model.fc.kernel[...], before)


@pytest.mark.parametrize('implementation', ['pallas', 'xla'])
def test_extra_arguments_are_ignored_as_by_dessilbi(implementation):
  # nnx.Optimizer.update passes its keyword arguments (a loss as value=) on
  # to update; dessilbi ignores them, and a run can switch between the two.
  from flax import nnx

  params = _params()
  fused = dl.fused_dessilbi(0.1, nu=10.0, implementation=implementation)
  state, grads = fused.init(params), _grads(params, 0)
  want = fused.update(grads, state, params)
  _assert_close(fused.update(grads, state, params, value=jnp.float32(2)), want)
  _assert_close(
    fused.step(grads, state, params, value=jnp.float32(2)),
    (optax.apply_updates(params, want[0]), want[1]),
  )
  model = nnx.Linear(3, 4, rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, fused, wrt=nnx.Param)
  before = jnp.array(model.kernel[...])
  grads = nnx.grad(lambda m: jnp.sum(m(jnp.ones((2, 3))) ** 2))(model)
  optimizer.update(model, grads, value=jnp.float32(1))
  assert not jnp.allclose(model.kernel[...], before)


def test_a_mask_function_reads_the_gradients_as_in_optax():
  # optax.add_decayed_weights calls a mask function on the updates (the
  # gradients), not on the params: with bfloat16 params and float32
  # gradients, a mask that reads dtypes decays every leaf.
  params = {'w': jnp.ones((4, 3), jnp.bfloat16), 'b': jnp.ones(3, jnp.bfloat16)}
  grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  kw = dict(
    learning_rate=0.1,
    weight_decay=0.5,
    weight_decay_mask=lambda t: jax.tree.map(
      lambda x: x.dtype == jnp.float32, t
    ),
    penalty=lambda path, leaf: None,
  )
  ref = dl.dessilbi(**kw)
  want = ref.update(grads, ref.init(params), params)[1]
  assert bool(jnp.all(want[2].trace['b'] != 0))
  fused = dl.fused_dessilbi(**kw, implementation='pallas')
  _assert_close(fused.step(grads, fused.init(params), params)[1], want)


def test_the_momentum_is_kept_in_state_dtype_as_optax_trace_keeps_it():
  # A state made with another state_dtype (bfloat16 momentum): the next
  # step casts the new momentum to this optimizer's state_dtype.
  params = _params()
  state = dl.dessilbi(0.1, state_dtype=jnp.bfloat16).init(params)
  grads = _grads(params, 0)
  want = dl.dessilbi(0.1, state_dtype=jnp.float32).update(grads, state, params)
  fused = dl.fused_dessilbi(
    0.1, state_dtype=jnp.float32, implementation='pallas'
  )
  got = fused.step(grads, state, params)[1]
  assert {x.dtype for x in jax.tree.leaves(got[2])} == {jnp.dtype(jnp.float32)}
  _assert_close(got, want[1])


# optax.apply_updates casts to the params' NumPy dtype, float64.
@pytest.mark.filterwarnings('ignore:Explicitly requested dtype float64')
def test_numpy_float64_params_are_stepped_as_jax_types_them():
  # Without x64, JAX types NumPy float64 arrays as float32 (dessilbi and jit
  # do): called eagerly, the kernels take them so, not as float64.
  params = jax.tree.map(lambda p: np.asarray(p, np.float64), _params())
  grads = _grads(jax.tree.map(jnp.asarray, params), 0)
  ref = dl.dessilbi(0.1, nu=10.0)
  updates, want = ref.update(grads, ref.init(params), params)
  fused = dl.fused_dessilbi(0.1, nu=10.0, implementation='pallas')
  _assert_close(
    fused.step(grads, fused.init(params), params),
    (optax.apply_updates(params, updates), want),
  )


def test_optax_tree_map_params_maps_its_state_as_dessilbi_s():
  params = _params()
  fused = dl.fused_dessilbi(0.1, implementation='pallas')
  state = fused.init(params)
  mapped = optax.tree.map_params(fused, lambda x: x.astype(jnp.bfloat16), state)
  ref = dl.dessilbi(0.1)
  want = optax.tree.map_params(ref, lambda x: x.astype(jnp.bfloat16), state)
  _assert_close(mapped, want)
