"""Model cost: parameter counts and FLOPs from XLA's cost analysis."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from dessilbi_jax import _trees


def param_count(params: Any) -> int:
  """The number of scalar entries in a pytree (or a Flax NNX state).

  Every leaf counts: for a model's parameters alone, pass those
  (``nnx.state(model, nnx.Param)``, Linen's ``variables['params']``), not
  a state that also holds batch statistics or RNG counters.

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> dl.param_count({'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4)})
    16
  """
  return int(sum(np.size(x) for x in jax.tree.leaves(_trees.pure(params))))


def _is_data(value: Any) -> bool:
  """An array, a ``jax.ShapeDtypeStruct``, or a non-empty tree of them."""
  leaves = jax.tree.leaves(value)
  return bool(leaves) and all(
    isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)) for x in leaves
  )


def flops(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> float:
  """FLOPs of ``fn(*args, **kwargs)`` as XLA counts them after compiling.

  The count comes from ``jax.jit(fn).lower(...).compile().cost_analysis()``
  on the default backend: it is what the compiled program does, after XLA's
  own simplifications (a multiply-add counts as 2 FLOPs), not a per-layer
  formula.

  Args:
    fn: the function to measure, e.g. a model's forward pass
      ``lambda params, x: model.apply({'params': params}, x)``.
    *args: its arguments (arrays or ``jax.ShapeDtypeStruct``), traced.
    **kwargs: keyword arguments: arrays (and trees of them) are traced like
      ``args``; anything else (flags such as ``train=False``) is fixed at
      trace time.

  Returns:
    The FLOP count as a float.

  Raises:
    RuntimeError: the backend reports no FLOP count.

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> dl.flops(lambda w, x: x @ w, jnp.ones((64, 32)), jnp.ones((8, 64)))
    32768.0
  """
  # Arrays (and trees of them) are traced wherever they are passed; other
  # keyword values (flags such as train=False) are fixed at trace time.
  traced = {k: v for k, v in kwargs.items() if _is_data(v)}
  fixed = {k: v for k, v in kwargs.items() if k not in traced}
  bound = functools.partial(fn, **fixed) if fixed else fn
  compiled = jax.jit(bound).lower(*args, **traced).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older JAX: one dict per device
    analysis = analysis[0] if analysis else None
  if not analysis or 'flops' not in analysis:
    raise RuntimeError(
      f'the {jax.default_backend()} backend reports no FLOP count for fn.'
    )
  return float(analysis['flops'])
