"""Shrinkage (proximal) operators of the lasso and group-lasso penalties.

Both are exact at zero: a zero entry or a zero-norm group maps to exactly zero,
and neither values nor gradients through them contain NaN or Inf there.
"""

import functools
import numbers
from collections.abc import Sequence
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from dessilbi_jax import _checks
from dessilbi_jax.penalties import GroupLasso, Lasso, Penalty


def _check_args(z: Any, lam: Any, axes: Optional[tuple[int, ...]] = None):
  """z is floating-point; a concrete λ is finite and >= 0; λ's shape
  broadcasts to z's (elementwise) or to the groups' (z's shape with 1 along
  ``axes``) without growing it (at trace time)."""
  _checks.check_floating('z', z)
  _checks.check_threshold('lam', lam)
  shape = tuple(np.shape(z))
  what = "z's shape"
  if axes is not None:
    for a in axes:
      if not -len(shape) <= a < len(shape):
        raise ValueError(
          f'reduce_axes: axis {a} is out of range for z of shape {shape}.'
        )
    spanned = {a % len(shape) for a in axes}
    shape = tuple(1 if i in spanned else n for i, n in enumerate(shape))
    what = "the groups' shape (z's, with 1 along reduce_axes)"
  try:
    fits = np.broadcast_shapes(shape, np.shape(lam)) == shape
  except ValueError:
    fits = False
  if not fits:
    raise ValueError(
      f'lam: shape {np.shape(lam)} does not broadcast to {what}, {shape}: '
      'give a scalar, or one λ per entry in that shape.'
    )


def _as_axes(reduce_axes: Union[int, Sequence[int]]) -> tuple[int, ...]:
  """A single axis, or a sequence of axes, as a tuple (a static argument)."""
  if isinstance(reduce_axes, numbers.Integral) and not isinstance(
    reduce_axes, bool
  ):
    return (int(reduce_axes),)
  if isinstance(reduce_axes, Sequence) and all(
    isinstance(a, numbers.Integral) and not isinstance(a, bool)
    for a in reduce_axes
  ):
    return tuple(int(a) for a in reduce_axes)
  raise TypeError(
    'reduce_axes must be an axis (int) or a sequence of axes, got '
    f'{reduce_axes!r}.'
  )


def soft_threshold(z: jax.Array, lam: jax.typing.ArrayLike) -> jax.Array:
  r"""Elementwise soft-thresholding, the prox of ``λ‖·‖₁``.

  .. math::
    \mathrm{soft}(z, λ) = \mathrm{sign}(z) \max(|z| - λ, 0)

  Args:
    z: input array (floating-point).
    lam: threshold λ >= 0 (a scalar, or an array broadcastable to z's
      shape).

  Returns:
    An array of z's shape and dtype.

  Raises:
    TypeError: z is not floating-point (λ would be truncated to its dtype).
    ValueError: λ is concrete (not traced) and negative or not finite, or
      its shape does not broadcast to z's.

  Example:
    >>> import jax.numpy as jnp
    >>> from dessilbi_jax import soft_threshold
    >>> soft_threshold(jnp.array([-3.0, 0.5, 2.0]), 1.0)
    Array([-2.,  0.,  1.], dtype=float32)
  """
  _check_args(z, lam)
  return _soft_threshold(z, lam)


@jax.jit
def _soft_threshold(z, lam):
  lam = jnp.asarray(lam, z.dtype)
  return jnp.sign(z) * jnp.maximum(jnp.abs(z) - lam, 0)


def group_shrink(
  z: jax.Array,
  lam: jax.typing.ArrayLike,
  reduce_axes: Union[int, Sequence[int]],
) -> jax.Array:
  r"""Group soft-thresholding, the prox of ``λ Σ_g ‖z_g‖₂``.

  .. math::
    z_g \max\left(0, 1 - \frac{λ}{\|z_g\|_2}\right)

  A group is the set of entries sharing one index along the axes *not* in
  ``reduce_axes``; the norm runs over ``reduce_axes``.

  Args:
    z: input array (floating-point).
    lam: threshold λ >= 0: a scalar, or an array broadcastable to the
      groups' shape (z's shape with 1 along ``reduce_axes``).
    reduce_axes: the axes each group spans, or a single axis (static).

  Returns:
    An array of z's shape and dtype; a group with ``‖z_g‖ <= λ`` is exactly 0.

  Raises:
    TypeError: z is not floating-point (λ would be truncated to its dtype),
      or ``reduce_axes`` is not an int or a sequence of ints.
    ValueError: λ is concrete (not traced) and negative or not finite, or
      its shape does not broadcast to the groups'; an axis is out of range.

  Example:
    >>> import jax.numpy as jnp
    >>> from dessilbi_jax import group_shrink
    >>> z = jnp.array([[3.0, 0.1], [4.0, 0.0]])  # groups are columns
    >>> group_shrink(z, 1.0, reduce_axes=(0,))
    Array([[2.4, 0. ],
           [3.2, 0. ]], dtype=float32)
  """
  axes = _as_axes(reduce_axes)
  _check_args(z, lam, axes)
  return _group_shrink(z, lam, reduce_axes=axes)


@functools.partial(jax.jit, static_argnames=('reduce_axes',))
def _group_shrink(z, lam, reduce_axes):
  return z * _group_factor(z, lam, reduce_axes=reduce_axes)


def group_factor(
  z: jax.Array,
  lam: jax.typing.ArrayLike,
  reduce_axes: Union[int, Sequence[int]],
) -> jax.Array:
  r"""The per-group factor of :func:`group_shrink`: ``max(0, 1 - λ/‖z_g‖₂)``.

  Args:
    z: input array (floating-point).
    lam: threshold λ >= 0 (as in :func:`group_shrink`).
    reduce_axes: the axes each group spans, or a single axis (static).

  Returns:
    An array of z's dtype with size 1 along ``reduce_axes`` (one entry per
    group); ``group_shrink(z, ...) == z * group_factor(z, ...)``. It is 0
    exactly for groups with ``‖z_g‖ <= λ``, zero-norm groups included.

  Raises:
    As :func:`group_shrink`.
  """
  axes = _as_axes(reduce_axes)
  _check_args(z, lam, axes)
  return _group_factor(z, lam, reduce_axes=axes)


@functools.partial(jax.jit, static_argnames=('reduce_axes',))
def _group_factor(z, lam, reduce_axes):
  lam = jnp.asarray(lam, z.dtype)
  sq = jnp.sum(jnp.square(z), axis=reduce_axes, keepdims=True)
  # Double `where`: the square root is only taken of non-zero sums, so neither
  # the value nor its gradient sees 0/0 or sqrt'(0) at a zero group.
  nonzero = sq > 0
  safe_norm = jnp.sqrt(jnp.where(nonzero, sq, 1))
  selected = nonzero & (safe_norm > lam)
  return jnp.where(selected, 1 - lam / safe_norm, 0)


def group_threshold(penalty: GroupLasso, shape: Sequence[int]) -> float:
  """The effective group threshold: λ, or λ·√|g| with ``scale_by_size``."""
  if not penalty.scale_by_size:
    return penalty.lam
  size = 1
  for a in penalty.reduce_axes(len(shape)):
    size *= shape[a]
  return penalty.lam * size**0.5


def prox(z: jax.Array, penalty: Penalty) -> jax.Array:
  """Applies the shrinkage of ``penalty`` to z.

  Args:
    z: input array (floating-point).
    penalty: a :class:`~dessilbi_jax.Lasso` or a
      :class:`~dessilbi_jax.GroupLasso` (not a penalty rule).

  Returns:
    An array of z's shape and dtype.

  Raises:
    TypeError: ``penalty`` is not a Lasso or a GroupLasso, or z is not
      floating-point.
  """
  if not isinstance(penalty, (Lasso, GroupLasso)):
    hint = (
      '; a penalty rule gives one per leaf: call it as rule(path, leaf) first'
      if callable(penalty)
      else ''
    )
    raise TypeError(
      f'penalty must be a Lasso or a GroupLasso, got {penalty!r}{hint}.'
    )
  if isinstance(penalty, Lasso):
    return soft_threshold(z, penalty.lam)
  return group_shrink(
    z,
    group_threshold(penalty, z.shape),
    reduce_axes=penalty.reduce_axes(z.ndim),
  )


def in_support(gamma: jax.Array) -> jax.Array:
  """Where Γ is in the support: ``|Γ| > 0``, as the reference reads it (a
  NaN entry, left by a non-finite gradient, is not: its group's shrink is
  zero)."""
  return jnp.abs(gamma) > 0
