"""dessilbi against the method written out in NumPy float64, for the branches
the reference's golden cases leave out: a learning-rate schedule, κ ≠ 1,
Nesterov without weight decay, freezing with weight decay, Nesterov or a
group-lasso Dense leaf, no momentum with weight decay, λ ≠ 1, √(group size)
thresholds, other group axes, a rank-3 kernel, and Γ rebuilt from z."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

import dessilbi_jax as dl

SHAPES = {
  'conv': (3, 3, 4, 6),
  'dense': (10, 5),
  'bias': (5,),
  'scale': (6,),
  'conv1d': (4, 3, 5),
}
STEPS = 40


def _prox(z, penalty):
  if penalty[0] == 'lasso':
    return np.sign(z) * np.maximum(np.abs(z) - penalty[1], 0)
  _, lam, axes, by_size = penalty
  if by_size:
    lam = lam * np.sqrt(np.prod([z.shape[a] for a in axes]))
  norm = np.sqrt(np.sum(z * z, axis=axes, keepdims=True))
  factor = np.where(norm > lam, 1 - lam / np.where(norm > 0, norm, 1), 0)
  return z * factor


def _numpy_step(w, g, m, z, gamma, t, c):
  """One DessiLBI step: weight decay, momentum, then the LBI core."""
  lr = c['lr'](t) if callable(c['lr']) else c['lr']
  kappa, nu = c['kappa'], c['nu']
  for k in w:
    d = g[k] + (c['wd'] * w[k] if w[k].ndim > 1 else 0)
    if c['beta'] is not None:
      m[k] = c['beta'] * m[k] + d
      d = d + c['beta'] * m[k] if c['nesterov'] else m[k]
    penalty = c['penalties'].get(k)
    if penalty is None:
      w[k] = w[k] - kappa * lr * d
      continue
    update = kappa * lr * (d + (w[k] - gamma[k]) / nu)
    z_next = z[k] + lr / nu * (w[k] - gamma[k])
    if c['freeze'] and penalty[0] == 'group':
      # Frozen: the groups of W* = W · 1[Γ ≠ 0] that are not zero.
      w_star = np.where(gamma[k] != 0, w[k], 0)
      moving = np.all(w_star == 0, axis=penalty[2], keepdims=True)
      update = np.where(moving, update, 0)
      z_next = np.where(moving, z_next, z[k])
    w[k] = w[k] - update
    z[k] = z_next
    gamma[k] = kappa * _prox(z[k], penalty)


DEFAULT = {
  'conv': ('group', 1.0, (0, 1, 2), False),
  'dense': ('lasso', 1.0),
  'conv1d': ('group', 1.0, (0, 1), False),
}
CUSTOM = {
  'conv': ('group', 0.7, (0, 1, 2), True),
  'dense': ('group', 0.5, (1,), False),
  'conv1d': ('lasso', 0.3),
}
CUSTOM_RULE = dl.penalty_rule(
  conv=dl.GroupLasso(lam=0.7, scale_by_size=True),
  dense=dl.GroupLasso(axes=0, lam=0.5),
  overrides={'conv1d': dl.Lasso(0.3)},
)
SCHEDULE = optax.piecewise_constant_schedule(0.3, {5: 0.5, 15: 0.4})
BASE = dict(
  lr=0.2, kappa=1.0, nu=2.0, beta=0.9, nesterov=False, wd=0.0, freeze=False
)
CASES = {
  'schedule, kappa, weight decay': dict(
    lr=SCHEDULE, kappa=1.5, nu=3.0, wd=1e-2
  ),
  'nesterov, kappa': dict(nesterov=True, kappa=2.0),
  'nesterov, weight decay, freeze, gamma from z': dict(
    nesterov=True, wd=1e-2, freeze=True, store_gamma=False
  ),
  'freeze, weight decay, kappa, schedule': dict(
    lr=SCHEDULE, kappa=2.0, nu=0.5, beta=0.5, wd=5e-3, freeze=True
  ),
  'no momentum, weight decay': dict(lr=0.3, beta=None, wd=1e-2),
  'other penalties, schedule, gamma from z': dict(
    lr=SCHEDULE, kappa=1.3, wd=1e-3, custom=True, store_gamma=False
  ),
  'other penalties, freeze': dict(lr=0.3, custom=True, freeze=True),
}


@pytest.mark.parametrize('case', CASES)
def test_dessilbi_follows_the_method_in_numpy(case, x64):
  c = {**BASE, **CASES[case]}
  c['penalties'] = CUSTOM if c.get('custom') else DEFAULT
  rng = np.random.default_rng(0)
  # Filters (and neurons) of growing norms, which enter Γ one by one.
  w = {
    k: rng.normal(size=s) * np.linspace(0.1, 0.8, s[-1])
    for k, s in SHAPES.items()
  }
  grads = [
    {k: rng.normal(size=s) * 0.1 for k, s in SHAPES.items()}
    for _ in range(STEPS)
  ]
  tx = dl.dessilbi(
    c['lr'],
    kappa=c['kappa'],
    nu=c['nu'],
    momentum=c['beta'],
    nesterov=c['nesterov'],
    weight_decay=c['wd'],
    penalty=CUSTOM_RULE if c.get('custom') else None,
    freeze=c['freeze'],
    store_gamma=c.get('store_gamma', True),
  )
  params = {k: jnp.asarray(v) for k, v in w.items()}
  state = tx.init(params)
  m = {k: np.zeros_like(v) for k, v in w.items()}
  z = {k: np.zeros_like(w[k]) for k in c['penalties']}
  gamma = {k: np.zeros_like(w[k]) for k in c['penalties']}
  frozen_steps, partial = 0, set()
  for t, g in enumerate(grads):
    updates, state = tx.update(
      {k: jnp.asarray(v) for k, v in g.items()}, state, params
    )
    params = optax.apply_updates(params, updates)
    if c['freeze']:
      frozen_steps += sum(
        int(np.any(np.asarray(updates[k]) == 0)) for k in ('conv', 'conv1d')
      )
    _numpy_step(w, g, m, z, gamma, t, c)
    got_z, got_gamma = optax.tree.get(state, 'z'), dl.get_gamma(state)
    for k in w:
      assert params[k].dtype == jnp.float64
      np.testing.assert_allclose(params[k], w[k], rtol=0, atol=1e-12)
    for k in c['penalties']:
      np.testing.assert_allclose(got_z[k], z[k], rtol=0, atol=1e-12)
      np.testing.assert_allclose(got_gamma[k], gamma[k], rtol=0, atol=1e-12)
      if 0 < np.mean(gamma[k] != 0) < 1:
        partial.add(k)
  # The comparison means something: every coupled leaf's support was
  # partial along the way, and freezing froze some groups.
  assert partial == set(c['penalties'])
  if c['freeze']:
    assert frozen_steps > 0
