"""Bad input, part 2: trees that do not fit together, dtypes, odd leaves.

Each bad input is answered by an early error naming the argument (``updates``,
``state.z``, ``params``, ``state_dtype``…) and the leaf; the odd but valid
inputs (empty trees, scalar leaves, zero-size leaves, NumPy arrays, abstract
shapes) are handled correctly. The checks look at structures, shapes and
dtypes only, so they also fire while tracing under ``jax.jit``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl
from dessilbi_jax import _checks

PARAMS = {
  'conv': {'kernel': jnp.ones((3, 3, 2, 4))},
  'dense': {'kernel': jnp.ones((4, 3)), 'bias': jnp.ones(3)},
}
CORE = dl.scale_by_dessilbi(0.1, nu=2.0)


def _with(tree, path, value):
  """A copy of a two-level dict tree with ``tree[a][b] = value``."""
  a, b = path.split('/')
  out = {k: dict(v) for k, v in tree.items()}
  if value is _DROP:
    del out[a][b]
  else:
    out[a][b] = value
  return out


_DROP = object()
OTHER_WIDTHS = _with(PARAMS, 'conv/kernel', jnp.ones((3, 3, 2, 8)))
OTHER_NAMES = {'conv1': PARAMS['conv'], 'dense': PARAMS['dense']}
ALL_LASSO = dl.scale_by_dessilbi(0.1, penalty=lambda path, leaf: dl.Lasso())
NONE_COUPLED = dl.scale_by_dessilbi(0.1, penalty=lambda path, leaf: None)
STATE = CORE.init(PARAMS)


# (id, updates, state, params, error, message)
UPDATE_CASES = [
  (
    'grads_missing_a_leaf',
    _with(PARAMS, 'dense/bias', _DROP),
    STATE,
    PARAMS,
    ValueError,
    r"updates does not have the structure of params: missing \['dense/bias'\]",
  ),
  (
    'grads_with_an_extra_leaf',
    _with(PARAMS, 'dense/scale', jnp.ones(3)),
    STATE,
    PARAMS,
    ValueError,
    r"updates .* unexpected \['dense/scale'\]",
  ),
  (
    'grads_in_a_list_instead_of_a_dict',
    jax.tree.leaves(PARAMS),
    STATE,
    PARAMS,
    ValueError,
    'updates does not have the structure of params',
  ),
  (
    'grads_with_a_none_leaf',
    _with(PARAMS, 'dense/bias', None),
    STATE,
    PARAMS,
    TypeError,
    r"updates: leaf 'dense/bias' is None; expected an array of shape \(3,\)",
  ),
  (
    'grads_transposed',
    _with(PARAMS, 'dense/kernel', jnp.ones((3, 4))),
    STATE,
    PARAMS,
    ValueError,
    r"updates: leaf 'dense/kernel' has shape \(3, 4\), its parameter \(4, 3\)",
  ),
  (
    # Broadcasting would have hidden this one: the update had the right shape.
    'grads_broadcastable_to_a_coupled_leaf',
    _with(PARAMS, 'dense/kernel', jnp.ones(3)),
    STATE,
    PARAMS,
    ValueError,
    r"updates: leaf 'dense/kernel' has shape \(3,\)",
  ),
  (
    # ... and here the update had the gradient's shape, (1,).
    'grads_of_size_one_for_an_uncoupled_leaf',
    _with(PARAMS, 'dense/bias', jnp.ones(1)),
    STATE,
    PARAMS,
    ValueError,
    r"updates: leaf 'dense/bias' has shape \(1,\), its parameter \(3,\)",
  ),
  (
    'grads_of_integer_dtype',
    _with(PARAMS, 'dense/kernel', jnp.ones((4, 3), jnp.int32)),
    STATE,
    PARAMS,
    TypeError,
    r"updates: leaf 'dense/kernel' has dtype int32",
  ),
  (
    # Casting to the params' dtype would silently drop the imaginary part.
    'grads_of_complex_dtype',
    _with(PARAMS, 'dense/kernel', jnp.ones((4, 3), jnp.complex64)),
    STATE,
    PARAMS,
    TypeError,
    r"updates: leaf 'dense/kernel' has dtype complex64",
  ),
  (
    'grads_of_float0_dtype',
    _with(PARAMS, 'dense/bias', np.zeros(3, jax.dtypes.float0)),
    STATE,
    PARAMS,
    TypeError,
    r"updates: leaf 'dense/bias' has dtype float0.*allow_int",
  ),
  (
    'state_of_a_model_with_other_widths',
    OTHER_WIDTHS,
    STATE,
    OTHER_WIDTHS,
    ValueError,
    r"state.z: leaf 'conv/kernel' has shape \(3, 3, 2, 4\), its parameter "
    r'\(3, 3, 2, 8\): the state belongs to another model',
  ),
  (
    'state_of_a_model_with_other_names',
    OTHER_NAMES,
    STATE,
    OTHER_NAMES,
    ValueError,
    r"state.z does not have the structure of params: missing \['conv1/kernel'\]",
  ),
  (
    'state_of_a_rule_coupling_fewer_leaves',
    PARAMS,
    NONE_COUPLED.init(PARAMS),
    PARAMS,
    ValueError,
    r"state.z: leaf 'conv/kernel' is coupled .* holds a MaskedNode",
  ),
  (
    'state_of_a_rule_coupling_more_leaves',
    PARAMS,
    ALL_LASSO.init(PARAMS),
    PARAMS,
    ValueError,
    r"state.z: leaf 'dense/bias' is not coupled .* holds an array of shape",
  ),
  (
    'state_of_the_whole_chain_given_to_the_core',
    PARAMS,
    dl.dessilbi(0.1).init(PARAMS),
    PARAMS,
    TypeError,
    'state must be the DessiLBIState that init returned, got tuple',
  ),
  (
    # What a checkpoint restored without a target looks like.
    'state_as_a_plain_dict',
    PARAMS,
    STATE._asdict(),
    PARAMS,
    TypeError,
    'state must be the DessiLBIState .* got dict.*eval_shape',
  ),
  (
    'state_with_gamma_missing_at_a_coupled_leaf',
    PARAMS,
    STATE._replace(gamma=_with(STATE.gamma, 'dense/kernel', None)),
    PARAMS,
    ValueError,
    r"state.gamma: leaf 'dense/kernel' is coupled .* holds None",
  ),
  (
    'state_with_integer_z',
    PARAMS,
    STATE._replace(
      z=_with(STATE.z, 'dense/kernel', jnp.zeros((4, 3), jnp.int32))
    ),
    PARAMS,
    TypeError,
    r"state.z: leaf 'dense/kernel' has dtype int32",
  ),
  (
    'state_with_a_batch_of_counts',
    PARAMS,
    STATE._replace(count=jnp.zeros(2, jnp.int32)),
    PARAMS,
    ValueError,
    r'state.count must be a scalar, got shape \(2,\)',
  ),
]


@pytest.mark.parametrize(
  'updates, state, params, error, match',
  [pytest.param(*case[1:], id=case[0]) for case in UPDATE_CASES],
)
def test_update_rejects_trees_that_do_not_fit(
  updates, state, params, error, match
):
  with pytest.raises(error, match=match):
    CORE.update(updates, state, params)


def test_checks_fire_while_tracing_and_cost_nothing_compiled(monkeypatch):
  bad = _with(PARAMS, 'dense/kernel', jnp.ones(3))
  with pytest.raises(ValueError, match="updates: leaf 'dense/kernel'"):
    jax.jit(CORE.update)(bad, STATE, PARAMS)
  with pytest.raises(ValueError, match=r"state\.z: leaf 'conv/kernel'"):
    jax.jit(CORE.update)(OTHER_WIDTHS, STATE, OTHER_WIDTHS)
  # The compiled update is the same program with or without the checks.
  checked = jax.jit(CORE.update).lower(PARAMS, STATE, PARAMS).as_text()
  monkeypatch.setattr(_checks, 'check_update_trees', lambda *args: None)
  unchecked = jax.jit(CORE.update).lower(PARAMS, STATE, PARAMS).as_text()
  assert checked == unchecked


def test_full_optimizer_reports_a_state_of_another_rule():
  state = dl.dessilbi(0.1, penalty=lambda path, leaf: dl.Lasso()).init(PARAMS)
  with pytest.raises(ValueError, match=r"state\.z: leaf 'dense/bias' is not"):
    dl.dessilbi(0.1).update(PARAMS, state, PARAMS)


@pytest.mark.parametrize(
  'params, match',
  [
    (OTHER_NAMES, r'\(optax.trace\) does not have the structure of params: '),
    (
      OTHER_WIDTHS,
      r"\(optax.trace\): leaf 'conv/kernel' is an array of shape ",
    ),
  ],
  ids=['other_names', 'other_widths'],
)
def test_full_optimizer_names_a_momentum_of_another_model(params, match):
  # optax.trace used to fail first, with JAX's pytree or broadcasting error.
  tx = dl.dessilbi(0.1)
  grads = jax.tree.map(jnp.ones_like, params)
  with pytest.raises(ValueError, match=r'state: the momentum ' + match):
    jax.jit(tx.update)(grads, tx.init(PARAMS), params)


def test_a_state_of_another_model_names_the_leaves_not_the_none_fields():
  # Equinox's eqx.filter leaves None for fields that hold no array (an
  # activation, a missing bias): they are no leaf that a state lacks.
  params = {'conv': jnp.ones((3, 3, 1, 2)), 'act': None, 'fc': jnp.ones((2, 3))}
  tx = dl.dessilbi(0.1)
  with pytest.raises(ValueError) as raised:
    tx.update(params, tx.init({'other': jnp.ones((3, 3, 1, 2))}), params)
  assert "missing ['conv', 'fc']; unexpected ['other']" in str(raised.value)


def test_full_optimizer_rejects_a_broadcastable_gradient():
  bad = _with(PARAMS, 'dense/kernel', jnp.ones(3))
  tx = dl.dessilbi(0.1)
  with pytest.raises(ValueError, match="updates: leaf 'dense/kernel'"):
    tx.update(bad, tx.init(PARAMS), PARAMS)


@pytest.mark.parametrize(
  'make, error, match',
  [
    pytest.param(
      lambda: CORE.init({'w': jnp.ones((2, 2)), 'scale': 1.0}),
      TypeError,
      r"params: leaf 'scale' is a Python float, not an array.*jnp.asarray",
      id='python_float_leaf',
    ),
    pytest.param(
      lambda: dl.resolve_penalties({'w': jnp.ones((2, 2)), 'scale': 1.0}),
      TypeError,
      r"params: leaf 'scale' is a Python float",
      id='python_float_leaf_resolved',
    ),
    pytest.param(
      lambda: CORE.init({'w': jnp.ones((2, 2)), 'name': 'conv'}),
      TypeError,
      r"params: leaf 'name' is a str, not an array",
      id='string_leaf',  # used to be copied into z
    ),
    pytest.param(
      lambda: dl.dessilbi(0.1).init({'w': jnp.ones((2, 2)), 'f': object()}),
      TypeError,
      r"params: leaf 'f' is an object, not an array",
      id='object_leaf_before_the_mask_reads_it',
    ),
    pytest.param(
      lambda: CORE.init('conv'),
      TypeError,
      r"params: leaf '<root>' is a str, not an array",
      id='params_a_lone_string',  # used to become z and Γ
    ),
    pytest.param(
      lambda: dl.dessilbi(0.1).init(object()),
      TypeError,
      r"params: leaf '<root>' is an object, not an array",
      id='params_a_lone_object',
    ),
    pytest.param(
      lambda: CORE.init({'w': [1.0, 2.0]}),
      TypeError,
      r"params: leaf 'w/0' is a Python float",
      id='list_of_floats_as_a_leaf',
    ),
    pytest.param(
      lambda: CORE.init({'w': jnp.ones((2, 2), jnp.complex64)}),
      TypeError,
      r"params: leaf 'w' has dtype complex64",
      id='complex_params',
    ),
    pytest.param(
      lambda: CORE.update(PARAMS, STATE, _with(PARAMS, 'dense/bias', 0.5)),
      TypeError,
      r"params: leaf 'dense/bias' is a Python float",
      id='python_float_params_at_update',
    ),
    pytest.param(
      lambda: dl.dessilbi(0.1, state_dtype=jnp.int32),
      TypeError,
      'state_dtype must be a floating-point dtype or None, got int32',
      id='integer_state_dtype',
    ),
    pytest.param(
      lambda: dl.scale_by_dessilbi(0.1, state_dtype='float33'),
      TypeError,
      "state_dtype must be a floating-point dtype or None, got 'float33'",
      id='unknown_state_dtype',
    ),
    pytest.param(
      lambda: dl.scale_by_dessilbi(
        0.1, penalty=lambda path, leaf: dl.GroupLasso()
      ).init({'s': jnp.ones(())}),
      ValueError,
      r"penalty: for leaf 's' of shape \(\).*rank 0",
      id='group_lasso_on_a_scalar',
    ),
  ],
)
def test_params_and_dtypes_are_checked(make, error, match):
  with pytest.raises(error, match=match):
    make()


def _check_one_step(tx, params, grads):
  """One jitted and one eager step: same result, right shapes and dtypes."""
  state = tx.init(params)
  eager = tx.update(grads, state, params)
  jitted = jax.jit(tx.update)(grads, state, params)
  jax.tree.map(np.testing.assert_array_equal, eager, jitted)
  updates, new_state = eager
  assert jax.tree.structure(updates) == jax.tree.structure(params)
  for u, p in zip(
    jax.tree.leaves(updates), jax.tree.leaves(params), strict=True
  ):
    assert u.shape == p.shape and u.dtype == p.dtype
    assert bool(jnp.all(jnp.isfinite(u)))
  assert int(optax.tree.get(new_state, 'count')) == 1
  return updates, new_state


@pytest.mark.parametrize('params', [{}, [], {'a': {}, 'b': None}])
def test_empty_trees_are_valid(params):
  for tx in (CORE, dl.dessilbi(0.1), dl.track_selection(dl.dessilbi(0.1))):
    updates, _ = _check_one_step(tx, params, params)
    assert updates == params


def test_scalar_leaves_uncoupled_or_coupled():
  params, grads = {'s': jnp.array(2.0)}, {'s': jnp.array(3.0)}
  # Uncoupled by default: a plain step -κα·d.
  tx = dl.scale_by_dessilbi(0.5, kappa=2.0)
  updates, state = _check_one_step(tx, params, grads)
  assert float(updates['s']) == -3.0
  assert isinstance(state.z['s'], optax.MaskedNode)
  # Coupled elementwise by a rule: the formula, with z and Γ scalars too.
  tx = dl.scale_by_dessilbi(
    0.5, kappa=2.0, nu=0.1, penalty=lambda path, leaf: dl.Lasso(lam=1.0)
  )
  updates, state = _check_one_step(tx, params, grads)
  # W - Γ = 2, z = 0.5/0.1·2 = 10, Γ = 2·soft(10, 1) = 18.
  np.testing.assert_allclose(updates['s'], -1.0 * (3.0 + 2.0 / 0.1))
  np.testing.assert_allclose(state.z['s'], 10.0)
  np.testing.assert_allclose(state.gamma['s'], 18.0)


@pytest.mark.parametrize(
  'shape',
  [(0, 3), (3, 0), (3, 3, 0, 4), (3, 3, 2, 0), (0,)],
  ids=[
    'dense_no_inputs',
    'dense_no_outputs',
    'conv_empty_groups',
    'conv_no_filters',
    'bias',
  ],
)
def test_zero_size_leaves_are_valid(shape):
  params = {'w': jnp.zeros(shape), 'v': jnp.ones((2, 2))}
  grads = {'w': jnp.ones(shape), 'v': jnp.ones((2, 2))}
  updates, state = _check_one_step(dl.dessilbi(0.1, nu=0.1), params, grads)
  # The other leaf is unaffected by its empty neighbour.
  ref, _ = _check_one_step(
    dl.dessilbi(0.1, nu=0.1), {'v': params['v']}, {'v': grads['v']}
  )
  np.testing.assert_array_equal(updates['v'], ref['v'])
  gamma = optax.tree.get(state, 'gamma')
  if len(shape) > 1:  # coupled: Γ of the leaf's shape
    assert gamma['w'].shape == shape


def test_numpy_arrays_and_mixed_dtype_gradients_are_valid():
  as_np = jax.tree.map(np.asarray, PARAMS)
  grads64 = jax.tree.map(lambda p: np.full(p.shape, 0.5, np.float64), PARAMS)
  grads32 = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), PARAMS)
  ref, ref_state = _check_one_step(CORE, PARAMS, grads32)
  for params, grads in ((as_np, grads32), (PARAMS, grads64)):
    updates, state = _check_one_step(CORE, params, grads)
    jax.tree.map(
      np.testing.assert_array_equal, (updates, state), (ref, ref_state)
    )


def test_abstract_params_give_the_state_layout():
  abstract = jax.tree.map(
    lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), PARAMS
  )
  for state in (jax.eval_shape(CORE.init, PARAMS), CORE.init(abstract)):
    assert state.z['conv']['kernel'].shape == (3, 3, 2, 4)
    assert isinstance(state.z['dense']['bias'], optax.MaskedNode)
  # The fused step's init too (its dtype check used to convert each leaf to
  # an array).
  fused = dl.fused_dessilbi(0.1, implementation='xla').init(abstract)
  assert jax.tree.structure(fused) == jax.tree.structure(
    dl.dessilbi(0.1).init(PARAMS)
  )


def test_compact_gamma_state_passes_the_checks_and_mismatches_are_named():
  tx = dl.scale_by_dessilbi(0.1, nu=2.0, store_gamma=False)
  updates, state = _check_one_step(tx, PARAMS, PARAMS)
  np.testing.assert_array_equal(
    updates['conv']['kernel'],
    CORE.update(PARAMS, STATE, PARAMS)[0]['conv']['kernel'],
  )
  gamma_of_nothing = NONE_COUPLED.init(PARAMS).gamma
  with pytest.raises(
    ValueError, match=r"state\.gamma: leaf 'conv/kernel' is coupled"
  ):
    tx.update(PARAMS, state._replace(gamma=gamma_of_nothing), PARAMS)
  with pytest.raises(
    ValueError, match=r"state\.z: leaf 'conv/kernel' has shape"
  ):
    tx.update(OTHER_WIDTHS, state, OTHER_WIDTHS)
