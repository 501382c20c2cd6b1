"""The path runs from simple to complex: true signals enter Γ before noise.

Sparse linear regression with a known support: along the DessiLBI path the
support of Γ starts empty, the true features (or feature groups) all enter
before any null one, and the support keeps growing toward the full model.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl

N, P, K, STEPS = 200, 40, 5, 4000


def _support_path(penalty, out_dim, seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(N, P)).astype(np.float32)
  beta = np.zeros((P, out_dim), np.float32)
  beta[:K] = rng.uniform(1.5, 3, (K, out_dim)) * rng.choice(
    [-1, 1], (K, out_dim)
  )
  y = x @ beta + 0.5 * rng.normal(size=(N, out_dim)).astype(np.float32)

  def loss(w):
    return jnp.sum((y - x @ w) ** 2) / (2 * N)

  # Plain LBI (no momentum); a large κ follows the inverse scale space closely.
  tx = dl.dessilbi(0.01, kappa=10.0, nu=1.0, momentum=None, penalty=penalty)
  w = jnp.zeros((P, out_dim))

  def step(carry, _):
    w, state = carry
    updates, state = tx.update(jax.grad(loss)(w), state, w)
    selected = jnp.any(optax.tree.get(state, 'gamma') != 0, axis=1)
    return (optax.apply_updates(w, updates), state), selected

  _, selected = jax.lax.scan(jax.jit(step), (w, tx.init(w)), length=STEPS)
  return np.asarray(selected)  # (steps, features)


@pytest.mark.parametrize(
  'penalty, out_dim',
  [
    (None, 1),  # default rule: a rank-2 kernel is elementwise (lasso)
    (dl.penalty_rule(dense=dl.GroupLasso(axes=(0,))), 3),  # one group per input
  ],
  ids=['lasso', 'group'],
)
@pytest.mark.parametrize('seed', [0, 1])
def test_true_support_enters_first_and_support_grows(penalty, out_dim, seed):
  selected = _support_path(penalty, out_dim, seed)
  entered = np.where(selected.any(axis=0), selected.argmax(axis=0), STEPS)
  sizes = selected.sum(axis=1)

  assert sizes[0] == 0  # Γ starts at zero: the simplest model
  assert entered[:K].max() < entered[K:].min()  # signal before noise
  assert sizes[-1] > K  # the path goes on toward the full model
  checkpoints = sizes[:: STEPS // 10]
  assert np.all(np.diff(checkpoints) >= 0) and checkpoints[-1] > checkpoints[1]
