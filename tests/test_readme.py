"""The README's Python blocks run as written.

Each block runs in a namespace that supplies what the README leaves to the
reader (the model classes, a batch, a loss, a checkpoint path); the lines the
README elides with ``...`` are the only ones replaced. A block that stops
running, or runs but computes something other than it says, fails here.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dessilbi_jax as dl

README = pathlib.Path(__file__).parents[1] / 'README.md'


def _blocks() -> dict[str, str]:
  """The README's Python blocks, keyed by the heading above each."""
  out, heading, n, block = {}, None, 0, None
  for line in README.read_text(encoding='utf-8').splitlines(keepends=True):
    if block is not None:
      if line.rstrip() == '```':
        n += 1
        out[heading if n == 1 else f'{heading} ({n})'] = ''.join(block)
        block = None
      else:
        block.append(line)
    elif line.startswith('## '):
      heading, n = line[3:].strip(), 0
    elif line.rstrip() == '```python':
      block = []
  return out


BLOCKS = _blocks()


class Net(nnx.Module):
  """A conv-bn network built at given widths (the README's ``Net``)."""

  def __init__(self, widths=None, *, rngs):
    w = {'conv1': 8, 'conv2': 8, **(widths or {})}
    self.conv1 = nnx.Conv(1, w['conv1'], (3, 3), rngs=rngs)
    self.bn1 = nnx.BatchNorm(w['conv1'], rngs=rngs)
    self.conv2 = nnx.Conv(w['conv1'], w['conv2'], (3, 3), rngs=rngs)
    self.bn2 = nnx.BatchNorm(w['conv2'], rngs=rngs)
    self.fc = nnx.Linear(4 * 4 * w['conv2'], 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.max_pool(nnx.relu(self.bn2(self.conv2(x))), (2, 2), (2, 2))
    return self.fc(x.reshape(x.shape[0], -1))


def _batch():
  x = jax.random.normal(jax.random.key(1), (16, 8, 8, 1))
  y = jnp.arange(16) % 10
  return x, y


@nnx.jit
def _train_step(model, optimizer, x, y):
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def _run(name, namespace, replace=None):
  # The imports of the quickstart, which later blocks take as given.
  namespace = {'jax': jax, 'optax': optax, 'nnx': nnx, 'dl': dl, **namespace}
  code = BLOCKS[name]
  for old, new in (replace or {}).items():
    assert code.count(old) == 1, f'{name}: {old!r} is no longer in the block'
    code = code.replace(old, new)
  exec(compile(code, f'README.md: {name}', 'exec'), namespace)
  return namespace


def test_the_blocks_are_found():
  assert set(BLOCKS) == {
    'Quickstart (Flax NNX)',
    'API at a glance',
    'The sparse path, end to end',
    'Other layouts (Equinox, PyTorch-style weights)',
    'Scale and reliability',
    'Scale and reliability (2)',
    'Performance',
  }


def test_quickstart():
  x, y = _batch()
  # Train between the block's train_step and its reading of Γ.
  train = (
    'losses = [float(train_step(model, optimizer, x, y)) for _ in range(250)]\n'
  )
  marker = '# Γ, the sparse structure, lives in the optimizer state:'
  ns = _run(
    'Quickstart (Flax NNX)',
    {'MyModel': Net, 'x': x, 'y': y},
    {marker: train + marker},
  )
  assert ns['losses'][-1] < ns['losses'][0]
  # Filters have entered Γ's support, and the two readings agree.
  by_group = dl.support(ns['optimizer'].opt_state, by_group=True)
  assert 0 < int(ns['selected_filters'].sum()) <= 8
  assert ns['selected_filters'].shape == (8,)
  np.testing.assert_array_equal(
    ns['selected_filters'], by_group['conv1']['kernel']
  )


def test_penalty_rule_examples():
  ns = _run('API at a glance', {})
  model = Net(rngs=nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  state = ns['tx'].init(params)  # the lottery variant, the last one built
  gamma = dl.get_gamma(state)
  assert gamma['conv1']['kernel'].shape == (3, 3, 1, 8)
  rule = ns['rule']
  assert rule(('fc', 'kernel'), params['fc']['kernel'][...]) == dl.GroupLasso(
    axes=-1
  )
  assert rule(('head', 'kernel'), jnp.zeros((3, 4))) is None
  # Stacked layers: one group per (layer, filter), the biases uncoupled.
  blocks = {
    'blocks': {'kernel': jnp.ones((4, 3, 3, 2, 5)), 'bias': jnp.ones((4, 5))}
  }
  stacked = dl.dessilbi(0.1, penalty=ns['stacked']).init(blocks)
  assert dl.get_penalty(stacked).by_name[('blocks', 'kernel')] == (
    dl.GroupLasso(axes=(0, 4))  # axes resolved for the rank-5 leaf
  )
  assert ('blocks', 'bias') not in dl.get_penalty(stacked).by_name
  default = dl.dessilbi(0.1).init(blocks)
  assert dl.get_penalty(default).by_name[('blocks', 'bias')] == dl.Lasso()
  assert dl.support(stacked, by_group=True)['blocks']['kernel'].shape == (4, 5)


def test_sparse_path_walkthrough():
  x, y = _batch()
  model = Net(rngs=nnx.Rngs(0))
  train = 'for _ in range(15):\n  train_step(model, optimizer, x, y)'
  ns = _run(
    'The sparse path, end to end',
    {'model': model, 'x': x, 'y': y, 'Net': Net, 'train_step': _train_step},
    {'...  # train_step as in the quickstart': train},
  )
  # The path has started: some filters of conv2 are selected, some are not.
  assert 0 < int(ns['filters'].sum()) < 8
  assert 'conv2' in str(ns['summary'])
  # Pruning half of conv1 and conv2 zeroes those filters and their biases.
  for layer in ('conv1', 'conv2'):
    kept = np.asarray(ns['masks'][layer]['bias'][...])
    assert int(kept.sum()) == 4
    np.testing.assert_array_equal(ns['masks'][layer]['kernel'][0, 0, 0], kept)
    assert not np.any(ns['pruned'][layer]['kernel'][...][..., ~kept])
    assert not np.any(ns['pruned'][layer]['bias'][...][~kept])
  # The slim model has the kept widths; grown by 4 filters, conv2 has 8.
  assert ns['small'].conv2.out_features == 4
  assert ns['out'].widths == {'conv2': 8}


def test_other_layouts_block():
  # PyTorch layouts: conv weights (out, in, h, w), biases (out, 1, 1).
  keys = jax.random.split(jax.random.key(0), 3)
  params = {
    'conv1': {
      'weight': jax.random.normal(keys[0], (4, 1, 3, 3)),
      'bias': jnp.ones((4, 1, 1)),
    },
    'conv2': {
      'weight': jax.random.normal(keys[1], (6, 4, 3, 3)),
      'bias': jnp.ones((6, 1, 1)),
    },
    'fc': {'weight': jax.random.normal(keys[2], (10, 6)), 'bias': jnp.ones(10)},
  }
  # A loss whose optimum has the even filters far from zero and the odd ones
  # at zero; the biases stay at one (their target).
  even = (jnp.arange(4) % 2 == 0).reshape(4, 1, 1, 1)
  target = {**params, 'conv1': {**params['conv1']}}
  target['conv1']['weight'] = params['conv1']['weight'] * even * 3.0
  train = (
    'for _ in range(40):\n'
    '  grads = jax.tree.map(lambda w, t: w - t, params, target)\n'
    '  updates, state = tx.update(grads, state, params)\n'
    '  params = optax.apply_updates(params, updates)'
  )
  with pytest.warns(UserWarning, match="prune: 'conv1/weight' is grouped"):
    ns = _run(
      'Other layouts (Equinox, PyTorch-style weights)',
      {'params': params, 'target': target},
      {'...  # train': train},
    )
  penalties = dl.get_penalty(ns['state']).by_name
  assert penalties[('conv1', 'weight')] == dl.GroupLasso(axes=(0,))
  assert ('conv1', 'bias') not in penalties and (
    'fc',
    'weight',
  ) not in penalties
  # Filters 0 and 2 (the target's) are selected, 1 and 3 not yet.
  np.testing.assert_array_equal(ns['filters'], [True, False, True, False])
  kept = np.asarray(ns['kept'])
  assert kept.sum() == 2
  pruned = ns['pruned']['conv1']
  assert not np.any(np.asarray(pruned['weight'])[~kept])
  # The block zeroed the bias prune keeps.
  np.testing.assert_array_equal(np.asarray(pruned['bias']).ravel(), kept)


def test_many_hosts_block_on_one_process(monkeypatch):
  monkeypatch.setattr(jax.distributed, 'initialize', lambda *a, **k: None)
  x, y = _batch()
  x = x.reshape(16, -1)

  def init_params(key):
    k1, k2 = jax.random.split(key)
    return {
      'hidden': {'kernel': jax.random.normal(k1, (64, 32)) / 8},
      'out': {'kernel': jax.random.normal(k2, (32, 10)) / 6},
    }

  def loss_fn(p, x, y):
    logits = jax.nn.relu(x @ p['hidden']['kernel']) @ p['out']['kernel']
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def local_batches():
    return [(np.asarray(x), np.asarray(y))] * 3

  ns = _run(
    'Scale and reliability',
    {
      'init_params': init_params,
      'loss_fn': loss_fn,
      'local_batches': local_batches,
    },
  )
  params, opt_state = (
    init_params(jax.random.key(0)),
    ns['tx'].init(ns['params']),
  )
  for _ in range(3):
    grads = jax.grad(loss_fn)(params, x, y)
    updates, opt_state = ns['tx'].update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

  def check(a, b):  # one jitted step against eager ones: float32 rounding
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

  jax.tree.map(check, ns['params'], params)
  jax.tree.map(check, ns['opt_state'], opt_state)


def test_checkpoint_block(tmp_path):
  params = nnx.to_pure_dict(nnx.state(Net(rngs=nnx.Rngs(0)), nnx.Param))
  tx = dl.dessilbi(0.1, nu=1.0)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  for _ in range(3):
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
  ns = _run(
    'Scale and reliability (2)',
    {
      'path': tmp_path / 'ckpt',
      'params': params,
      'opt_state': opt_state,
      'tx': tx,
    },
  )
  saved = {'params': params, 'opt_state': opt_state}
  restored = ns['restored']
  assert jax.tree.structure(restored) == jax.tree.structure(saved)
  jax.tree.map(np.testing.assert_array_equal, restored, saved)
  # The restored state goes on as the saved one does.
  a = tx.update(grads, restored['opt_state'], restored['params'])
  b = tx.update(grads, opt_state, params)
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_fused_step_block():
  # The block's train step on a pytree of params, against dessilbi's step.
  k = jax.random.split(jax.random.key(0), 3)
  params = {
    'conv': {'kernel': jax.random.normal(k[0], (3, 3, 1, 6))},
    'fc': {'kernel': jax.random.normal(k[1], (6, 3)), 'bias': jnp.zeros(3)},
  }
  batch = jax.random.normal(k[2], (4, 5, 5, 1))

  def loss_fn(params, x):
    h = jax.lax.conv_general_dilated(
      x,
      params['conv']['kernel'],
      (1, 1),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    logits = h.mean(axis=(1, 2)) @ params['fc']['kernel'] + params['fc']['bias']
    return jnp.sum(logits**2)

  ns = _run(
    'Performance', {'params': params, 'loss_fn': loss_fn, 'batch': batch}
  )
  tx = dl.dessilbi(0.1, nu=100.0)
  updates, want_state = tx.update(
    jax.grad(loss_fn)(params, batch), tx.init(params), params
  )
  want = optax.apply_updates(params, updates)
  for got, ref in ((ns['params'], want), (ns['opt_state'], want_state)):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert not np.allclose(ns['params']['fc']['kernel'], params['fc']['kernel'])
