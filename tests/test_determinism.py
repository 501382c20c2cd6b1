"""The same seed and inputs give bit-identical results, run after run."""

import hashlib
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import dessilbi_jax as dl


def _train(seed, steps=60):
  """Random init, random mini-batches, momentum, weight decay, a selection
  record: everything drawn from ``seed``; returns params and optimizer state."""
  k_init, k_data, k_teacher = jax.random.split(jax.random.key(seed), 3)
  ki = jax.random.split(k_init, 3)
  params = {
    'conv': {'kernel': 0.1 * jax.random.normal(ki[0], (3, 3, 2, 8))},
    'dense': {
      'kernel': jax.random.normal(ki[1], (8, 4)),
      'bias': jnp.zeros(4),
    },
  }
  teacher = jax.random.normal(k_teacher, (3, 3, 2, 8)) * (jnp.arange(8) < 3)
  x_all = jax.random.normal(k_data, (256, 6, 6, 2))

  def model(p, x):
    h = jax.lax.conv_general_dilated(
      x,
      p['conv']['kernel'],
      (1, 1),
      'SAME',
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
    )
    return (
      jax.nn.relu(h).mean(axis=(1, 2)) @ p['dense']['kernel']
      + p['dense']['bias']
    )

  y_all = model({'conv': {'kernel': teacher}, 'dense': params['dense']}, x_all)
  tx = dl.track_selection(
    dl.dessilbi(0.02, nu=0.2, weight_decay=1e-4, nesterov=True)
  )

  def step(carry, key):
    params, state = carry
    idx = jax.random.choice(key, 256, (32,), replace=False)
    loss = lambda p: jnp.mean((model(p, x_all[idx]) - y_all[idx]) ** 2)  # noqa: E731
    updates, state = tx.update(jax.grad(loss)(params), state, params)
    return (optax.apply_updates(params, updates), state), None

  keys = jax.random.split(jax.random.fold_in(k_data, 1), steps)
  run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), keys)[0])
  return run(params)


def _digest(tree):
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(leaf).tobytes())
  return h.hexdigest()


def test_two_runs_are_bit_identical():
  # One run in a fresh interpreter with another hash seed, started first so
  # that it overlaps with the two runs here.
  here = pathlib.Path(__file__).parent
  code = (
    f'import sys; sys.path.insert(0, {str(here)!r}); '
    'import test_determinism as t; print(t._digest(t._train(seed=3)))'
  )
  other = subprocess.Popen(
    [sys.executable, '-c', code],
    env={**os.environ, 'PYTHONHASHSEED': '12345'},
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  try:
    first = _train(seed=3)
    jax.clear_caches()  # recompile: the second run shares nothing with the first
    second = _train(seed=3)
    stdout, stderr = other.communicate(timeout=120)
  finally:
    other.kill()
  jax.tree.map(np.testing.assert_array_equal, first, second)
  assert _digest(first) == _digest(second)
  assert other.returncode == 0, stderr[-3000:]
  assert stdout.strip() == _digest(first)
  # The run is not trivial: some filters are selected, some not.
  gamma = optax.tree.get(first, 'gamma')['conv']['kernel']
  selected = jnp.any(gamma != 0, axis=(0, 1, 2))
  assert 0 < int(selected.sum()) < 8
