"""Bad input: early, clear errors that name the argument."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dessilbi_jax as dl

PARAMS = {
  'conv': jnp.zeros((3, 3, 2, 4)),
  'dense': jnp.zeros((4, 3)),
  'b': jnp.zeros(3),
}


@pytest.mark.parametrize(
  'kwargs, error, match',
  [
    (dict(kappa=0.0), ValueError, 'kappa'),
    (dict(kappa=-1.0), ValueError, 'kappa'),
    (dict(nu=0.0), ValueError, 'nu'),
    (dict(nu=-5.0), ValueError, 'nu'),
    (dict(nu=float('nan')), ValueError, 'nu'),
    (dict(learning_rate=-0.1), ValueError, 'learning_rate'),
    (dict(weight_decay=-1e-4), ValueError, 'weight_decay'),
    (dict(momentum=1.0), ValueError, 'momentum'),
    (dict(momentum=-0.1), ValueError, 'momentum'),
    (dict(kappa=jnp.ones(3)), TypeError, 'kappa'),
    (dict(kappa='1'), TypeError, 'kappa'),
    (dict(nesterov=1), TypeError, 'nesterov'),
    (dict(nesterov=True, momentum=None), ValueError, 'nesterov'),
    (dict(penalty=dl.Lasso()), TypeError, 'penalty'),
  ],
)
def test_hyper_parameters_are_checked_at_construction(kwargs, error, match):
  kwargs = {'learning_rate': 0.1, **kwargs}
  with pytest.raises(error, match=match):
    dl.dessilbi(**kwargs)


def test_core_checks_its_arguments_too():
  with pytest.raises(ValueError, match='kappa'):
    dl.scale_by_dessilbi(0.1, kappa=-2.0)
  with pytest.raises(ValueError, match='learning_rate'):
    dl.scale_by_dessilbi(-0.1)


def test_a_kappa_that_overflows_the_state_dtype_is_refused_at_init():
  # Γ = κ·Prox(z) in z's dtype: an infinite κ would make Γ NaN where z = 0
  # (and W NaN the step after), whatever the learning rate.
  params16 = jax.tree.map(lambda x: x.astype(jnp.float16), PARAMS)
  for tx, params in [
    (dl.dessilbi(0.1, kappa=1e39), PARAMS),
    (dl.dessilbi(0.1, kappa=7e4), params16),
    (dl.fused_dessilbi(0.1, kappa=7e4, implementation='xla'), params16),
  ]:
    with pytest.raises(ValueError, match=r'kappa=.*overflows float'):
      tx.init(params)
  # In a float32 state, κ = 7e4 is finite: the path is the float32 one.
  state = dl.dessilbi(0.1, kappa=7e4, state_dtype=jnp.float32).init(params16)
  gamma = optax.tree.get(state, 'gamma')
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(gamma))


def test_a_nu_that_rounds_to_inf_or_0_in_the_state_dtype_is_refused_at_init():
  # ν divides W - Γ and α in z's dtype: in float16, ν = 1e5 rounded to inf
  # and silently cut W's pull toward Γ, ν = 1e-8 rounded to 0.
  params16 = jax.tree.map(lambda x: x.astype(jnp.float16), PARAMS)
  for nu, match in ((1e5, 'overflows'), (1e-8, 'rounds to 0 in')):
    for tx in (
      dl.dessilbi(0.1, nu=nu),
      dl.fused_dessilbi(0.1, nu=nu, implementation='xla'),
    ):
      with pytest.raises(ValueError, match=rf'nu={nu:g} {match} float16'):
        tx.init(params16)
  # With a float32 state the step is computed in float32.
  tx = dl.scale_by_dessilbi(1.0, nu=1e5, state_dtype=jnp.float32)
  w = {'w': jnp.ones((2, 2), jnp.float16)}
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, w), tx.init(w), w)
  # (a float16 subnormal: its last place is 6e-8)
  np.testing.assert_allclose(updates['w'], -1e-5, rtol=1e-2)


@pytest.mark.parametrize(
  'make, match',
  [
    (lambda: dl.Lasso(lam=-1.0), 'lam'),
    (lambda: dl.GroupLasso(lam=-0.5), 'lam'),
    (lambda: dl.Lasso(lam=float('inf')), 'lam'),
  ],
)
def test_negative_lambda_is_rejected(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_penalty_types_are_checked():
  with pytest.raises(TypeError, match='axes'):
    dl.GroupLasso(axes=1.5)
  with pytest.raises(TypeError, match='lam'):
    dl.Lasso(lam='big')
  with pytest.raises(TypeError, match='dense'):
    dl.penalty_rule(dense='lasso')
  with pytest.raises(TypeError, match="overrides\\['head'\\]"):
    dl.penalty_rule(overrides={'head': 1.0})


def test_group_axes_that_do_not_exist_name_the_leaf():
  tx = dl.dessilbi(0.1, penalty=dl.penalty_rule(dense=dl.GroupLasso(axes=(2,))))
  with pytest.raises(ValueError, match=r"'dense'.*shape \(4, 3\).*axes"):
    tx.init(PARAMS)
  tx = dl.dessilbi(
    0.1, penalty=dl.penalty_rule(conv=dl.GroupLasso(axes=(0, -4)))
  )
  with pytest.raises(ValueError, match=r"'conv'.*repeat"):
    tx.init(PARAMS)


def test_non_floating_leaves_are_rejected_with_their_path():
  tx = dl.dessilbi(0.1)
  with pytest.raises(TypeError, match=r"'layer/steps'.*int32"):
    tx.init(
      {'layer': {'w': jnp.zeros((2, 2)), 'steps': jnp.zeros((), jnp.int32)}}
    )


def test_rule_returning_garbage_names_the_leaf():
  tx = dl.dessilbi(0.1, penalty=lambda path, leaf: 'group')
  with pytest.raises(TypeError, match="returned 'group' for leaf 'b'"):
    tx.init(PARAMS)


@pytest.mark.parametrize('make', [dl.dessilbi, dl.scale_by_dessilbi])
def test_update_without_params(make):
  tx = make(0.1)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match='params'):
    tx.update(PARAMS, state)


def test_values_are_checked_when_concrete_and_skipped_when_traced():
  # Concrete values given through inject_hyperparams are checked at init.
  with pytest.raises(ValueError, match='nu'):
    optax.inject_hyperparams(dl.dessilbi)(learning_rate=0.1, nu=-1.0).init(
      PARAMS
    )
  # Traced values (jitted init and update) cannot be checked and pass through.
  tx = optax.inject_hyperparams(dl.dessilbi)(learning_rate=0.1, nu=5.0)
  state = jax.jit(tx.init)(PARAMS)
  updates, _ = jax.jit(tx.update)(PARAMS, state, PARAMS)
  assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)


KB = {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)}
ZERO = jax.tree.map(jnp.zeros_like, KB)


def _decayed(tx, params=KB):
  """Which leaves weight decay moved, with zero gradients and no coupling."""
  updates, _ = tx.update(ZERO, tx.init(params), params)
  return {k: bool(jnp.any(jnp.abs(v) > 1e-3)) for k, v in updates.items()}


def test_weight_decay_mask_is_checked():
  plain = dict(learning_rate=1.0, nu=1e9, momentum=None, weight_decay=0.5)
  # A layer name or strings as leaves used to decay every leaf.
  for bad in ('bias', {'kernel': 'no', 'bias': 'no'}):
    with pytest.raises(TypeError, match='weight_decay_mask must be None'):
      dl.dessilbi(**plain, weight_decay_mask=bad)
  # A single bool for a tree of params: what a mask function forgotten in
  # inject_hyperparams's static_args gives (decay nowhere, or everywhere).
  for single in (False, True, np.bool_(True)):
    with pytest.raises(TypeError, match=r'single bool .* laid out as a tree'):
      dl.dessilbi(**plain, weight_decay_mask=single).init(KB)
  # For a single array, a single bool is the mask (matrix_mask gives one).
  w = jnp.ones((3, 4))
  for mask in (None, True, dl.matrix_mask):
    tx = dl.dessilbi(**plain, weight_decay_mask=mask)
    updates, _ = tx.update(jnp.zeros_like(w), tx.init(w), w)
    assert bool(jnp.all(jnp.abs(updates) > 1e-3))
  with pytest.raises(ValueError, match='laid out like the params'):
    dl.dessilbi(**plain, weight_decay_mask={'kernel': True}).init(KB)
  assert _decayed(dl.dessilbi(**plain)) == {'kernel': True, 'bias': False}
  # A prefix of the params' tree is a mask, as in optax.masked.
  nested = {'enc': KB, 'dec': KB}
  tx = dl.dessilbi(**plain, weight_decay_mask={'enc': True, 'dec': False})
  updates, _ = tx.update(
    jax.tree.map(jnp.zeros_like, nested), tx.init(nested), nested
  )
  assert bool(jnp.all(jnp.abs(updates['enc']['bias']) > 1e-3))
  assert not bool(jnp.any(jnp.abs(updates['dec']['kernel']) > 1e-3))


def test_inject_hyperparams_callables_need_static_args():
  inject = optax.inject_hyperparams
  plain = dict(learning_rate=1.0, nu=1e9, momentum=None, weight_decay=0.5)
  # The mask function was called with the step count: no decay at all.
  tx = inject(dl.dessilbi)(**plain, weight_decay_mask=dl.matrix_mask)
  with pytest.raises(TypeError, match="static_args=\\('weight_decay_mask',\\)"):
    tx.init(KB)
  tx = inject(dl.dessilbi, static_args=('weight_decay_mask',))(
    **plain, weight_decay_mask=dl.matrix_mask
  )
  assert _decayed(tx) == {'kernel': True, 'bias': False}
  # A mask function that gives True for the step count (decay the biases
  # only, x.ndim < 2) would decay every leaf; a model of one leaf in a tree
  # would lose its decay. Both are refused at init.
  biases = lambda p: jax.tree.map(lambda x: x.ndim < 2, p)  # noqa: E731
  with pytest.raises(TypeError, match="static_args=\\('weight_decay_mask',\\)"):
    inject(dl.dessilbi)(**plain, weight_decay_mask=biases).init(KB)
  one_leaf = {'fc': {'kernel': jnp.ones((3, 2))}}
  with pytest.raises(TypeError, match='single bool False'):
    inject(dl.dessilbi)(**plain, weight_decay_mask=dl.matrix_mask).init(
      one_leaf
    )
  # jnp.float32 is callable too, and so is a penalty rule.
  with pytest.raises(TypeError, match="static_args=\\('state_dtype',\\)"):
    inject(dl.dessilbi)(learning_rate=0.1, state_dtype=jnp.float32).init(KB)
  inject(dl.dessilbi, static_args=('state_dtype',))(
    learning_rate=0.1, state_dtype=jnp.float32
  ).init(KB)
  rule = dl.penalty_rule(overrides={'bias': None})
  with pytest.raises(TypeError, match="static_args=\\('penalty',\\)"):
    inject(dl.dessilbi)(learning_rate=0.1, penalty=rule).init(KB)


def test_penalty_rule_overrides_are_checked():
  with pytest.warns(
    UserWarning, match="override 'head' matches no parameter"
  ) as caught:
    dl.dessilbi(0.1, penalty=dl.penalty_rule(overrides={'head': None})).init(
      {'Head': {'kernel': jnp.ones((4, 2))}}
    )
  # The warning points at the line that called init, not into Optax's chain.
  assert caught[0].filename == __file__
  with pytest.raises(TypeError, match='overrides must be a mapping'):
    dl.penalty_rule(overrides=[('head', None)])
  with pytest.raises(ValueError, match='not a regular expression'):
    dl.penalty_rule(overrides={'head[': None})


TORCH_LAYOUT = {  # PyTorch and Equinox: filters first, conv bias (out, 1, 1)
  'conv1': {'weight': jnp.ones((4, 2, 3, 3)), 'bias': jnp.ones((4, 1, 1))},
  'fc': {'weight': jnp.ones((10, 4)), 'bias': jnp.ones(10)},
}
TORCH_RULE = dl.penalty_rule(
  conv=dl.GroupLasso(axes=0), overrides={'bias$': None}
)


def test_default_rule_warns_of_a_pytorch_layout():
  with pytest.warns(
    UserWarning, match=r"groups \['conv1/weight'\] by the last axis"
  ) as caught:
    dl.track_selection(dl.dessilbi(0.1)).init(TORCH_LAYOUT)
  assert caught[0].filename == __file__
  # The functions that take a rule, not a state, group with it too.
  weight = {'conv1': {'weight': TORCH_LAYOUT['conv1']['weight']}}
  record = {'conv1': {'weight': jnp.zeros(3, jnp.int32)}}  # default groups
  for use in (
    lambda: dl.magnitude_record(weight),
    lambda: dl.rank_groups(weight, record),
    lambda: dl.prune(weight, record, 0.5),
  ):
    with pytest.warns(UserWarning, match='the default rule groups') as caught:
      use()
    assert caught[0].filename == __file__
  # A rule given, or Flax's names (an NNX model through nnx.Optimizer), raise
  # no warning.
  model = nnx.Sequential(
    nnx.Conv(1, 4, (3, 3), rngs=nnx.Rngs(0)),
    nnx.BatchNorm(4, rngs=nnx.Rngs(0)),
    nnx.Linear(4, 2, rngs=nnx.Rngs(0)),
  )
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    dl.dessilbi(0.1, penalty=TORCH_RULE).init(TORCH_LAYOUT)
    dl.magnitude_record(TORCH_LAYOUT, penalty=TORCH_RULE)
    nnx.Optimizer(model, dl.dessilbi(0.1), wrt=nnx.Param)
    dl.magnitude_record(nnx.state(model))


def test_channel_tools_name_a_layout_they_do_not_read():
  state = dl.track_selection(dl.dessilbi(0.1, penalty=TORCH_RULE)).init(
    TORCH_LAYOUT
  )
  # w_star(channels=True) would keep the bias of filters out of the support,
  # of a group-lasso conv and of a lasso linear layer alike.
  with pytest.raises(ValueError, match="'conv1/weight' is coupled but is not"):
    dl.w_star(TORCH_LAYOUT, state, channels=True)
  linear = {'fc': TORCH_LAYOUT['fc']}
  lasso = dl.dessilbi(0.1, penalty=dl.penalty_rule(dense=dl.Lasso())).init(
    linear
  )
  with pytest.raises(ValueError, match="'fc/weight' is coupled but is not"):
    dl.w_star(linear, lasso, channels=True)
  # prune zeroes the groups and says that the bias stays.
  record = optax.tree.get(state, 'first_step')
  record['conv1']['weight'] = jnp.array([3, 1, dl.NOT_SELECTED, 2], jnp.int32)
  with pytest.warns(UserWarning, match="its bias 'conv1/bias' is kept"):
    pruned, masks = dl.prune(
      TORCH_LAYOUT, record, 0.5, penalty=dl.get_penalty(state)
    )
  kept = np.asarray(masks['conv1']['weight']).all(axis=(1, 2, 3))
  np.testing.assert_array_equal(kept, [False, True, False, True])
  assert not np.any(np.asarray(pruned['conv1']['weight'])[~kept])
  assert np.asarray(masks['conv1']['bias']).all()
  # The surgery tools say which layout they read.
  with pytest.raises(ValueError, match='read Flax layouts'):
    dl.chain_spec(TORCH_LAYOUT, ['conv1', 'fc'])


def test_prune_says_it_keeps_the_bias_of_groups_that_are_not_filters():
  # Query kernels grouped per head: prune zeroes head 1's weights, but its
  # bias stays, so the head still outputs it; prune says so. Grouped by
  # whole filters (the default), the bias goes with its filter, silently.
  params = {
    'query': {'kernel': jnp.ones((6, 4, 3)), 'bias': jnp.ones((4, 3))},
  }
  record = {'query': {'kernel': jnp.array([0, dl.NOT_SELECTED, 1, 2])}}
  per_head = dl.penalty_rule(conv=dl.GroupLasso(axes=1))  # rank >= 3
  with pytest.warns(UserWarning, match=r"'query/kernel' is grouped by \(1,\)"):
    pruned, masks = dl.prune(params, record, 0.25, penalty=per_head)
  assert not np.any(np.asarray(pruned['query']['kernel'])[:, 1])
  assert np.asarray(masks['query']['bias']).all()
  by_filter = {'query': {'kernel': jnp.array([0, dl.NOT_SELECTED, 1])}}
  # Groups per input row cut no output whole: the bias is no concern there.
  per_input = dl.penalty_rule(conv=dl.GroupLasso(axes=0))
  by_input = {'query': {'kernel': jnp.array([0, dl.NOT_SELECTED, 1, 2, 3, 4])}}
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    _, masks = dl.prune(params, by_filter, 1 / 3)
    dl.prune(params, by_input, 1 / 6, penalty=per_input)
  np.testing.assert_array_equal(masks['query']['bias'][0], [1, 0, 1])


def test_numpy_scalars_are_typed_leaves_python_numbers_are_not():
  # NumPy's float64 is a Python float too, but it has a dtype: a 0-d array
  # like np.float32's (it was refused as "a Python float64").
  for scalar in (np.float32(1.0), np.float64(1.0), np.array(1.0)):
    params = {'w': jnp.ones((2, 2)), 't': scalar}
    tx = dl.dessilbi(0.1)
    updates, _ = tx.update(
      jax.tree.map(jnp.ones_like, params), tx.init(params), params
    )
    assert updates['t'].shape == ()
  with pytest.raises(TypeError, match=r"leaf 't' is a Python float, not an"):
    dl.dessilbi(0.1).init({'t': 1.0})
  with pytest.raises(TypeError, match=r"leaf 't' has dtype complex128"):
    dl.dessilbi(0.1).init({'t': np.complex128(1.0)})


def test_schedules_must_return_a_scalar():
  rates = jnp.array([0.1, 0.1, 0.05])
  tx = dl.dessilbi(lambda count: rates[count : count + 1], nu=1.0)
  with pytest.raises(ValueError, match='learning_rate: the schedule returned'):
    tx.update(KB, tx.init(KB), KB)


def test_penalties_and_dtypes_refuse_what_they_would_misread():
  with pytest.raises(TypeError, match='scale_by_size must be a bool'):
    dl.GroupLasso(scale_by_size='no')
  assert dl.GroupLasso(axes=np.int64(0)).axes == (0,)
  # A str or bytes is a sequence: '' was no axes (one group of the whole
  # leaf), b'\x03' axis 3.
  for axes in ('', b'\x03', '0'):
    with pytest.raises(TypeError, match='axes must be an int or a sequence'):
      dl.GroupLasso(axes=axes)
  with pytest.raises(TypeError, match='state_dtype must have 16 bits'):
    dl.scale_by_dessilbi(0.1, state_dtype=jnp.float8_e4m3fn)
  eight = {'w': jnp.ones((3, 4), jnp.float8_e4m3fn)}
  with pytest.raises(TypeError, match='8-bit floats are not supported'):
    dl.dessilbi(0.1).init(eight)


def test_weight_decay_masks_that_optax_masked_takes_still_work():
  plain = dict(learning_rate=1.0, nu=1e9, momentum=None, weight_decay=0.5)
  every = {'kernel': True, 'bias': True}
  by_rank = {'kernel': True, 'bias': False}
  for mask, want in (
    (lambda p: True, every),  # a prefix of the params' tree: every leaf
    ({'kernel': jnp.array(True), 'bias': np.array(False)}, by_rank),
    (lambda p: jax.tree.map(lambda x: jnp.asarray(x.ndim > 1), p), by_rank),
  ):
    assert _decayed(dl.dessilbi(**plain, weight_decay_mask=mask)) == want
  with pytest.raises(TypeError, match='one per leaf'):
    dl.dessilbi(**plain, weight_decay_mask={'kernel': jnp.ones(3, bool)})


def test_override_naming_a_leaf_of_another_branch_is_no_typo():
  import warnings

  params = {
    'body': {'kernel': jnp.ones((3, 4))},
    'head': {'kernel': KB['kernel']},
  }
  rule = dl.penalty_rule(overrides={'head': None})
  tx = optax.partition(
    {'lbi': dl.dessilbi(0.1, penalty=rule), 'sgd': optax.sgd(0.1)},
    {'body': 'lbi', 'head': 'sgd'},
  )
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    tx.init(params)
    optax.masked(
      dl.dessilbi(0.1, penalty=rule), {'body': True, 'head': False}
    ).init(params)


def test_flags_are_bools_not_values_read_by_truthiness():
  state = dl.dessilbi(0.1).init(PARAMS)
  # 'no' is true: channels were zeroed, groups taken.
  with pytest.raises(TypeError, match='channels must be a bool'):
    dl.w_star(PARAMS, state, channels='no')
  with pytest.raises(TypeError, match='by_group must be a bool'):
    dl.support(state, by_group='no')
  with pytest.raises(TypeError, match='freeze must be a bool'):
    dl.dessilbi(0.1, freeze=1)
  # NumPy's bools are bools, as GroupLasso's scale_by_size takes them.
  jax.tree.map(
    np.testing.assert_array_equal,
    dl.support(state, by_group=np.True_),
    dl.support(state, by_group=True),
  )
  dl.dessilbi(0.1, nesterov=np.False_, freeze=np.True_, store_gamma=np.True_)


@pytest.mark.parametrize('name', ['kappa', 'nu', 'momentum', 'weight_decay'])
def test_a_schedule_for_another_hyper_parameter_is_named(name):
  # The message used to be "got function with shape () and dtype object".
  with pytest.raises(TypeError, match=f'{name} must be a real number, got a'):
    dl.dessilbi(0.1, **{name: optax.constant_schedule(0.5)})


def test_a_traced_nu_of_residue_is_a_scalar():
  state = dl.dessilbi(0.1).init(PARAMS)
  residue = jax.jit(lambda nu: dl.residue(PARAMS, state, nu))
  assert residue(jnp.float32(2.0)).shape == ()
  # Its shape is known while tracing: a vector of ν gave a vector.
  with pytest.raises(TypeError, match='nu must be a real scalar, got a traced'):
    residue(jnp.array([1.0, 2.0]))
