"""Which norm layer goes with which layer: by naming where it can tell,
an error where it cannot, never a guess."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dessilbi_jax as dl


def test_naming_pairs_conv_and_suffix_norms():
  params = {
    'conv3': {'kernel': jnp.ones((3, 3, 2, 4))},
    'bn3': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)},
    'shortcut': {'kernel': jnp.ones((1, 1, 2, 6))},
    'shortcut_bn': {'scale': jnp.ones(6), 'bias': jnp.zeros(6)},
    'fc': {'kernel': jnp.ones((4, 3))},
  }
  assert dl.default_norm(params, 'conv3') == 'bn3'
  assert dl.default_norm(params, 'shortcut') == 'shortcut_bn'
  assert dl.default_norm(params, 'fc') is None


def _conv_and_dense_sharing_a_name():
  return {
    'conv1': {'kernel': jnp.ones((3, 3, 1, 8)), 'bias': jnp.ones(8)},
    'bn1': {'scale': jnp.ones(8), 'bias': jnp.ones(8)},
    'fc1': {
      'kernel': jnp.ones((8 * 16, 8)) * jnp.arange(8.0),
      'bias': jnp.ones(8),
    },
    'fc2': {'kernel': jnp.ones((8, 2))},
  }


def test_a_norm_two_layers_could_own_is_not_guessed():
  # conv1 -> bn1 and fc1 -> bn1 by naming, with the same width: pruning fc1
  # used to zero conv1's BatchNorm.
  params = _conv_and_dense_sharing_a_name()
  for layer, rival in (('fc1', 'conv1'), ('conv1', 'fc1')):
    with pytest.raises(ValueError, match=f"candidate of '{rival}' too"):
      dl.default_norm(params, layer)
  with pytest.raises(ValueError, match='naming cannot tell'):
    dl.chain_spec(params, ['conv1', 'fc1', 'fc2'])
  rule = dl.penalty_rule(dense=dl.GroupLasso(axes=-1))
  record = dl.magnitude_record(
    {k: v for k, v in params.items() if k != 'conv1'}, rule
  )
  with pytest.raises(ValueError, match='naming cannot tell'):
    dl.prune(params, record, 0.5, layers=['fc1'], penalty=rule)
  # Told, the toolbox does what it is told.
  spec = dl.chain_spec(
    params, ['conv1', 'fc1', 'fc2'], norms={'conv1': 'bn1', 'fc1': None}
  )
  pruned, _ = dl.prune(
    params, record, 0.5, layers=['fc1'], spec=spec, penalty=rule
  )
  np.testing.assert_array_equal(pruned['bn1']['scale'], params['bn1']['scale'])
  # And a spec may not give one norm to two layers.
  with pytest.raises(ValueError, match="'bn1' is also the norm of 'conv1'"):
    dl.check_spec(
      params,
      {
        'conv1': dl.Link(norm='bn1', consumers=('fc1',)),
        'fc1': dl.Link(norm='bn1', consumers=('fc2',)),
      },
    )


def test_a_norm_named_otherwise_is_not_left_out():
  # Caffe-style names: naming finds no norm for conv1, and bn_conv1 used to
  # be left out without a word: prune kept its shift on pruned filters.
  params = {
    'conv1': {'kernel': jnp.ones((3, 3, 1, 4)) * jnp.arange(4.0)},
    'bn_conv1': {'scale': jnp.ones(4), 'bias': jnp.full(4, 0.5)},
    'conv2': {'kernel': jnp.ones((3, 3, 4, 4))},
    'bn2': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)},
    'conv3': {'kernel': jnp.ones((3, 3, 4, 4))},
    'fc': {'kernel': jnp.ones((4, 3))},
  }
  order = ['conv1', 'conv2', 'conv3', 'fc']
  record = dl.magnitude_record(params)
  for call in (
    lambda: dl.default_norm(params, 'conv1'),
    lambda: dl.chain_spec(params, order),
    lambda: dl.prune(params, record, 0.5, layers=['conv1']),
  ):
    with pytest.raises(ValueError, match=r'bn1, .*conv1_bn.*bn_conv1 has'):
      call()
  # conv3 has no norm: bn2 is conv2's by naming and bn_conv1 has conv1's
  # width only as long as conv1 claims it; told, each layer gets its own.
  spec = dl.chain_spec(params, order, norms={'conv1': 'bn_conv1'})
  assert spec['conv2'].norm == 'bn2'
  assert spec['conv3'].norm is None
  pruned, masks = dl.prune(params, record, 0.5, layers=['conv1'], spec=spec)
  gone = ~masks['conv1']['kernel'][0, 0, 0]
  assert gone.sum() == 2
  assert not pruned['bn_conv1']['bias'][gone].any()
  assert pruned['bn_conv1']['bias'][~gone].all()
  # None says there is no norm; the norm no layer claims stays in doubt for
  # the next layer of its width, until that is told too.
  with pytest.raises(ValueError, match="norm layer of 'conv3'"):
    dl.chain_spec(params, order, norms={'conv1': None})
  spec = dl.chain_spec(params, order, norms={'conv1': None, 'conv3': None})
  assert spec['conv1'].norm is None
  # A layer of another width is no rival.
  wide = dict(params, bn_conv1={'scale': jnp.ones(5)})
  assert dl.default_norm(wide, 'conv1') is None


def test_a_link_that_leaves_out_its_norm_gets_it_by_naming():
  # Link(consumers=...) without norm=: bn1 is found by naming, as for a
  # layer the spec does not list (it was once read as "no norm": prune kept
  # bn1's shift on pruned channels and slim cut conv1 but not bn1).
  params = {
    'conv1': {'kernel': jnp.ones((3, 3, 1, 4))},
    'bn1': {'scale': jnp.ones(4), 'bias': jnp.full(4, 0.5)},
    'conv2': {'kernel': jnp.ones((3, 3, 4, 2))},
  }
  left_out = {'conv1': dl.Link(consumers=('conv2',))}
  assert repr(left_out['conv1'].norm) == 'BY_NAMING'
  assert dl.check_spec(params, left_out) == {
    'conv1': dl.Link(norm='bn1', consumers=('conv2',))
  }
  record = {'conv1': {'kernel': jnp.array([0, 1, dl.NOT_SELECTED, 2])}}
  _, masks = dl.prune(params, record, 0.25, spec=left_out)
  np.testing.assert_array_equal(masks['bn1']['bias'], [1, 1, 0, 1])
  out = dl.slim(params, left_out, {'conv1': [1, 0, 1, 1]})
  assert out.params['bn1']['bias'].shape == (3,)
  # norm=None, stated, is no norm: bn1 is left alone (a pre-norm block's
  # norm2 before fc1, which naming pairs with fc2, is such a case).
  stated = {'conv1': dl.Link(norm=None, consumers=('conv2',))}
  assert dl.check_spec(params, stated) == stated
  _, masks = dl.prune(params, record, 0.25, spec=stated)
  assert bool(jnp.all(masks['bn1']['bias']))
  spec = dl.chain_spec(params, ['conv1', 'conv2'], norms={'conv1': None})
  assert spec == stated
  # A norm that another link claims is no candidate: fc1 -> bn1 by naming
  # too; alone, naming cannot tell whose bn1 is.
  params['fc1'] = {'kernel': jnp.ones((4, 4))}
  both = {'conv1': dl.Link(norm='bn1'), 'fc1': dl.Link()}
  assert dl.check_spec(params, both)['fc1'] == dl.Link(norm=None)
  with pytest.raises(ValueError, match=r"norm layer of 'fc1'.*'conv1' too"):
    dl.check_spec(params, {'fc1': dl.Link()})


class _AutoNamed(nn.Module):
  norm: bool = True

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    if self.norm:
      x = nn.BatchNorm(use_running_average=True)(x)
    return nn.Dense(2)(nn.relu(x).reshape(x.shape[0], -1))


def test_linen_automatic_names_are_not_paired_by_number():
  # Conv_0 and BatchNorm_0: Linen numbers each kind apart, so the numbers do
  # not say which norm follows which layer; pruned channels used to keep
  # their BatchNorm shift (output relu(shift), not zero).
  x = jnp.ones((1, 4, 4, 1))
  variables = _AutoNamed().init(jax.random.key(0), x)
  params = dict(variables['params'])
  params['BatchNorm_0'] = {'scale': jnp.ones(4), 'bias': jnp.full(4, 0.5)}
  record = dl.magnitude_record(params)
  for call in (
    lambda: dl.prune(params, record, 0.5),
    lambda: dl.chain_spec(params),
    lambda: dl.default_norm(params, 'Conv_0'),
  ):
    with pytest.raises(ValueError, match='numbers it by position'):
      call()
  spec = dl.chain_spec(params, norms={'Conv_0': 'BatchNorm_0'})
  pruned, masks = dl.prune(params, record, 0.5, spec=spec)
  gone = ~masks['Conv_0']['bias']
  assert gone.sum() == 2
  assert not pruned['BatchNorm_0']['bias'][gone].any()
  # Without a norm layer there is nothing to tell.
  plain = _AutoNamed(norm=False).init(jax.random.key(0), x)['params']
  assert dl.default_norm(plain, 'Conv_0') is None
  dl.prune(plain, dl.magnitude_record(plain), 0.5)


def test_chain_spec_refuses_a_string_and_unknown_norms():
  params = _conv_and_dense_sharing_a_name()
  with pytest.raises(TypeError, match='got the string'):
    dl.chain_spec(params, 'conv1')
  with pytest.raises(ValueError, match="norms: 'cnv1' is not a layer"):
    dl.chain_spec(
      params, ['conv1', 'fc1', 'fc2'], norms={'cnv1': None, 'fc1': None}
    )
  # A layer that is not there, also alone (a chain of one layer has no
  # links) or last.
  for order in (['cnv1'], ['conv1', 'fc1', 'fc3']):
    with pytest.raises(ValueError, match=f"layer '{order[-1]}' has no kernel"):
      dl.chain_spec(params, order)


def test_flops_keyword_arguments_are_fixed_flags():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = True):
      x = nn.Dense(8)(x)
      return nn.BatchNorm(use_running_average=not train)(x)

  x = jnp.ones((4, 3))
  variables = Net().init(jax.random.key(0), x, train=False)
  by_keyword = dl.flops(Net().apply, variables, x, train=False)
  by_closure = dl.flops(
    lambda v, x: Net().apply(v, x, train=False), variables, x
  )
  assert by_keyword == by_closure > 0


def test_flops_traces_array_keyword_arguments():
  x = jnp.ones((64, 64))

  def f(x):
    return (x * 2 + 1) @ x

  by_position = dl.flops(f, x)
  assert dl.flops(f, x=x) == by_position  # not folded as a constant
  spec = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  assert dl.flops(f, x=spec) == by_position


def test_norms_given_settle_naming_and_the_last_layer_may_have_one():
  params = _conv_and_dense_sharing_a_name()
  # fc1's norm given: bn1 is conv1's by naming, with no rival left.
  spec = dl.chain_spec(params, ['conv1', 'fc1', 'fc2'], norms={'fc1': None})
  assert spec['conv1'].norm == 'bn1' and spec['fc1'].norm is None
  # No norm given for the last layer (a classifier): no link, so w_star
  # keeps its biases; a norm given gets a link of its own (below).
  spec = dl.chain_spec(
    params, ['conv1', 'fc1', 'fc2'], norms={'fc1': None, 'fc2': None}
  )
  assert 'fc2' not in spec
  # A spec whose values are not Links is named before it is used.
  rule = dl.penalty_rule(dense=dl.GroupLasso(axes=-1))
  record = dl.magnitude_record({'fc1': params['fc1']}, rule)
  with pytest.raises(TypeError, match=r"spec\['fc1'\] must be a"):
    dl.prune(params, record, 0.5, spec={'fc1': {'norm': None}}, penalty=rule)


def test_a_link_without_consumers_names_a_norm_and_freezes_the_width():
  # A conv whose outputs feed a residual addition: its norm can be named for
  # prune, and slim / widen then refuse to change its width.
  x = jnp.ones((1, 4, 4, 1))
  params = dict(_AutoNamed().init(jax.random.key(0), x)['params'])
  params['BatchNorm_0'] = {'scale': jnp.ones(4), 'bias': jnp.full(4, 0.5)}
  spec = {'Conv_0': dl.Link(norm='BatchNorm_0', consumers=())}
  record = {'Conv_0': {'kernel': jnp.array([0, 1, 2, dl.NOT_SELECTED])}}
  pruned, masks = dl.prune(params, record, 0.5, spec=spec)
  gone = ~masks['Conv_0']['bias']
  assert gone.sum() == 2 and not pruned['BatchNorm_0']['bias'][gone].any()
  with pytest.raises(ValueError, match='no consumers in the spec'):
    dl.slim(params, spec, masks)
  with pytest.raises(ValueError, match='no consumers in the spec'):
    dl.widen(jax.random.key(1), params, spec, 'Conv_0', 2)
  # Keeping every filter of it is no change, and allowed.
  everything = jax.tree.map(lambda m: m | True, masks)
  out = dl.slim(params, spec, everything)
  assert out.params['Conv_0']['kernel'].shape[-1] == 4


def _chain_with_a_final_norm():
  return {
    'conv1': {'kernel': jnp.ones((3, 3, 1, 4))},
    'bn1': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)},
    'conv2': {
      'kernel': jnp.ones((3, 3, 4, 8)) * jnp.arange(8.0),
      'bias': jnp.ones(8),
    },
    'final_norm': {'scale': jnp.ones(8), 'bias': jnp.full(8, 0.5)},
  }


def test_the_norm_given_for_the_last_layer_is_kept_in_the_spec():
  # It used to be dropped (only (producer, consumer) pairs got links), and
  # prune(layers=[last]) then asked for the very norms= argument given.
  params = _chain_with_a_final_norm()
  order = ['conv1', 'conv2']
  spec = dl.chain_spec(params, order, norms={'conv2': 'final_norm'})
  assert spec == {
    'conv1': dl.Link(norm='bn1', consumers=('conv2',)),
    'conv2': dl.Link(norm='final_norm', consumers=()),
  }
  # Without it, naming cannot tell conv2's norm.
  with pytest.raises(ValueError, match="norm layer of 'conv2'"):
    dl.prune(params, dl.magnitude_record(params), 0.5, layers=['conv2'])
  pruned, masks = dl.prune(
    params, dl.magnitude_record(params), 0.5, layers=['conv2'], spec=spec
  )
  gone = ~masks['conv2']['bias']
  np.testing.assert_array_equal(gone, np.arange(8) < 4)
  for leaf in ('scale', 'bias'):
    assert not pruned['final_norm'][leaf][gone].any()
    assert pruned['final_norm'][leaf][~gone].all()
  # w_star zeroes the norm of conv2's filters out of Γ's support.
  state = dl.scale_by_dessilbi(1.0).init(params)
  gamma = jnp.zeros((3, 3, 4, 8)).at[..., 1::2].set(1.0)
  state = state._replace(
    gamma={**state.gamma, 'conv2': {**state.gamma['conv2'], 'kernel': gamma}}
  )
  out = dl.w_star(params, state, channels=True, spec=spec)
  odd = np.arange(8) % 2 == 1
  np.testing.assert_array_equal(out['final_norm']['scale'], odd)
  np.testing.assert_array_equal(out['final_norm']['bias'], 0.5 * odd)
  # slim keeps the last layer's width (its outputs leave the chain) and
  # still slims the others, with their norms.
  with pytest.raises(ValueError, match="'conv2' has no consumers in the spec"):
    dl.slim(params, spec, {'conv2': odd})
  out = dl.slim(params, spec, {'conv1': [1, 0, 1, 1], 'conv2': [1] * 8})
  assert out.params['bn1']['bias'].shape == (3,)
  assert out.params['conv2']['kernel'].shape == (3, 3, 3, 8)
  assert out.params['final_norm']['scale'].shape == (8,)


def test_default_norm_refuses_a_layer_that_is_not_there():
  # A misspelt layer used to read as a layer without norm (None).
  params = _chain_with_a_final_norm()
  assert dl.default_norm(params, 'conv1') == 'bn1'
  with pytest.raises(ValueError, match="layer 'conv_1' has no kernel"):
    dl.default_norm(params, 'conv_1')
  with pytest.raises(TypeError, match='layer: expected a layer path'):
    dl.default_norm(params, ('conv1',))


def test_a_layer_of_width_zero_feeding_another_is_named():
  # A Dense consumer used to fail with a bare ZeroDivisionError.
  params = {
    'conv1': {'kernel': jnp.zeros((3, 3, 1, 0))},
    'fc': {'kernel': jnp.zeros((0, 10))},
    'conv2': {'kernel': jnp.zeros((3, 3, 0, 2))},
  }
  for consumer in ('fc', 'conv2'):
    with pytest.raises(ValueError, match="'conv1' has width 0"):
      dl.chain_spec(params, ['conv1', consumer])
    with pytest.raises(ValueError, match="'conv1' has width 0"):
      dl.check_spec(params, {'conv1': dl.Link(consumers=(consumer,))})


@pytest.mark.parametrize(
  'call, match',
  [
    (lambda p: dl.check_spec(p, ['conv1']), 'spec: expected a dict .* list'),
    (
      lambda p: dl.check_spec(p, {1: dl.Link(norm='bn1')}),
      'spec: expected layer paths .* int 1',
    ),
    (
      lambda p: dl.chain_spec(p, ['conv1', 5]),
      'layers: expected .* int 5 at position 1',
    ),
    (lambda p: dl.chain_spec(p, 5), 'layers: expected .* int 5'),
    (
      lambda p: dl.chain_spec(p, ['conv1', 'conv2'], norms=['bn1']),
      'norms: expected a dict .* list',
    ),
    (
      lambda p: dl.chain_spec(p, ['conv1', 'conv2'], norms={1: 'bn1'}),
      'norms: expected layer paths .* int 1',
    ),
    (
      lambda p: dl.chain_spec(p, ['conv1', 'conv2'], norms={'conv1': 1}),
      r"norms\['conv1'\]: expected the path .* int 1",
    ),
    (
      lambda p: dl.w_star(
        p, dl.dessilbi(0.1).init(p), channels=True, spec=['conv1']
      ),
      'spec: expected a dict .* list',
    ),
    (
      lambda p: dl.prune(p, dl.magnitude_record(p), 0.5, spec=['conv1']),
      'spec: expected a dict .* list',
    ),
    (
      lambda p: dl.slim(p, ['conv1'], {'conv1': [1, 1, 1, 1]}),
      'spec: expected a dict .* list',
    ),
  ],
  ids=[
    'spec-list',
    'spec-int-key',
    'layers-int-item',
    'layers-int',
    'norms-list',
    'norms-int-key',
    'norms-int-value',
    'w_star-spec-list',
    'prune-spec-list',
    'slim-spec-list',
  ],
)
def test_specs_layers_and_norms_of_the_wrong_type_are_named(call, match):
  # They used to fail in Python's internals (AttributeError, an int's
  # split, sorting mixed keys), naming no argument.
  params = {
    'conv1': {'kernel': jnp.zeros((3, 3, 1, 4))},
    'bn1': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)},
    'conv2': {'kernel': jnp.zeros((3, 3, 4, 8))},
  }
  with pytest.raises(TypeError, match=match):
    call(params)
