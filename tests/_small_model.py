"""A small params tree for the fused kernels' tests: widths that are not
powers of 2, rows that are not multiples of a tile, a bias (uncoupled), a
Dense kernel (lasso) and conv kernels (groups)."""

import jax
import jax.numpy as jnp


def small_params():
  k = jax.random.split(jax.random.key(0), 4)
  return {
    'conv1': {
      'kernel': jax.random.normal(k[0], (3, 3, 3, 20)),
      'bias': jax.random.normal(k[1], (20,)),
    },
    'conv2': {'kernel': jax.random.normal(k[2], (3, 3, 20, 40))},
    'fc': {'kernel': jax.random.normal(k[3], (70, 10)), 'bias': jnp.zeros(10)},
  }
