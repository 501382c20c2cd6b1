"""Optax's own checks for contributed optimizers, run on ``dessilbi``.

Optax ships ``optax/contrib/_common_test.py``: convergence on a parabola, the
Rosenbrock function and matrix targets, extra ``update`` arguments, no
recompilation, ``inject_hyperparams``, dtype preservation, ``MultiSteps`` and
state stability under ``lax.cond``. We load that file from the installed wheel,
replace its list of optimizers with ``dessilbi`` alone (its documented default
hyper-parameters and a learning rate), and let pytest collect its test class.
"""

import ast
import importlib.util
import sys
import types

import dessilbi_jax as dl

# The hyper-parameters under test: the documented defaults (κ = 1, ν = 100,
# momentum 0.9) with a learning rate the Rosenbrock target tolerates.
DESSILBI_CASES = [
  {'opt_name': 'dessilbi', 'opt_kwargs': {'learning_rate': 1e-3}},
  # Γ rebuilt from z instead of stored: the same checks must hold.
  {
    'opt_name': 'dessilbi',
    'opt_kwargs': {'learning_rate': 1e-3, 'store_gamma': False},
  },
]

_SUITE = 'optax.contrib._common_test'


def _load_suite() -> types.ModuleType:
  """Optax's common contrib suite with dessilbi as its only optimizer."""
  spec = importlib.util.find_spec(_SUITE)
  assert spec is not None and spec.origin, f'{_SUITE} not found in optax'
  with open(spec.origin, encoding='utf-8') as f:
    tree = ast.parse(f.read(), filename=spec.origin)

  replaced = set()
  body = []
  for node in tree.body:
    if isinstance(node, ast.Assign) and len(node.targets) == 1:
      name = getattr(node.targets[0], 'id', None)
      if name == '_MAIN_OPTIMIZERS_UNDER_TEST' and name not in replaced:
        node.value = ast.Name('DESSILBI_CASES', ast.Load())
        replaced.add(name)
      elif name == '_BASE_OPTIMIZERS':
        node.value = ast.List([], ast.Load())
        replaced.add(name)
    if isinstance(node, ast.AugAssign) and (
      getattr(node.target, 'id', None) == '_MAIN_OPTIMIZERS_UNDER_TEST'
    ):
      replaced.add('+=')  # the wrappers' list: not ours to test
      continue
    body.append(node)
  tree.body = body
  assert replaced == {
    '_MAIN_OPTIMIZERS_UNDER_TEST',
    '_BASE_OPTIMIZERS',
    '+=',
  }, f'the layout of {spec.origin} changed; found only {sorted(replaced)}'
  ast.fix_missing_locations(tree)

  module = types.ModuleType('optax_contrib_common_suite_for_dessilbi')
  module.__file__ = spec.origin
  module.DESSILBI_CASES = [dict(c) for c in DESSILBI_CASES]
  sys.modules[module.__name__] = module
  exec(compile(tree, spec.origin, 'exec'), module.__dict__)

  original_factory = module._get_opt_factory

  def get_opt_factory(opt_name):
    if opt_name == 'dessilbi':
      return dl.dessilbi
    return original_factory(opt_name)

  module._get_opt_factory = get_opt_factory
  return module


_suite = _load_suite()


class TestOptaxContribSuite(_suite.ContribTest):
  """Every test of Optax's contrib suite, parameterised by dessilbi only."""
