"""The multi-tensor Pallas step (``dl.fused_dessilbi``) under the names the
benchmarks use, and its agreement check against ``dessilbi``.

``dessilbi_multitensor(..., apply=False)`` is the kernels writing updates (an
Optax transformation, followed by ``optax.apply_updates``);
``apply=True`` is the :class:`dessilbi_jax.FusedDessilbi` itself, whose
``step`` writes the new params.
Both run the Pallas kernels on every backend (Triton on a GPU, interpret mode
elsewhere), so that the CPU checks exercise them.

Run as a script, it checks the kernels as the backend compiles them against
``dessilbi`` on a model's params (:func:`agreement`), which a GPU run does
before timing them.
"""

import argparse
import json
import math
import sys
from typing import Any

import jax
import jax.numpy as jnp
import optax

import dessilbi_jax as dl


def dessilbi_multitensor(
  learning_rate: optax.ScalarOrSchedule, apply: bool = False, **kwargs
):
  """``dl.fused_dessilbi(learning_rate, **kwargs)`` on its Pallas kernels:
  an Optax transformation, or with ``apply`` the ``FusedDessilbi``, run
  through its ``step`` (``interpret=False`` compiles them with Triton on any
  machine)."""
  fused = dl.fused_dessilbi(learning_rate, implementation='pallas', **kwargs)
  if apply:
    return fused
  return optax.GradientTransformation(fused.init, fused.update)


VARIANTS = {
  # name: (keyword arguments of dessilbi_multitensor, store_gamma of dessilbi)
  'dessilbi_mt': ({}, True),
  'dessilbi_mt_z': ({'store_gamma': False}, False),
  'dessilbi_mt_apply': ({'apply': True}, True),
}


def _lams_from(z, penalties, fraction):
  """Thresholds that select about ``fraction`` of the groups (or elements)
  of a lasso-free run's z: a quantile of its group norms, or of its |z|."""
  lams = {}
  for kind in (dl.GroupLasso, dl.Lasso):
    sizes = []
    for x, choice in zip(z, penalties, strict=True):
      if isinstance(choice, kind):
        axes = (
          tuple(choice.reduce_axes(x.ndim)) if kind is dl.GroupLasso else ()
        )
        sizes.append(jnp.sqrt(jnp.sum(x * x, axis=axes)).reshape(-1))
    if sizes:
      lams[kind] = float(jnp.quantile(jnp.concatenate(sizes), 1 - fraction))
  return lams


def agreement(
  params: Any,
  variants=tuple(VARIANTS),
  steps: int = 4,
  learning_rate: float = 0.5,
  nu: float = 2.0,
  weight_decay: float = 1e-4,
  selected: float = 0.5,
  interpret: bool | None = None,
) -> dict:
  """How closely the kernel follows ``dessilbi`` on ``params``: the largest
  differences after ``steps`` steps from the same start, with the same
  gradients (normal noise, one draw per step).

  The thresholds λ are set so that about ``selected`` of the conv filters and
  of the Dense weights are in Γ's support at the end (from a run with λ = 0),
  so that Γ, the norms and the shrinkage are all exercised, not only zeros.

  Returns:
    Per variant: the largest absolute difference and the largest one relative
    to the reference leaf's largest magnitude, over the params and over the
    whole state; and for the conv filters and the Dense weights, how many are
    in Γ's support in one run and not the other, and the share selected in
    the reference run.
  """
  penalties, treedef = dl.resolve_penalties(params, None)
  keys = jax.random.split(jax.random.key(0), steps)
  grads = [
    treedef.unflatten(
      jax.random.normal(k, w.shape, w.dtype)
      for k, w in zip(
        jax.random.split(key, treedef.num_leaves),
        treedef.flatten_up_to(params),
        strict=True,
      )
    )
    for key in keys
  ]

  def run(tx, step_fn):
    state, p = tx.init(params), params
    step = jax.jit(step_fn, donate_argnums=(1, 2))
    p, state = jax.tree.map(jnp.copy, (p, state))
    for g in grads:
      p, state = step(g, state, p)
    return p, state

  def optax_step(tx):
    def step(g, state, p):
      updates, state = tx.update(g, state, p)
      return optax.apply_updates(p, updates), state

    return step

  free = dl.penalty_rule(
    conv=dl.GroupLasso(axes=(-1,), lam=0.0), dense=dl.Lasso(lam=0.0)
  )
  kwargs = dict(learning_rate=learning_rate, nu=nu, weight_decay=weight_decay)
  tx = dl.dessilbi(**kwargs, penalty=free)
  _, state = run(tx, optax_step(tx))
  lams = _lams_from(treedef.flatten_up_to(state[3].z), penalties, selected)
  rule = dl.penalty_rule(
    conv=dl.GroupLasso(axes=(-1,), lam=lams.get(dl.GroupLasso, 1.0)),
    dense=dl.Lasso(lam=lams.get(dl.Lasso, 1.0)),
  )
  kwargs['penalty'] = rule
  references = {}
  out = {'lams': {k.__name__: v for k, v in lams.items()}, 'results': {}}
  for name in variants:
    options, store_gamma = VARIANTS[name]
    if store_gamma not in references:
      tx = dl.dessilbi(**kwargs, store_gamma=store_gamma)
      references[store_gamma] = run(tx, optax_step(tx))
    want = references[store_gamma]
    fused = dessilbi_multitensor(**kwargs, **options, interpret=interpret)
    got = run(fused, fused.step if options.get('apply') else optax_step(fused))
    out['results'][name] = _compare(got, want, penalties, treedef)
  return out


def default_choice() -> dict:
  """What ``dl.fused_dessilbi``'s default (``implementation=None``) does
  with arrays on the default device and on the CPU: per device platform,
  whether the step lowered for it holds the Triton kernels (None if it did
  not lower), and whether it ran (a conv layer's kernel and bias, one step;
  else the error). On a GPU machine, the GPU's
  arrays take the kernels and the CPU's XLA; elsewhere, XLA."""
  params = {
    'conv': {
      'kernel': jax.random.normal(jax.random.key(0), (3, 3, 16, 32)),
      'bias': jnp.zeros(32),
    }
  }
  out = {}
  for device in dict.fromkeys((jax.devices()[0], jax.devices('cpu')[0])):
    p = jax.device_put(params, device)
    tx = dl.fused_dessilbi(0.1, nu=1.0)
    state = tx.init(p)
    step, kernels = jax.jit(tx.step), None
    try:  # a failure is recorded, and the agreement results kept
      kernels = 'triton' in step.lower(p, state, p).as_text()
      new, _ = step(p, state, p)
      ran = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
    except Exception as error:
      ran = f'{type(error).__name__}: {str(error)[:300]}'
    out[device.platform] = {'kernels': kernels, 'ran': ran}
  return out


def _compare(got, want, penalties, treedef) -> dict:
  def worst(value) -> float:
    # A NaN is the largest difference: Python's max would pass over it.
    value = float(value)
    return math.inf if math.isnan(value) else value

  def errors(a, b):
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    absolute = max(worst(jnp.max(jnp.abs(x - y))) for x, y in pairs)
    relative = max(
      worst(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30))
      for x, y in pairs
    )
    return absolute, relative

  assert jax.tree.structure(got) == jax.tree.structure(want)
  params_abs, params_rel = errors(got[0], want[0])
  state_abs, state_rel = errors(got[1], want[1])
  out = {
    'params_max_abs': params_abs,
    'params_max_rel': params_rel,
    'state_max_abs': state_abs,
    'state_max_rel': state_rel,
  }
  gammas = [treedef.flatten_up_to(dl.get_gamma(s)) for s in (got[1], want[1])]
  for kind, unit in ((dl.GroupLasso, 'filters'), (dl.Lasso, 'weights')):
    pairs = [
      (a, b, c)
      for a, b, c in zip(*gammas, penalties, strict=True)
      if isinstance(c, kind)
    ]
    if not pairs:
      continue
    mismatch = selected = units = 0
    for a, b, c in pairs:
      axes = tuple(c.reduce_axes(a.ndim)) if kind is dl.GroupLasso else ()
      in_a, in_b = (jnp.any(x != 0, axis=axes) for x in (a, b))
      mismatch += int(jnp.sum(in_a != in_b))
      selected += int(jnp.sum(in_b))
      units += int(in_b.size)
    out[unit] = {
      'count': units,
      'support_mismatches': mismatch,
      'selected_share': selected / units,
    }
  # Float32 rounding stays far below this; a wrong kernel does not.
  out['ok'] = (
    max(params_rel, state_rel) < 1e-4
    and sum(
      out[u]['support_mismatches'] for u in ('filters', 'weights') if u in out
    )
    == 0
  )
  return out


def parse_args(argv=None) -> argparse.Namespace:
  """The command line of :func:`main`."""
  from benchmarks import harness

  parser = argparse.ArgumentParser(description=main.__doc__.split('\n\n')[0])
  parser.add_argument(
    '--model', choices=sorted(harness.MODELS), default='lenet5'
  )
  parser.add_argument('--steps', type=harness.positive_int, default=4)
  parser.add_argument(
    '--variants', nargs='+', choices=sorted(VARIANTS), default=list(VARIANTS)
  )
  parser.add_argument('--json', default=None, help='write results here')
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  """Checks the kernel against ``dessilbi`` on a model's params and prints
  the differences (see :func:`agreement`)."""
  args = parse_args(argv)
  from benchmarks import harness, report

  _, params, _, _, _ = harness.build(args.model, 2)
  out = agreement(params, args.variants, steps=args.steps)
  out.update(model=args.model, steps=args.steps, backend=jax.default_backend())
  out['default_choice'] = default_choice()
  print(
    f'{args.model}, {args.steps} steps on {out["backend"]}; λ {out["lams"]}'
  )
  for name, row in out['results'].items():
    supports = ', '.join(
      f'{row[unit]["support_mismatches"]} of {row[unit]["count"]} {unit}'
      f' ({row[unit]["selected_share"]:.0%} selected)'
      for unit in ('filters', 'weights')
      if unit in row
    )
    print(
      f'  {name:18s} {"ok" if row["ok"] else "MISMATCH"}; max difference:'
      f' params {row["params_max_abs"]:.1e}'
      f' ({row["params_max_rel"]:.1e} rel), state {row["state_max_abs"]:.1e}'
      f' ({row["state_max_rel"]:.1e} rel); in one support only: {supports}',
      flush=True,
    )
  for platform, row in out['default_choice'].items():
    print(
      f'  default (implementation=None), arrays on the {platform}:'
      f' {report.TAKEN[row["kernels"]]}, ran: {row["ran"]}',
      flush=True,
    )
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == '__main__':
  sys.path.insert(0, __file__.rsplit('/', 2)[0])  # the repository root
  main()
