"""Where the update's device time goes: per-leaf kernels against flat passes.

Times, side by side and k passes inside one jit, elementwise passes over a
model's params (by default the CIFAR ResNet-18's: 62 leaves, 11.2 M numbers)
laid out two ways: as the model's leaves (one pass per leaf, as any Optax update and
``optax.apply_updates`` run) and as one flat buffer of the same size:

- ``apply``: ``W + u`` (what ``optax.apply_updates`` does; 3 arrays moved);
- ``sgd``: momentum and W in one pass (5 arrays);
- ``dessilbi_elementwise``: momentum, W, z and an elementwise Γ in one pass
  (9 arrays: the bytes of a DessiLBI update, without the filter norms);
- ``tiny``: ``W + u`` on as many leaves of 64 numbers each (launch cost alone,
  unless XLA fuses the passes horizontally: the fusion count says).

Per layout it prints the median time, the fusions XLA compiled, and
``(time of leaves - time of flat) / (their fusions' difference)``: the cost
of one more kernel (a pass over a leaf may take more than one). If XLA fuses
small per-leaf passes horizontally, the leaf layout approaches the flat one
and the fusion count drops below the leaf count.

Usage::

  python benchmarks/probes.py --json probes.json
  python benchmarks/probes.py --model lenet5 --k 1 --repeats 1   # a dry run
"""

import argparse
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp

try:
  from benchmarks import harness
except ImportError:  # run as a script from the repository root
  sys.path.insert(0, __file__.rsplit('/', 2)[0])
  from benchmarks import harness


def _apply(w, u):
  return (w + u, u)


def _sgd(w, m, g):
  m = 0.9 * m + g
  return (w - 0.1 * m, m, g)


def _dessilbi_elementwise(w, m, z, gamma, g):
  m = 0.9 * m + g
  diff = w - gamma
  z = z + 1e-3 * diff
  gamma = jnp.sign(z) * jnp.maximum(jnp.abs(z) - 1.0, 0)
  return (w - 0.1 * (m + diff / 100.0), m, z, gamma, g)


PASSES = {
  'apply': (_apply, 2),
  'sgd': (_sgd, 3),
  'dessilbi_elementwise': (_dessilbi_elementwise, 5),
}


def _loop(fn, k, arity):
  """k passes of fn over lists of arrays in one jit, buffers donated."""

  def run(*columns):
    def body(_, columns):
      outs = [fn(*arrays) for arrays in zip(*columns, strict=True)]
      return tuple(list(column) for column in zip(*outs, strict=True))

    return jax.lax.fori_loop(0, k, body, columns)

  return jax.jit(run, donate_argnums=tuple(range(arity)))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--k', type=harness.positive_int, default=20, help='passes per jit'
  )
  parser.add_argument('--repeats', type=harness.positive_int, default=15)
  parser.add_argument(
    '--model', choices=sorted(harness.MODELS), default='resnet18'
  )
  parser.add_argument('--json', default=None, help='write results here')
  args = parser.parse_args(argv)

  _, params, _, _, _ = harness.build(args.model, 2)
  n = sum(p.size for p in jax.tree.leaves(params))
  leaves = jax.tree.leaves(params)
  layouts = {
    'leaves': lambda: [jnp.full_like(p, 1e-3) for p in leaves],
    'flat': lambda: [jnp.full((n,), 1e-3)],
  }
  cases = {}
  for name, (fn, arity) in PASSES.items():
    for layout, make in layouts.items():
      cases[f'{name}/{layout}'] = (fn, [make() for _ in range(arity)])
  cases['tiny/leaves'] = (
    _apply,
    [[jnp.ones((64,)) for _ in leaves] for _ in range(2)],
  )
  cases['tiny/flat'] = (
    _apply,
    [[jnp.ones((64 * len(leaves),))] for _ in range(2)],
  )

  runners = {}
  for case, (fn, trees) in cases.items():
    run = _loop(fn, args.k, len(trees))
    trees = [jax.tree.map(jnp.copy, t) for t in trees]
    compiled = run.lower(*trees).compile()
    trees = run(*trees)
    jax.block_until_ready(trees)
    runners[case] = {
      'run': run,
      'trees': trees,
      # The passes run in a loop body: count fusions in the whole module.
      'fusions': harness.hlo_counts(compiled, entry_only=False)['fusions'],
      'ms': [],
    }
  for _ in range(args.repeats):
    for r in runners.values():
      t0 = time.perf_counter()
      r['trees'] = r['run'](*r['trees'])
      jax.block_until_ready(r['trees'])
      r['ms'].append((time.perf_counter() - t0) / args.k * 1e3)

  out = {
    'device': str(jax.devices()[0].device_kind),
    'backend': jax.default_backend(),
    'jax': jax.__version__,
    'model': args.model,
    'params': n,
    'leaves': len(leaves),
    'results': {},
  }
  print(
    f'probes on {out["device"]} ({out["backend"]}), {args.model}: '
    f'{len(leaves)} leaves'
  )
  for case, r in runners.items():
    out['results'][case] = {
      'ms': statistics.median(r['ms']),
      'fusions': r['fusions'],
    }
  for name in (*PASSES, 'tiny'):
    per_leaf = out['results'][f'{name}/leaves']
    flat = out['results'][f'{name}/flat']
    extra = per_leaf['fusions'] - flat['fusions']
    per_kernel_us = None
    if extra > 0 and per_leaf['ms'] > flat['ms']:
      per_kernel_us = (per_leaf['ms'] - flat['ms']) / extra * 1e3
    out['results'][f'{name}/per_extra_kernel_us'] = per_kernel_us
    print(
      f'{name:21s} leaves {per_leaf["ms"]:.4f} ms ({per_leaf["fusions"]} '
      f'fusions)  flat {flat["ms"]:.4f} ms ({flat["fusions"]})  '
      f'ratio {per_leaf["ms"] / flat["ms"]:.2f}'
      + (
        f'  {per_kernel_us:.2f} us per extra kernel'
        if per_kernel_us is not None
        else ''
      )
    )
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == '__main__':
  main()
