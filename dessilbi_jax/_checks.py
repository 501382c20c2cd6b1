"""Early checks of hyper-parameters, with errors that name the argument."""

import math
from typing import Any, Optional

import jax
import numpy as np


def concrete_scalar(name: str, value: Any) -> Optional[float]:
  """The value of a scalar hyper-parameter, or None when it is traced.

  Raises:
    TypeError: if the value is neither a real number nor a scalar array.
  """
  if isinstance(value, jax.core.Tracer):
    return None
  if isinstance(value, bool):
    raise TypeError(f'{name} must be a real number, got a bool ({value}).')
  try:
    arr = np.asarray(value)
  except Exception as e:  # pragma: no cover - exotic objects
    raise TypeError(f'{name} must be a real number, got {value!r}.') from e
  if arr.shape != () or not (
    np.issubdtype(arr.dtype, np.floating)
    or np.issubdtype(arr.dtype, np.integer)
  ):
    raise TypeError(
      f'{name} must be a real scalar, got {type(value).__name__} with '
      f'shape {arr.shape} and dtype {arr.dtype}.'
    )
  return float(arr)


def check_positive(name: str, value: Any) -> None:
  v = concrete_scalar(name, value)
  if v is not None and not (math.isfinite(v) and v > 0):
    raise ValueError(f'{name} must be a finite number > 0, got {v}.')


def check_non_negative(name: str, value: Any) -> None:
  v = concrete_scalar(name, value)
  if v is not None and not (math.isfinite(v) and v >= 0):
    raise ValueError(f'{name} must be a finite number >= 0, got {v}.')


def check_learning_rate(value: Any) -> None:
  """A learning rate is a schedule (unchecked) or a finite number >= 0."""
  if not callable(value):
    check_non_negative('learning_rate', value)


def check_unit_interval(name: str, value: Any) -> None:
  v = concrete_scalar(name, value)
  if v is not None and not 0 <= v < 1:
    raise ValueError(f'{name} must lie in [0, 1), got {v}.')
