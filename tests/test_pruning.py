"""Pruning by the order of selection: exactly the lowest-ranked groups."""

import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dessilbi_jax as dl
from dessilbi_jax._trees import pure

NS = dl.NOT_SELECTED


def _random_case(seed=0):
  rng = np.random.default_rng(seed)
  params = {
    'conv1': {
      'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 10)), jnp.float32),
      'bias': jnp.asarray(rng.normal(size=10), jnp.float32),
    },
    'bn1': {
      'scale': jnp.asarray(rng.normal(size=10), jnp.float32),
      'bias': jnp.asarray(rng.normal(size=10), jnp.float32),
    },
    'fc': {
      'kernel': jnp.asarray(rng.normal(size=(10, 3)), jnp.float32),
      'bias': jnp.asarray(rng.normal(size=3), jnp.float32),
    },
  }
  # Few distinct steps, so many ties are broken by norm.
  steps = np.array([0, 4, 4, 9, NS], np.int64)
  record = {
    'conv1': {'kernel': jnp.asarray(rng.choice(steps, 10), jnp.int32)},
    'fc': {'kernel': jnp.asarray(rng.choice(steps, (10, 3)), jnp.int32)},
  }
  return params, record


def _expected_pruned(step, norm, n_prune):
  """Indices of the n_prune worst groups: latest step, then smallest norm."""
  order = sorted(
    range(step.size), key=lambda i: (int(step.flat[i]), -float(norm.flat[i]))
  )
  return set(order[step.size - n_prune :]) if n_prune else set()


@pytest.mark.parametrize('fraction', [0.0, 0.3, 0.5, 0.7, 1.0])
def test_layer_pruning_zeroes_exactly_the_lowest_ranked_groups(fraction):
  params, record = _random_case()
  pruned, masks = dl.prune(params, record, fraction)
  kernel = np.asarray(params['conv1']['kernel'])
  norm = np.linalg.norm(kernel.reshape(-1, 10), axis=0)
  step = np.asarray(record['conv1']['kernel'])
  worst = _expected_pruned(step, norm, math.floor(fraction * 10))
  got_kernel = np.asarray(pruned['conv1']['kernel'])
  for c in range(10):
    if c in worst:
      assert not got_kernel[..., c].any()
      assert not masks['conv1']['kernel'][..., c].any()
      for layer, leaf in [('conv1', 'bias'), ('bn1', 'scale'), ('bn1', 'bias')]:
        assert pruned[layer][leaf][c] == 0
    else:
      np.testing.assert_array_equal(got_kernel[..., c], kernel[..., c])
      for layer, leaf in [('conv1', 'bias'), ('bn1', 'scale'), ('bn1', 'bias')]:
        assert pruned[layer][leaf][c] == params[layer][leaf][c]
  # fc: elementwise groups, no bias semantics.
  fc = np.asarray(params['fc']['kernel'])
  worst_fc = _expected_pruned(
    np.asarray(record['fc']['kernel']), np.abs(fc), math.floor(fraction * 30)
  )
  got_fc = np.asarray(pruned['fc']['kernel'])
  for i in range(30):
    assert got_fc.flat[i] == (0 if i in worst_fc else fc.flat[i])
  np.testing.assert_array_equal(pruned['fc']['bias'], params['fc']['bias'])
  assert masks['fc']['bias'].all()


def test_one_compiled_program_serves_every_fraction(caplog):
  params, record = _random_case()
  dl.prune(params, record, 0.3)
  small = jax.tree.map(lambda x: x[..., :5] if x.shape[-1] == 10 else x, params)
  small_record = {
    'conv1': {'kernel': record['conv1']['kernel'][:5]},
    'fc': record['fc'],
  }

  def compiles():
    return [
      r
      for r in caplog.records
      if 'Compiling' in r.getMessage() and '_prune' in r.getMessage()
    ]

  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    for fraction in (0.5, 0.7, 0.9):
      dl.prune(params, record, fraction)
    assert not compiles()
    # Another model compiles once, which the log shows.
    dl.prune(small, small_record, 0.5)
    assert len(compiles()) == 1


def test_global_pruning_ranks_all_groups_together():
  params, record = _random_case(1)
  pruned, masks = dl.prune(params, record, 0.25, scope='global')
  conv_step = np.asarray(record['conv1']['kernel'])
  conv_norm = np.linalg.norm(
    np.asarray(params['conv1']['kernel']).reshape(-1, 10), axis=0
  )
  fc_step = np.asarray(record['fc']['kernel']).ravel()
  fc_norm = np.abs(np.asarray(params['fc']['kernel'])).ravel()
  step = np.concatenate([conv_step, fc_step])
  norm = np.concatenate([conv_norm, fc_norm])
  worst = _expected_pruned(step, norm, math.floor(0.25 * 40))
  got = np.concatenate(
    [
      ~np.asarray(masks['conv1']['kernel']).any(axis=(0, 1, 2)),
      ~np.asarray(masks['fc']['kernel']).ravel(),
    ]
  )
  assert set(np.flatnonzero(got)) == worst
  assert got.sum() == 10
  zero = int(np.sum(np.asarray(pruned['fc']['kernel']) == 0))
  assert zero == int((~np.asarray(masks['fc']['kernel'])).sum())


def test_only_named_layers_are_pruned_and_errors():
  params, record = _random_case()
  pruned, _ = dl.prune(params, record, 0.5, layers=['conv1'])
  np.testing.assert_array_equal(pruned['fc']['kernel'], params['fc']['kernel'])
  assert int(np.sum(~np.asarray(pruned['conv1']['bias'] != 0))) == 5
  with pytest.raises(ValueError, match="'conv9'"):
    dl.prune(params, record, 0.5, layers=['conv9'])
  with pytest.raises(ValueError, match='fraction'):
    dl.prune(params, record, 1.5)
  with pytest.raises(TypeError, match='fraction'):
    dl.prune(params, record, '0.5')


class _ConvBn(nnx.Module):
  def __init__(self, rngs):
    self.conv1 = nnx.Conv(2, 6, (3, 3), rngs=rngs)
    self.norm1 = nnx.BatchNorm(6, rngs=rngs)

  def __call__(self, x):
    return nnx.relu(self.norm1(self.conv1(x)))


def test_pruned_channels_output_exactly_zero_with_nnx_batch_norm():
  model = _ConvBn(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (4, 5, 5, 2))
  model(x)  # running statistics move away from 0 / 1
  model.norm1.mean[...] = jnp.arange(6.0) - 2.0
  model.norm1.bias[...] = jnp.ones(6)
  model.eval()
  record = {'conv1': {'kernel': jnp.array([0, 1, NS, 2, NS, 3], jnp.int32)}}
  spec = {'conv1': dl.Link(norm='norm1')}
  pruned, masks = dl.prune(nnx.state(model, nnx.Param), record, 0.5, spec=spec)
  nnx.update(model, pruned)
  out = np.asarray(model(x))
  keep = np.asarray(masks['conv1']['bias'])
  np.testing.assert_array_equal(keep, [True, True, False, True, False, False])
  assert not out[..., ~keep].any()
  assert out[..., keep].any()
  # Naming finds the norm too (conv1 -> bn1 or norm1), without a spec or
  # for a link that leaves it out (Link() without norm=).
  for spec in (None, {'conv1': dl.Link()}):
    _, masks = dl.prune(nnx.state(model, nnx.Param), record, 0.5, spec=spec)
    np.testing.assert_array_equal(masks['norm1']['scale'], keep)


def test_a_record_must_hold_integer_steps():
  # A per-filter support mask (booleans) read as steps would rank the
  # selected filters last (False = 0 = "earliest") and prune exactly them.
  params, record = _random_case()
  mask = {'conv1': {'kernel': record['conv1']['kernel'] < 5}}
  epochs = {'conv1': {'kernel': record['conv1']['kernel'].astype(jnp.float32)}}
  for bad in (mask, epochs):
    with pytest.raises(
      TypeError, match="record: leaf 'conv1/kernel' has dtype"
    ):
      dl.prune(params, bad, 0.5)
    with pytest.raises(TypeError, match='integer first-selection steps'):
      dl.rank_groups(params, bad)


def test_the_rule_sees_the_params_own_key_paths():
  # A list of kernels: the optimizer's init calls the rule with SequenceKey
  # paths, and so must ranking and pruning, or the groups differ.
  from jax.tree_util import SequenceKey

  params = [jnp.array([[1.0, 1.0, 9.0, 9.0]] * 4)]  # outputs 2, 3 are large

  def rule(path, leaf):
    del leaf
    by_output = isinstance(path[0], SequenceKey)
    return dl.GroupLasso(axes=-1 if by_output else 0)

  record = dl.magnitude_record(params, rule)
  np.testing.assert_array_equal(
    dl.rank_groups(params, record, penalty=rule)[0], [2, 3, 0, 1]
  )
  _, masks = dl.prune(params, record, 0.5, penalty=rule)
  np.testing.assert_array_equal(masks[0][0], [False, False, True, True])


def test_nothing_recorded_prunes_nothing():
  params, _ = _random_case()
  rule = dl.penalty_rule(conv=None, dense=None)
  empty = dl.magnitude_record(params, rule)
  for scope in ('layer', 'global'):
    assert not jax.tree.leaves(dl.rank_groups(params, empty, scope=scope))
    pruned, masks = dl.prune(params, empty, 0.5, scope=scope, penalty=rule)
    for a, b in zip(
      jax.tree.leaves(pruned), jax.tree.leaves(params), strict=True
    ):
      np.testing.assert_array_equal(a, b)
    assert all(bool(m.all()) for m in jax.tree.leaves(masks))


def test_numpy_scalars_are_numbers_too():
  params, record = _random_case()
  a = dl.prune(params, record, np.float32(0.5))
  b = dl.prune(params, record, 0.5)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  with pytest.raises(TypeError, match='fraction must be a Python number'):
    dl.prune(params, record, np.bool_(True))


def test_an_unhashable_rule_is_named():
  import dataclasses

  @dataclasses.dataclass
  class Rule:  # eq=True and not frozen: no __hash__
    lam: float = 1.0

    def __call__(self, path, leaf):
      return dl.GroupLasso(lam=self.lam) if leaf.ndim == 4 else None

  params, record = _random_case()
  record = {'conv1': record['conv1']}
  with pytest.raises(TypeError, match='penalty: the rule must be hashable'):
    dl.rank_groups(params, record, penalty=Rule())
  with pytest.raises(TypeError, match='penalty: the rule must be hashable'):
    dl.prune(params, record, 0.5, penalty=Rule())

  @dataclasses.dataclass(frozen=True)
  class FrozenRule:
    lam: float = 1.0
    __call__ = Rule.__call__

  dl.prune(params, record, 0.5, penalty=FrozenRule())


def test_a_norm_without_scale_is_refused_unless_its_statistics_come_along():
  params = {
    'conv1': {'kernel': jnp.ones((3, 3, 1, 4))},
    'bn1': {'bias': jnp.ones(4)},  # BatchNorm(use_scale=False)
    'conv2': {'kernel': jnp.ones((3, 3, 4, 2))},
  }
  record = dl.magnitude_record(params)
  spec = {'conv1': dl.Link(norm='bn1', consumers=('conv2',))}
  # Zeroing the shift leaves shift - mean/σ: the filter would not be silent.
  with pytest.raises(
    ValueError, match=r"norm 'bn1' of layer 'conv1' has no scale"
  ):
    dl.prune(params, record, 0.5, layers=['conv1'], spec=spec)
  # With the running statistics (NNX's nnx.state(model)) they are zeroed too.
  full = {
    **params,
    'bn1': {'bias': jnp.ones(4), 'mean': jnp.ones(4), 'var': jnp.ones(4)},
  }
  pruned, masks = dl.prune(full, record, 0.5, layers=['conv1'], spec=spec)
  dropped = ~np.asarray(masks['bn1']['mean'])
  assert dropped.sum() == 2
  assert not np.any(np.asarray(pruned['bn1']['mean'])[dropped])


def test_params_as_a_single_array():
  # dessilbi's own example steps a bare array; pruning by the record, and
  # W* with its channels, take one too (it has no biases or norms to follow).
  target = jnp.array([[3.0, 0.0], [0.0, -2.0]])
  tx = dl.track_selection(dl.dessilbi(0.05, nu=1.0))
  w = jnp.zeros((2, 2))
  state = tx.init(w)
  for _ in range(50):
    updates, state = tx.update(2 * (w - target), state, w)
    w = optax.apply_updates(w, updates)
  record = optax.tree.get(state, 'first_step')
  selected = np.asarray(dl.support(state, by_group=True))
  assert selected.tolist() == [[True, False], [False, True]]
  pruned, mask = dl.prune(w, record, 0.5)
  np.testing.assert_array_equal(mask, selected)
  np.testing.assert_array_equal(pruned, np.where(selected, w, 0))
  np.testing.assert_array_equal(
    dl.w_star(w, state, channels=True), dl.w_star(w, state)
  )


@pytest.mark.parametrize('norm', ['bn1', 'norm1'])
def test_a_coupled_norm_scale_keeps_only_what_both_prunings_keep(norm):
  # BatchNorm scales coupled with a lasso (network slimming) are pruned as a
  # leaf of their own and with conv1's filters. One mask used to overwrite
  # the other, by the names' order: a pruned filter kept its scale and
  # output a non-zero value ('norm1' sorts after 'conv1'), or the scale's
  # own pruning was lost ('bn1' sorts before).
  params = {
    'conv1': {'kernel': jnp.array([4.0, 1.0, 2.0, 3.0]).reshape(1, 1, 1, 4)},
    norm: {
      'scale': jnp.array([1.0, 2.0, 3.0, 4.0]),
      'bias': jnp.full(4, 0.5),
      'mean': jnp.full(4, 0.5),
      'var': jnp.ones(4),
    },
  }
  rule = dl.penalty_rule(overrides={f'{norm}/scale': dl.Lasso()})
  record = dl.magnitude_record(params, rule)
  spec = {'conv1': dl.Link(norm=norm)}
  pruned, masks = dl.prune(params, record, 0.5, penalty=rule, spec=spec)
  filters = np.array([True, False, False, True])  # the two largest kernels
  scales = np.array([False, False, True, True])  # the two largest scales
  np.testing.assert_array_equal(masks['conv1']['kernel'][0, 0, 0], filters)
  np.testing.assert_array_equal(masks[norm]['scale'], filters & scales)
  np.testing.assert_array_equal(masks[norm]['bias'], filters)
  # The pruned filters output exactly zero through the norm.
  n = pruned[norm]
  x = jnp.linspace(-2.0, 2.0, 5).reshape(5, 1, 1, 1)
  h = x * pruned['conv1']['kernel'][0, 0]
  out = (h - n['mean']) / jnp.sqrt(n['var'] + 1e-5) * n['scale'] + n['bias']
  assert not np.asarray(out)[..., ~filters].any()


class _Attention(nnx.Module):
  def __init__(self, rngs):
    # Random biases: the default zeros would hide a bias left unpruned.
    self.attn = nnx.MultiHeadAttention(
      num_heads=2,
      in_features=8,
      qkv_features=8,
      decode=False,
      bias_init=nnx.initializers.normal(1.0),
      rngs=rngs,
    )
    self.fc = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.fc(self.attn(x).mean(1))


def test_attention_kernels_are_pruned_with_their_bias_in_every_head():
  # The default rule groups a query/key/value kernel (in, heads, head_dim)
  # per last-axis index j, over every head; its bias (heads, head_dim) used
  # to be refused as if layers were stacked. Pruning j zeroes the slice
  # kernel[..., j] and bias[:, j] in every head: each output (h, j) is zero.
  model = _Attention(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 8))
  params = nnx.state(model, nnx.Param)
  before = pure(params)
  record = dl.magnitude_record(params)
  pruned, masks = dl.prune(params, record, 0.5)
  after, masks = pure(pruned), pure(masks)
  for name in ('query', 'key', 'value'):
    kernel, bias = after['attn'][name]['kernel'], after['attn'][name]['bias']
    assert kernel.shape == (8, 2, 4) and bias.shape == (2, 4)
    keep = np.asarray(masks['attn'][name]['kernel'][0, 0])
    assert keep.sum() == 2  # floor(0.5 · 4) of the 4 groups
    np.testing.assert_array_equal(
      masks['attn'][name]['kernel'], np.broadcast_to(keep, (8, 2, 4))
    )
    # The default rule couples a rank-2 bias too (a lasso): it keeps an
    # entry where its own pruning and its kernel's filter both keep it.
    _, own = dl.prune(params, record, 0.5, layers=[f'attn/{name}/bias'])
    np.testing.assert_array_equal(
      masks['attn'][name]['bias'],
      np.broadcast_to(keep, (2, 4))
      & np.asarray(pure(own)['attn'][name]['bias']),
    )
    assert not np.asarray(kernel)[..., ~keep].any()
    assert not np.asarray(bias)[:, ~keep].any()
    for leaf in ('kernel', 'bias'):
      m = np.asarray(masks['attn'][name][leaf])
      np.testing.assert_array_equal(
        np.asarray(after['attn'][name][leaf])[m],
        np.asarray(before['attn'][name][leaf])[m],
      )
    y = np.asarray(jnp.einsum('bti,ihd->bthd', x, kernel) + bias)
    assert not y[..., ~keep].any() and y[..., keep].all()
  nnx.update(model, pruned)
  for name in ('query', 'key', 'value'):  # the model's own projections
    keep = np.asarray(masks['attn'][name]['kernel'][0, 0])
    assert not np.asarray(getattr(model.attn, name)(x))[..., ~keep].any()
  assert np.isfinite(np.asarray(model(x))).all()
