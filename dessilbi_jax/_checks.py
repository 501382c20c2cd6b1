"""Early checks of hyper-parameters, with errors that name the argument."""

import math
import numbers
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from dessilbi_jax.penalties import path_str

NO_PARAMS_MSG = (
  'params: DessiLBI needs the current parameters; call '
  'update(updates, state, params) with params.'
)


def concrete_scalar(name: str, value: Any) -> Optional[float]:
  """The value of a scalar hyper-parameter, or None when it is traced.

  Raises:
    TypeError: if the value is neither a real number nor a scalar array.
  """
  if isinstance(value, jax.core.Tracer):
    # Its value is unknown, but its shape and dtype are not.
    if value.ndim != 0 or not (
      jnp.issubdtype(value.dtype, jnp.floating)
      or jnp.issubdtype(value.dtype, jnp.integer)
    ):
      raise TypeError(
        f'{name} must be a real scalar, got a traced array of shape '
        f'{value.shape} and dtype {value.dtype}.'
      )
    return None
  if isinstance(value, bool):
    raise TypeError(f'{name} must be a real number, got a bool ({value}).')
  if callable(value):
    raise TypeError(
      f'{name} must be a real number, got a function; only learning_rate '
      'takes a schedule (optax.inject_hyperparams schedules the others).'
    )
  try:
    arr = np.asarray(value)
  except Exception as e:  # pragma: no cover - exotic objects
    raise TypeError(f'{name} must be a real number, got {value!r}.') from e
  if arr.shape != () or not (
    jnp.issubdtype(arr.dtype, jnp.floating)
    or jnp.issubdtype(arr.dtype, jnp.integer)
  ):
    raise TypeError(
      f'{name} must be a real scalar, got {type(value).__name__} with '
      f'shape {arr.shape} and dtype {arr.dtype}.'
    )
  return float(arr)


def check_fits_dtype(
  name: str, value: Any, dtype: Any, where: str, divisor: bool = False
) -> None:
  """A concrete hyper-parameter is finite in the dtype of ``where``, which
  it is cast to; and not 0 there if it is a ``divisor``.

  Raises:
    ValueError: it overflows that dtype (to inf, which would make ``where``
      inf or NaN), or a non-zero divisor rounds to 0 in it.
  """
  number = concrete_scalar(name, value)
  if number is None:
    return
  with np.errstate(over='ignore', under='ignore'):
    cast = np.asarray(number, np.float64).astype(jnp.dtype(dtype))
  if not np.isfinite(cast):
    largest = float(jnp.finfo(dtype).max)
    raise ValueError(
      f'{name}={number:g} overflows {jnp.dtype(dtype).name} (largest '
      f'{largest:g}), the dtype of {where}; use a smaller {name} or a wider '
      'state_dtype.'
    )
  if divisor and number != 0 and cast == 0:
    smallest = float(jnp.finfo(dtype).smallest_subnormal)
    raise ValueError(
      f'{name}={number:g} rounds to 0 in {jnp.dtype(dtype).name} (smallest '
      f'{smallest:g}), the dtype of {where}, and is divided by; use a larger '
      f'{name} or a wider state_dtype.'
    )


def check_rule_callable(penalty: Any) -> None:
  """A penalty rule is None (the default rule) or a callable.

  Raises:
    TypeError: otherwise (e.g. a penalty's name as a string).
  """
  if penalty is not None and not callable(penalty):
    raise TypeError(
      'penalty must be a rule (path, leaf) -> Penalty | None, or None for '
      f'the default rule; got {type(penalty).__name__}. Build one with '
      'dessilbi_jax.penalty_rule.'
    )


def check_int(name: str, value: Any, minimum: int, expected: str) -> int:
  """A Python or NumPy integer (not a bool) of at least ``minimum``.

  Raises:
    ValueError: otherwise, saying what was expected (e.g. 'a positive int').
  """
  if (
    isinstance(value, (bool, np.bool_))
    or not isinstance(value, numbers.Integral)
    or value < minimum
  ):
    raise ValueError(f'{name} must be {expected}, got {value!r}.')
  return int(value)


def check_bool(name: str, value: Any) -> bool:
  """A flag is a bool (NumPy's included), not a value read by truthiness
  (``'no'`` is true).

  Raises:
    TypeError: otherwise.
  """
  if not isinstance(value, (bool, np.bool_)):
    raise TypeError(f'{name} must be a bool, got {value!r}.')
  return bool(value)


def check_positive(name: str, value: Any) -> None:
  v = concrete_scalar(name, value)
  if v is not None and not (math.isfinite(v) and v > 0):
    raise ValueError(f'{name} must be a finite number > 0, got {v}.')


def check_non_negative(name: str, value: Any) -> None:
  v = concrete_scalar(name, value)
  if v is not None and not (math.isfinite(v) and v >= 0):
    raise ValueError(f'{name} must be a finite number >= 0, got {v}.')


def check_threshold(name: str, value: Any) -> None:
  """A concrete threshold λ (a scalar or an array) is finite and >= 0.

  Traced values, and arrays this process cannot read (spread over other
  hosts), are not checked.
  """
  if isinstance(value, jax.core.Tracer) or not getattr(
    value, 'is_fully_addressable', True
  ):
    return
  if np.ndim(value) == 0:
    check_non_negative(name, value)
    return
  arr = np.asarray(value)
  if arr.dtype == bool or not (
    jnp.issubdtype(arr.dtype, jnp.floating)
    or jnp.issubdtype(arr.dtype, jnp.integer)
  ):
    raise TypeError(
      f'{name} must be a real number or a real array, got dtype {arr.dtype}.'
    )
  bad = arr[~(np.isfinite(arr) & (arr >= 0))]
  if bad.size:
    raise ValueError(
      f'{name} must be finite and >= 0 everywhere, got {bad.flat[0]}.'
    )


def check_floating(name: str, value: Any) -> None:
  """An array whose dtype is a real floating-point type (at trace time)."""
  dtype = jnp.result_type(value)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f'{name} must be a floating-point array, got dtype {dtype}; the '
      f'threshold would be cast to that dtype (0.5 -> 0): cast {name} first, '
      f'e.g. {name}.astype(jnp.float32).'
    )


def check_learning_rate(value: Any) -> None:
  """A learning rate is a schedule (unchecked) or a finite number >= 0."""
  if not callable(value):
    check_non_negative('learning_rate', value)


def check_unit_interval(name: str, value: Any) -> None:
  v = concrete_scalar(name, value)
  if v is not None and not 0 <= v < 1:
    raise ValueError(f'{name} must lie in [0, 1), got {v}.')


# Trees handed to `init` and `update`. Everything below looks at structures,
# shapes and dtypes only: it runs once per trace, costs nothing inside a jit
# and never reads a value (no host syncs).

_STATE_FIELDS = ('count', 'z', 'gamma', 'penalties')
RESTORE_HINT = (
  'init it with the same params and penalty rule, or restore a checkpoint '
  'into the structure that tx.init(params) (or jax.eval_shape(tx.init, '
  'params)) returns'
)


def _is_empty(x: Any) -> bool:
  """None, ``optax.MaskedNode()`` or ``()``: nodes that hold no arrays."""
  return x is None or (isinstance(x, tuple) and not x)


def _leaf_paths(tree: Any, keep_empty: bool = False) -> list[str]:
  """The paths of ``tree``'s leaves; with ``keep_empty``, also of its
  empty nodes but None (which holds nothing in params and state alike: an
  Equinox field filtered out)."""
  is_leaf = _is_empty if keep_empty else None
  out = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf)[0]:
    if leaf is None:
      continue
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey):
      if path[-1].name in ('value', 'raw_value'):
        path = path[:-1]
    out.append(path_str(path) or '<root>')
  return out


def _describe(leaf: Any) -> str:
  if leaf is None:
    return 'None'
  if hasattr(leaf, 'shape') and hasattr(leaf, 'dtype'):
    return f'an array of shape {tuple(leaf.shape)} and dtype {leaf.dtype}'
  kind = type(leaf).__name__
  return f'{"an" if kind[:1].lower() in "aeiou" else "a"} {kind}'


def _is_array(leaf: Any) -> bool:
  return hasattr(leaf, 'shape') and hasattr(leaf, 'dtype')


def _up_to(name: str, treedef: Any, tree: Any, params: Any) -> list[Any]:
  """Flattens ``tree`` up to the params' structure, or says what differs."""
  try:
    return treedef.flatten_up_to(tree)
  except (ValueError, TypeError):
    pass
  # A params leaf is present when the tree has it, or a subtree under it (Γ
  # may be stored as a node); empty nodes count, as they mark uncoupled leaves.
  want = _leaf_paths(params, keep_empty=True)
  got = _leaf_paths(tree, keep_empty=True)

  def under(a, b):
    return a == b or a.startswith(b + '/')

  missing = [w for w in want if not any(under(g, w) for g in got)]
  extra = [g for g in got if not any(under(g, w) for w in want)]
  detail = []
  if missing:
    detail.append(f'missing {missing[:5]}')
  if extra:
    detail.append(f'unexpected {extra[:5]}')
  if not detail:
    detail.append(
      f'containers differ: {treedef} against {jax.tree.structure(tree)}'
    )
  raise ValueError(
    f'{name} does not have the structure of params: {"; ".join(detail)}.'
  )


def check_param_leaves(params: Any) -> None:
  """Python numbers as leaves: neither an array nor a placeholder."""
  for name, leaf in zip(
    _leaf_paths(params), jax.tree.leaves(params), strict=True
  ):
    # (NumPy's float64 and complex128 scalars are Python numbers too, but
    # typed: as 0-d arrays.)
    if isinstance(leaf, (bool, int, float, complex)) and not isinstance(
      leaf, np.generic
    ):
      raise TypeError(
        f'params: leaf {name!r} is a Python {type(leaf).__name__}, not an '
        'array; wrap it with jnp.asarray so that its dtype is explicit.'
      )


def check_update_trees(
  updates: Any,
  state: Any,
  params: Any,
  penalties: list[Any],
  treedef: Any,
) -> None:
  """Checks ``update``'s arguments against the params, at trace time.

  ``updates`` must mirror ``params`` leaf by leaf (same structure and shapes,
  real floating dtypes; the dtype may differ); ``state`` must be the
  ``DessiLBIState`` that ``init`` built for these params and this penalty
  rule: arrays of the params' shapes where a leaf is coupled, empty nodes
  where it is not.

  Raises:
    TypeError: a wrong type of state, a leaf that is not an array, or a
      gradient with a dtype that is not real floating-point.
    ValueError: a structure or a shape that does not match the params'.
  """
  fields = getattr(type(state), '_fields', None)
  if fields != _STATE_FIELDS:
    raise TypeError(
      f'state must be the DessiLBIState that init returned, got '
      f'{type(state).__name__}; {RESTORE_HINT}.'
    )
  if jnp.ndim(state.count) != 0:
    raise ValueError(
      f'state.count must be a scalar, got shape {jnp.shape(state.count)}.'
    )
  names, leaves = check_gradients(updates, params, treedef)

  for field in ('z', 'gamma'):
    tree = getattr(state, field)
    for name, w, s, choice in zip(
      names,
      leaves,
      _up_to(f'state.{field}', treedef, tree, params),
      penalties,
      strict=True,
    ):
      coupled = choice is not None
      holds = _is_array(s)
      if coupled and not holds:
        raise ValueError(
          f'state.{field}: leaf {name!r} is coupled to a sparse Γ by the '
          f'penalty rule, but the state holds {_describe(s)} there: the '
          f'state was built for other params or another penalty rule; '
          f'{RESTORE_HINT}.'
        )
      if not coupled and holds:
        raise ValueError(
          f'state.{field}: leaf {name!r} is not coupled by the penalty rule, '
          f'but the state holds {_describe(s)} there: the state was built '
          f'for another penalty rule; {RESTORE_HINT}.'
        )
      if not coupled:
        continue
      shapes = [tuple(w.shape)]
      if field == 'gamma' and hasattr(choice, 'group_shape'):
        # store_gamma=False keeps one scale per group of a group-lasso leaf.
        shapes.append(choice.group_shape(w.shape))
      if tuple(s.shape) not in shapes:
        raise ValueError(
          f'state.{field}: leaf {name!r} has shape {tuple(s.shape)}, its '
          f'parameter {tuple(w.shape)}: the state belongs to another model; '
          f'{RESTORE_HINT}.'
        )
      if not jnp.issubdtype(s.dtype, jnp.floating):
        raise TypeError(
          f'state.{field}: leaf {name!r} has dtype {s.dtype}; z and Γ must '
          'be floating-point.'
        )


def check_params_shaped(name: str, tree: Any, params: Any) -> None:
  """A params-shaped state (a momentum buffer) has the params' structure
  and shapes, at trace time.

  Raises:
    ValueError: a structure or a shape that does not match the params'.
  """
  treedef: Any = jax.tree.structure(params)
  for leaf, w, s in zip(
    _leaf_paths(params),
    treedef.flatten_up_to(params),
    _up_to(name, treedef, tree, params),
    strict=True,
  ):
    if _is_array(w) and not (_is_array(s) and s.shape == w.shape):
      raise ValueError(
        f'{name}: leaf {leaf!r} is {_describe(s)}, its parameter has shape '
        f'{tuple(w.shape)}: the state belongs to another model; '
        f'{RESTORE_HINT}.'
      )


def is_map_params_placeholder(params: Any) -> bool:
  """Whether ``init`` was given ``optax.tree.map_params``'s placeholder (a
  leafless node of Optax's private type) rather than params."""
  found = jax.tree.leaves(
    params, is_leaf=lambda x: type(x).__name__ == '_ParamsPlaceholder'
  )
  return any(type(x).__name__ == '_ParamsPlaceholder' for x in found)


def check_param_arrays(params: Any) -> None:
  """Every leaf of the params is an array, but for the one placeholder that
  stands for the whole params under ``optax.tree.map_params``.

  Raises:
    TypeError: a Python number, a string or another object as a leaf.
  """
  check_param_leaves(params)
  if is_map_params_placeholder(params):
    return
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  for name, (_, leaf) in zip(_leaf_paths(params), flat, strict=True):
    if not _is_array(leaf):
      raise TypeError(
        f'params: leaf {name!r} is {_describe(leaf)}, not an array.'
      )


def check_gradients(
  updates: Any, params: Any, treedef: Any = None
) -> tuple[list[str], list[Any]]:
  """Checks that ``updates`` mirror ``params`` leaf by leaf, at trace time.

  Same structure and shapes, real floating dtypes (the dtype may differ from
  the param's).

  Returns:
    The params' leaf names and leaves, in flattening order.

  Raises:
    TypeError: a leaf that is not an array, or a gradient with a dtype that
      is not real floating-point.
    ValueError: a structure or a shape that does not match the params'.
  """
  if treedef is None:
    treedef = jax.tree.structure(params)
  names = _leaf_paths(params)
  leaves = treedef.flatten_up_to(params)
  check_param_leaves(params)
  for name, w in zip(names, leaves, strict=True):
    if not _is_array(w):
      raise TypeError(f'params: leaf {name!r} is {_describe(w)}, not an array.')

  for name, w, d in zip(
    names, leaves, _up_to('updates', treedef, updates, params), strict=True
  ):
    if not _is_array(d):
      raise TypeError(
        f'updates: leaf {name!r} is {_describe(d)}; expected an array '
        f'of shape {tuple(w.shape)} like its parameter.'
      )
    if tuple(d.shape) != tuple(w.shape):
      raise ValueError(
        f'updates: leaf {name!r} has shape {tuple(d.shape)}, its parameter '
        f'{tuple(w.shape)}; gradients must have the shapes of the params.'
      )
    if d.dtype == jax.dtypes.float0:
      raise TypeError(
        f'updates: leaf {name!r} has dtype float0, the gradient of an '
        'integer input (jax.grad(..., allow_int=True)); exclude the leaf from '
        'the optimizer.'
      )
    if not jnp.issubdtype(d.dtype, jnp.floating):
      raise TypeError(
        f'updates: leaf {name!r} has dtype {d.dtype}; DessiLBI needs real '
        'floating-point gradients (cast them, or exclude the leaf from the '
        'optimizer).'
      )
  return names, leaves


def check_state_dtype(value: Any) -> None:
  """``state_dtype`` is None or a floating-point dtype of 16 bits or more."""
  if value is None:
    return
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    # E.g. jnp.float32(count): optax.inject_hyperparams calls callables.
    raise TypeError(
      f'state_dtype must be a dtype (e.g. jnp.float32 or "float32"), got the '
      f'array {value!r}; under optax.inject_hyperparams, name state_dtype in '
      "static_args (static_args=('state_dtype',))."
    )
  try:
    dtype = jnp.dtype(value)
  except TypeError as e:
    raise TypeError(
      f'state_dtype must be a floating-point dtype or None, got {value!r}.'
    ) from e
  if not jnp.issubdtype(dtype, jnp.floating):
    raise TypeError(
      f'state_dtype must be a floating-point dtype or None, got {dtype}: z '
      'and Γ accumulate small steps and would be truncated.'
    )
  if dtype.itemsize < 2:
    raise TypeError(
      f'state_dtype must have 16 bits or more, got {dtype}: z and Γ '
      'accumulate small steps and would be lost.'
    )


def _is_bool_scalar(value: Any) -> bool:
  """A Python or NumPy bool, or a concrete 0-d boolean array."""
  if isinstance(value, (bool, np.bool_)):
    return True
  if isinstance(value, jax.core.Tracer):
    return False
  return (
    isinstance(value, (jax.Array, np.ndarray))
    and value.shape == ()
    and value.dtype == bool
  )


def check_mask_leaves(mask: Any, arg: str = 'weight_decay_mask') -> None:
  """A mask tree holds Python (or NumPy) bools, one per parameter leaf.

  Raises:
    TypeError: a leaf is something else than one bool (a 0-d bool array
      counts): a string (not a layer name), a per-element array, or a traced
      value such as ``optax.inject_hyperparams`` makes by calling a mask
      function with the step count.
  """
  for name, leaf in zip(_leaf_paths(mask), jax.tree.leaves(mask), strict=True):
    if not _is_bool_scalar(leaf):
      hint = (
        '; under optax.inject_hyperparams, name it in static_args '
        "(static_args=('weight_decay_mask',)), or it is called with the "
        'step count'
        if isinstance(leaf, jax.core.Tracer)
        else ''
      )
      raise TypeError(
        f'{arg} must be None, a function params -> tree of bools, or a tree '
        f'of bools (one per leaf) laid out like the params; leaf {name!r} is '
        f'{leaf!r}{hint}.'
      )


def check_mask_tree(
  mask: Any,
  params: Any,
  arg: str = 'weight_decay_mask',
  *,
  from_function: bool = False,
):
  """The mask (or what a mask function returned) fits the params' tree: the
  same tree, or a prefix of it (as ``optax.masked`` allows).

  A single bool given as the mask of params laid out as a tree is refused:
  it is what a mask function gives when ``optax.inject_hyperparams`` calls
  it with the step count (``matrix_mask(count)`` is False: no decay at all;
  ``lambda p: jax.tree.map(lambda x: x.ndim < 2, p)`` gives True: decay
  everywhere), silently. A function of the params may return one (True
  decays every leaf, as in ``optax.masked``); a single array's mask is one.
  """
  check_mask_leaves(mask, arg)
  if (
    not from_function
    and _is_bool_scalar(mask)
    and not jax.tree_util.treedef_is_leaf(jax.tree.structure(params))
  ):
    raise TypeError(
      f'{arg} is the single bool {bool(mask)} for params laid out as a '
      'tree: give a tree of bools laid out like the params (or a prefix of '
      'them), a function params -> such a tree (lambda params: True decays '
      'every leaf; weight_decay=0 decays none), or None for matrix_mask. '
      'Under optax.inject_hyperparams, name a mask function in static_args '
      "(static_args=('weight_decay_mask',)), or it is called with the step "
      'count and gives a single bool.'
    )
  try:
    jax.tree.map(lambda m, p: None, mask, params)
  except (ValueError, TypeError):
    raise ValueError(
      f'{arg}: the tree of bools must be laid out like the params (or like '
      f'a prefix of them); it is {jax.tree.structure(mask)}, the params are '
      f'{jax.tree.structure(params)}.'
    ) from None
