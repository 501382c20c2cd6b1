"""Checkpoints with Orbax: stop mid-path, restore, and lose nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import dessilbi_jax as dl


def _problem(width=4):
  """Conv, Dense and bias leaves; a target using half the filters."""
  k = jax.random.split(jax.random.key(0), 3)
  target = {
    'conv': {'kernel': jnp.ones((3, 3, 2, width)) * (jnp.arange(width) < 2)},
    'dense': {
      'kernel': jnp.zeros((width, 3)).at[0, 0].set(2.0),
      'bias': jnp.array([0.5, -0.5, 0.0]),
    },
  }
  params = {
    'conv': {'kernel': 0.01 * jax.random.normal(k[0], (3, 3, 2, width))},
    'dense': {
      'kernel': 0.01 * jax.random.normal(k[1], (width, 3)),
      'bias': jnp.zeros(3),
    },
  }

  def loss(p):
    return sum(
      jnp.sum((a - b) ** 2)
      for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(target), strict=True)
    )

  return params, loss


TX = dl.track_selection(dl.dessilbi(0.05, nu=0.5, weight_decay=1e-4))


def _train(tx, params, state, loss, steps):
  @jax.jit
  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  for _ in range(steps):
    params, state = step(params, state)
  return params, state


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _save(path, params, state):
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, {'params': params, 'opt_state': state})


def _restore(path, target):
  with ocp.StandardCheckpointer() as ckptr:
    return ckptr.restore(path, _abstract(target))


def test_restored_run_continues_exactly(tmp_path):
  params, loss = _problem()
  full = _train(TX, params, TX.init(params), loss, 60)

  half = _train(TX, params, TX.init(params), loss, 30)
  gamma = optax.tree.get(half[1], 'gamma')
  # Mid-path: some filters are in the support, some are not yet.
  selected = jnp.any(gamma['conv']['kernel'] != 0, axis=(0, 1, 2))
  assert 0 < int(selected.sum()) < 4
  _save(tmp_path / 'step30', *half)
  del half

  # A fresh process knows only the model and the optimizer: the target is
  # what tx.init would build, as abstract shapes.
  fresh, _ = _problem()
  target = {'params': fresh, 'opt_state': jax.eval_shape(TX.init, fresh)}
  restored = _restore(tmp_path / 'step30', target)
  state = restored['opt_state']
  assert jax.tree.structure(state) == jax.tree.structure(TX.init(fresh))
  # The uncoupled bias keeps its empty nodes; nothing turned into None.
  assert isinstance(
    optax.tree.get(state, 'z')['dense']['bias'], optax.MaskedNode
  )
  resumed = _train(TX, restored['params'], state, loss, 30)

  jax.tree.map(np.testing.assert_array_equal, resumed, full)
  assert int(optax.tree.get(resumed[1], 'count')) == 60


def test_flax_serialization_round_trip():
  # flax.serialization writes the arrays; the record of penalties is static
  # structure and comes back from the target.
  from flax import serialization

  params, loss = _problem()
  state = _train(TX, params, TX.init(params), loss, 10)[1]
  data = serialization.to_bytes(state)
  restored = serialization.from_bytes(TX.init(params), data)
  assert jax.tree.structure(restored) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  assert dl.get_penalty(restored) == dl.get_penalty(state)
  # Into a target without penalties, and back.
  bare = optax.tree.set(TX.init(params), penalties=None)
  restored = serialization.from_bytes(bare, data)
  assert jax.tree.structure(restored) == jax.tree.structure(bare)
  again = serialization.from_bytes(
    TX.init(params), serialization.to_bytes(bare)
  )
  assert dl.get_penalty(again) == dl.get_penalty(state)


def test_a_step_serialized_with_jax_export_runs_after_loading():
  # The state's tree structure is part of an exported function's calling
  # convention; its NamedTuples are registered as Optax's are, and the
  # penalties it records (static) by the library.
  pytest.importorskip('flatbuffers')  # jax.export's serialization needs it
  from jax import export

  rule = dl.penalty_rule(conv=dl.GroupLasso(lam=0.5, scale_by_size=True))
  tx = dl.track_selection(dl.dessilbi(0.05, nu=0.5, penalty=rule))
  for cls in (
    optax.EmptyState,
    optax.MaskedState,
    optax.TraceState,
    optax.MaskedNode,
    dl.DessiLBIState,
    dl.SelectionState,
  ):
    try:
      export.register_namedtuple_serialization(
        cls, serialized_name=f'{cls.__module__}.{cls.__name__}'
      )
    except ValueError as e:  # registered by an earlier run in this process
      assert 'Duplicate' in str(e)
  params, loss = _problem()
  state = tx.init(params)

  def step(params, state):
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return optax.apply_updates(params, updates), state

  exported = export.export(jax.jit(step))(params, state)
  loaded = export.deserialize(exported.serialize())
  got = loaded.call(params, state)
  assert dl.get_penalty(got[1]) == dl.get_penalty(state)
  jax.tree.map(np.testing.assert_array_equal, got, jax.jit(step)(params, state))


def test_flax_nnx_optimizer_round_trip(tmp_path):
  nnx = pytest.importorskip('flax.nnx')

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.conv = nnx.Conv(2, 4, (3, 3), rngs=rngs)
      self.fc = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
      return self.fc(self.conv(x).mean(axis=(1, 2)))

  x = jax.random.normal(jax.random.key(1), (8, 6, 6, 2))
  y = jax.random.normal(jax.random.key(2), (8, 3))
  tx = dl.dessilbi(0.1, nu=0.5)

  @nnx.jit
  def step(model, optimizer):
    grads = nnx.grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)

  def make():
    model = Net(nnx.Rngs(0))
    return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

  model, optimizer = make()
  for _ in range(10):
    step(model, optimizer)
  _save(tmp_path / 'nnx', nnx.state(model), nnx.state(optimizer))
  for _ in range(10):
    step(model, optimizer)

  model2, optimizer2 = make()  # fresh weights, fresh optimizer state
  restored = _restore(
    tmp_path / 'nnx',
    {'params': nnx.state(model2), 'opt_state': nnx.state(optimizer2)},
  )
  nnx.update(model2, restored['params'])
  nnx.update(optimizer2, restored['opt_state'])
  for _ in range(10):
    step(model2, optimizer2)
  jax.tree.map(
    np.testing.assert_array_equal, nnx.state(model2), nnx.state(model)
  )
  jax.tree.map(
    np.testing.assert_array_equal,
    nnx.state(optimizer2),
    nnx.state(optimizer),
  )


def _shapes(tree):
  """{'a/b/c': shape} for the arrays of a tree (empty nodes hold none)."""
  return {
    jax.tree_util.keystr(p, simple=True, separator='/'): tuple(x.shape)
    for p, x in jax.tree_util.tree_leaves_with_path(tree)
  }


def restore_strict(path, target):
  """Restores after checking that the checkpoint holds exactly the arrays of
  ``target``, with their shapes. Orbax alone compares structures with empty
  nodes as leaves, so it fills a coupled target leaf with None, or skips the
  stored z and Γ of a leaf the target leaves uncoupled, without a word; it
  does refuse other shapes and other containers."""
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)  # a StepMetadata, or the tree before 0.12
    meta = getattr(getattr(meta, 'item_metadata', meta), 'tree', meta)
    stored = _shapes(meta)
    wanted = _shapes(target)
    if stored != wanted:
      diff = sorted(
        k
        for k in stored.keys() | wanted.keys()
        if stored.get(k) != wanted.get(k)
      )
      raise ValueError(
        f'the checkpoint at {path} does not fit the target: '
        + '; '.join(
          f'{k} stored as {stored.get(k, "nothing")}, wanted as '
          f'{wanted.get(k, "nothing")}'
          for k in diff[:5]
        )
      )
    return ckptr.restore(path, _abstract(target))


def test_restoring_into_a_mismatched_structure_fails_clearly(tmp_path):
  params, loss = _problem()
  tx = dl.dessilbi(0.05, nu=0.5)
  _save(tmp_path / 'ckpt', *_train(tx, params, tx.init(params), loss, 5))

  def target(params, tx):
    return {'params': params, 'opt_state': jax.eval_shape(tx.init, params)}

  # An optimizer of another make-up (no momentum): Orbax's structure check.
  no_momentum = dl.dessilbi(0.05, momentum=None)
  with pytest.raises(ValueError, match=r'Structure mismatch|do not match'):
    _restore(tmp_path / 'ckpt', target(params, no_momentum))

  # A penalty rule coupling the bias too. With an abstract target (shapes
  # only) Orbax refuses; with a target carrying shardings (made from concrete
  # arrays, as on several devices) it fills the bias's z and Γ with None, and
  # the optimizer then refuses the state and says where and why.
  every_leaf = dl.dessilbi(0.05, penalty=lambda path, leaf: dl.Lasso())
  with pytest.raises(ValueError, match=r"Structure mismatch.*'z', 'dense'"):
    _restore(tmp_path / 'ckpt', target(params, every_leaf))
  concrete = {'params': params, 'opt_state': every_leaf.init(params)}
  restored = _restore(tmp_path / 'ckpt', concrete)
  assert optax.tree.get(restored['opt_state'], 'z')['dense']['bias'] is None
  with pytest.raises(
    ValueError, match=r"state\.z: leaf 'dense/bias' is coupled .* holds None"
  ):
    every_leaf.update(params, restored['opt_state'], params)
  # A rule coupling nothing: Orbax drops the stored z and Γ silently.
  nothing = dl.dessilbi(0.05, penalty=lambda path, leaf: None)
  for tgt in (
    target(params, nothing),
    {'params': params, 'opt_state': nothing.init(params)},
  ):
    restored = _restore(tmp_path / 'ckpt', tgt)
    assert jax.tree.leaves(optax.tree.get(restored['opt_state'], 'z')) == []

  # restore_strict names the difference in all these cases and for a model
  # of other widths (which Orbax refuses too, array by array), and lets the
  # matching target through.
  wide, _ = _problem(width=8)
  for params_, other, match in (
    (params, every_leaf, r'z/dense/bias stored as nothing, wanted as \(3,\)'),
    (
      params,
      nothing,
      r'z/conv/kernel stored as \(3, 3, 2, 4\), wanted as nothing',
    ),
    (params, no_momentum, r'trace/conv/kernel stored as .*, wanted as nothing'),
    (
      wide,
      tx,
      r'trace/conv/kernel stored as \(3, 3, 2, 4\), wanted as \(3, 3, 2, 8\)',
    ),
  ):
    with pytest.raises(ValueError, match=match):
      restore_strict(tmp_path / 'ckpt', target(params_, other))
  ok = restore_strict(tmp_path / 'ckpt', target(params, tx))
  assert _shapes(ok) == _shapes(target(params, tx))

  # Without a target Orbax gives dicts and lists, which the core rejects.
  core = dl.scale_by_dessilbi(0.05)
  _save(tmp_path / 'core', params, core.init(params))
  with ocp.StandardCheckpointer() as ckptr:
    raw = ckptr.restore(tmp_path / 'core')
  with pytest.raises(TypeError, match='state must be the DessiLBIState'):
    core.update(params, raw['opt_state'], params)
  # So do the full optimizer and the record's wrapper, before the Optax
  # transformations they chain meet the dicts (an AttributeError there).
  for name, tx_ in (
    ('dessilbi', tx),
    ('selection', dl.track_selection(tx)),
  ):
    _save(tmp_path / name, params, tx_.init(params))
    with ocp.StandardCheckpointer() as ckptr:
      raw = ckptr.restore(tmp_path / name)
    with pytest.raises(TypeError, match=r'state must be the .*restore a check'):
      tx_.update(params, raw['opt_state'], params)
