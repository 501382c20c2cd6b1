"""Network surgery on the path: re-initialise, widen and slim layers.

Each operation edits the *output channels* of layers and carries every tree
that holds them along: the params, the normalisation statistics
(``batch_stats`` in Linen; in Flax NNX pass ``nnx.state(model)``, which holds
both) and the optimizer state (z, Γ, momentum or any other params-shaped
buffer, and the first-selection record of
:func:`~dessilbi_jax.track_selection`, which follows the axes its kernel is
grouped along, as the penalties the DessiLBI state records say). Leaves of
the optimizer state are matched to params by their key path (its end must
equal the param's path).
How channels flow from a layer to its norm and its consumers is given by a
spec (see :mod:`dessilbi_jax.topology`).

All functions are pure: they return new trees and leave their inputs alone.
For Flax NNX, build the model at its new widths and load the result with
``nnx.update(new_model, result.params)``.
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax import _checks, _trees
from dessilbi_jax.path import support
from dessilbi_jax.penalties import GroupLasso, PenaltyRule, PenaltyTable
from dessilbi_jax.selection import NOT_SELECTED
from dessilbi_jax.topology import (
  Spec,
  check_spec_table,
  consumer_repeat,
  producer_width,
)
from dessilbi_jax.transform import DessiLBIState


class Surgery(NamedTuple):
  """The result of :func:`widen` or :func:`slim`.

  Attributes:
    params: the new params.
    opt_state: the new optimizer state (None if none was given).
    batch_stats: the new normalisation statistics (None if none was given).
    widths: the new output width of every edited layer.
  """

  params: Any
  opt_state: Any
  batch_stats: Any
  widths: dict[str, int]


# ----------------------------------------------------------------------------
# Channel edits: a new channel list for one layer, applied to every tree.


def _take(x, src: np.ndarray, axis: int, fill, repeat: int = 1):
  """``x`` with its channels along ``axis`` re-ordered as ``src``.

  ``src[j] >= 0`` takes old channel ``src[j]``; ``-1`` makes a new channel
  filled with ``fill``. With ``repeat > 1`` the axis holds ``repeat`` blocks
  of channels, channels fastest (a channels-last flattened feature map).
  Surgery is a rare host-side operation: it runs in NumPy (no compilation
  per shape) and returns a JAX array (with ``x``'s sharding where the
  shape stays).
  """
  like, x = x, np.asarray(x)
  axis = axis % x.ndim
  channels = x.shape[axis] // repeat
  blocks = x.reshape((*x.shape[:axis], repeat, channels, *x.shape[axis + 1 :]))
  taken = np.take(blocks, np.where(src >= 0, src, 0), axis=axis + 1)
  new = (src < 0).reshape((-1,) + (1,) * (blocks.ndim - axis - 2))
  taken = np.where(new, np.asarray(fill).astype(x.dtype), taken)
  out_shape = (*x.shape[:axis], repeat * len(src), *x.shape[axis + 1 :])
  return _placed_like(taken.reshape(out_shape), like)


def _is_placed(x) -> bool:
  """Whether ``x`` is a JAX array committed to its sharding, over one
  device or several (as ``jax.device_put`` leaves it)."""
  return (
    isinstance(x, jax.Array)
    and not isinstance(x, jax.core.Tracer)
    and getattr(x, 'committed', True)
  )


def _placed_like(new, x) -> jax.Array:
  """``new`` (a NumPy or JAX array) as a JAX array, with the sharding of
  ``x`` where ``x`` is placed (:func:`_is_placed`) and of the same shape."""
  if _is_placed(x) and tuple(np.shape(new)) == tuple(x.shape):
    return jax.device_put(new, x.sharding)
  return jnp.asarray(new)


def _norm_fill(leaf_name: str) -> float:
  """New norm channels: unit scale and variance, zero shift and mean."""
  return 1.0 if leaf_name in ('scale', 'var', 'variance') else 0.0


class _Edit:
  """A channel edit of one producer layer, applicable to any tree."""

  def __init__(self, table, spec_link, layer, src, *, outputs_only=False):
    self.layer = _trees.split_name(layer)
    self.src = np.asarray(src, np.int64)
    width = producer_width(table, layer)
    self.width = width
    # Full leaf names -> (axis, repeat, fill for params).
    self.ops: dict[_trees.Names, tuple[int, int, float]] = {
      (*self.layer, 'kernel'): (-1, 1, 0.0)
    }
    bias = (*self.layer, 'bias')
    if bias in table and tuple(table[bias].shape) == (width,):
      self.ops[bias] = (0, 1, 0.0)
    self.consumer_kernels = set()
    if outputs_only or spec_link is None:
      return
    if spec_link.norm is not None:
      norm = _trees.split_name(spec_link.norm)
      for names, v in table.items():
        if names[:-1] == norm and tuple(v.shape) == (width,):
          self.ops[names] = (0, 1, _norm_fill(names[-1]))
    for consumer in spec_link.consumers:
      repeat = consumer_repeat(table, layer, consumer, width)
      names = (*_trees.split_name(consumer), 'kernel')
      self.ops[names] = (-2, repeat, 0.0)
      self.consumer_kernels.add(names)

  def apply(
    self, tree, param_shapes, *, state=False, where='params', penalties=None
  ):
    """Applies the edit to a pure tree (params, batch stats or opt state).

    A params or batch-stats leaf is edited when its name is in the edit; an
    optimizer-state leaf when the longest end of its name that names a param
    is in the edit. ``penalties`` (those the DessiLBI state records, by
    name) tell which axes of a kernel a per-group record of it follows.
    """

    def match(names):
      if not state:
        return names if names in self.ops else None
      for k in range(len(names)):
        if names[k:] in param_shapes:
          return names[k:] if names[k:] in self.ops else None
      return None

    def one(names, x):
      key = match(names)
      if key is None or not hasattr(x, 'shape'):
        return x
      axis, repeat, fill = self.ops[key]
      integer = jnp.issubdtype(x.dtype, jnp.integer)
      if state:
        fill = NOT_SELECTED if integer else 0.0
      shape = param_shapes.get(key)
      if shape is not None and tuple(x.shape) == shape:
        return _take(x, self.src, axis, fill, repeat)
      if (
        state
        and shape is not None
        and x.ndim == len(shape)
        and all(a in (1, b) for a, b in zip(x.shape, shape, strict=True))
      ):
        # One entry per group (store_gamma=False's scale): it follows an edit
        # of the group axis; along a broadcast axis of size 1 it stays.
        if not _is_group_axis(penalties, key, shape, x, axis):
          return x
        return _take(x, self.src, axis, fill, repeat)
      if not state:
        raise ValueError(
          f'{where}: leaf {_trees.join(names)!r} has shape {tuple(x.shape)}, '
          f'expected {shape} to edit the channels of layer '
          f'{_trees.join(self.layer)!r}.'
        )
      axes = _record_axes(penalties, key, shape, x)
      if axes is not None:  # a per-group record: it follows the edited axis
        if axis % len(shape) in axes:
          return _take(x, self.src, axes.index(axis % len(shape)), fill, repeat)
        return x
      if key == (*self.layer, 'kernel') and tuple(x.shape) == (self.width,):
        return _take(x, self.src, 0, fill)  # a per-filter record
      if key in self.consumer_kernels and integer and x.ndim == 1:
        rows, cols = shape[-2], shape[-1]
        if x.shape[0] == rows and rows != cols:  # one entry per input
          return _take(x, self.src, 0, fill, repeat)
        return x  # the consumer's per-filter record: its filters stay
      raise ValueError(
        f'opt_state: leaf {_trees.join(names)!r} of shape '
        f'{tuple(x.shape)} belongs to {_trees.join(key)!r} but does not '
        'have its shape; this optimizer state cannot follow a channel edit.'
      )

    return _trees.map_with_names(one, tree)


def _is_group_axis(penalties, key, shape, x, axis: int) -> bool:
  """Whether ``axis`` of a per-group buffer ``x`` (the rank of its kernel,
  size 1 along the axes a group spans) indexes the groups. The penalty the
  optimizer gave the leaf says; without one, an axis of size 1 where the
  kernel's is larger is a spanned axis, and where both are 1 (a layer of
  one filter or one input) only the last axis, a filter's, indexes groups
  (the default rule)."""
  axis %= len(shape)
  choice = penalties.get(key)
  if isinstance(choice, GroupLasso):
    return axis in choice.group_axes(len(shape))
  if x.shape[axis] != shape[axis]:
    return False
  return shape[axis] != 1 or axis == len(shape) - 1


def _record_axes(penalties, key, shape, x) -> Optional[tuple[int, ...]]:
  """The kernel axes that a per-group record ``x`` of leaf ``key`` runs
  along (one record axis per axis indexing the groups, in order), from the
  penalty the optimizer gave that leaf; None where no recorded penalty says
  (then the shapes decide)."""
  choice = penalties.get(key)
  if not isinstance(choice, GroupLasso) or shape is None:
    return None
  axes = choice.group_axes(len(shape))
  if tuple(x.shape) != tuple(shape[a] for a in axes):
    return None
  return axes


def _state_penalties(opt_state) -> dict:
  """The penalties the DessiLBI states inside ``opt_state`` record, by name
  (one per branch of an ``optax.partition``; none in another optimizer's)."""
  out = {}
  for _, table in optax.tree.get_all_with_path(
    _trees.pure(opt_state), 'penalties', filtering=_trees._is_core
  ):
    if isinstance(table, PenaltyTable):
      out.update(table.by_name)
  return out


def _is_state(x) -> bool:
  return isinstance(x, DessiLBIState)


def _scales_of(opt_state) -> set:
  """Where the DessiLBI states inside ``opt_state`` keep a per-group scale
  (``store_gamma=False``) instead of Γ: (state's path, leaf's path) pairs."""
  out = set()
  for core_path, core in jax.tree_util.tree_leaves_with_path(
    opt_state, is_leaf=_is_state
  ):
    if _is_state(core):
      zs = dict(jax.tree_util.tree_leaves_with_path(core.z))
      for path, g in jax.tree_util.tree_leaves_with_path(core.gamma):
        if path in zs and np.shape(g) != np.shape(zs[path]):
          out.add((core_path, path))
  return out


def _full_where_groups_are_single(opt_state, scales: set):
  """Stores Γ = z · scale where an edit left a kernel's groups one entry
  each (a Dense consumer down to one input): the optimizer stores Γ itself
  there, and would read the scale as Γ."""

  def fix(core_path, core):
    if not _is_state(core):
      return core
    zs = dict(jax.tree_util.tree_leaves_with_path(core.z))

    def one(path, g):
      if (core_path, path) in scales and np.shape(g) == np.shape(zs[path]):
        return (zs[path] * g).astype(g.dtype)
      return g

    return core._replace(
      gamma=jax.tree_util.tree_map_with_path(one, core.gamma)
    )

  return jax.tree_util.tree_map_with_path(fix, opt_state, is_leaf=_is_state)


def _scales_where_groups_grew(opt_state, scales: set, penalties: dict):
  """Stores the per-group scale where an edit gave a kernel's groups of one
  weight more weights (a consumer of one input widened), in the states that
  keep scales (``store_gamma=False``): the optimizer keeps Γ itself only for
  groups of one weight, and keeps ``scale = Γ_g·z_g / ‖z_g‖²`` otherwise
  (``Γ = z · scale``; the new weights have z = Γ = 0)."""
  cores = {core_path for core_path, _ in scales}

  def fix(core_path, core):
    if core_path not in cores or not _is_state(core):
      return core
    zs = _trees.leaves_by_name(core.z)

    def one(names, g):
      z, choice = zs.get(names), penalties.get(names)
      if (
        not isinstance(choice, GroupLasso)
        or z is None
        or np.shape(g) != np.shape(z)
      ):
        return g
      axes = choice.reduce_axes(np.ndim(z))
      if all(np.shape(z)[a] == 1 for a in axes):
        return g  # still groups of one weight: Γ itself
      z64, g64 = np.asarray(z, np.float64), np.asarray(g, np.float64)
      sq = np.sum(z64 * z64, axis=axes, keepdims=True)
      dot = np.sum(g64 * z64, axis=axes, keepdims=True)
      scale = np.where(sq > 0, dot / np.where(sq > 0, sq, 1.0), 0.0)
      return jnp.asarray(scale.astype(np.asarray(g).dtype))

    return core._replace(gamma=_trees.map_with_names(one, core.gamma))

  return jax.tree_util.tree_map_with_path(fix, opt_state, is_leaf=_is_state)


def _apply_edits(edits, params, opt_state, batch_stats, penalties=None):
  """Applies the edits to every tree; ``penalties``: the state's, by name,
  when the caller has read them already."""
  _check_paths_line_up(edits, params, opt_state, batch_stats)
  scales = set() if opt_state is None else _scales_of(opt_state)
  if penalties is None:
    penalties = {} if opt_state is None else _state_penalties(opt_state)
  for edit in edits:
    shapes = {
      n: tuple(v.shape)
      for tree in (params, batch_stats)
      if tree is not None
      for n, v in _trees.leaves_by_name(tree).items()
    }
    params = edit.apply(params, shapes)
    if batch_stats is not None:
      batch_stats = edit.apply(batch_stats, shapes, where='batch_stats')
    if opt_state is not None:
      opt_state = edit.apply(opt_state, shapes, state=True, penalties=penalties)
  if scales:
    opt_state = _full_where_groups_are_single(opt_state, scales)
    opt_state = _scales_where_groups_grew(opt_state, scales, penalties)
  return params, opt_state, batch_stats


_LINE_UP_HINT = (
  'the trees must be laid out alike: in Flax Linen params=variables["params"]'
  ', batch_stats=variables["batch_stats"] and the state of an optimizer '
  'built on those params'
)


def _check_paths_line_up(edits, params, opt_state, batch_stats):
  """Raises where an edit would miss a leaf that belongs to it.

  Leaves are matched by their paths; a state built on params laid out
  otherwise (``{'params': p}`` against ``p``), or statistics under another
  prefix than their norm's parameters, would silently keep the old widths.
  """
  table = _joint_table(params, batch_stats)
  if opt_state is not None:
    for names, x in _trees.leaves_by_name(opt_state).items():
      dtype = getattr(x, 'dtype', None)
      if (
        np.ndim(x) == 0 or dtype is None or not jnp.issubdtype(dtype, np.number)
      ):
        continue
      if not any(names[k:] in table for k in range(len(names))):
        inside = _param_above(names, table)
        if inside is not None:  # per-axis statistics (SM3): not params-shaped
          raise ValueError(
            f'opt_state: leaf {_trees.join(names)!r} of shape '
            f'{tuple(np.shape(x))} is kept below the name of parameter '
            f'{_trees.join(inside)!r} (statistics per axis, as in SM3), '
            'not as one leaf in its place; this optimizer state cannot '
            'follow a channel edit.'
          )
        raise ValueError(
          f'opt_state: leaf {_trees.join(names)!r} matches no parameter '
          f'(the params have e.g. {_trees.join(next(iter(table)))!r}), so a '
          f'channel edit could not follow it; {_LINE_UP_HINT}.'
        )
  stats = [
    names
    for names in table
    if names[-1:] in (('mean',), ('var',), ('variance',))
  ]
  # Statistics beside parameters of their own norm are that norm's, wherever
  # another norm of that name sits (a LayerNorm 'stem/norm' beside a
  # BatchNorm 'body/norm'); only statistics without them can be misplaced.
  owners = {names[:-1] for names in table if names not in stats}
  orphans = [names for names in stats if names[:-1] not in owners]
  for edit in edits:
    for key in edit.ops:
      owner = key[:-1]
      if any(names[:-1] == owner for names in stats):
        continue
      for names in orphans:
        if (
          len(names) > 1
          and names[-2] == owner[-1]
          and table[names].shape[:1] == (edit.width,)
        ):
          from_stats = batch_stats is not None and names in (
            _trees.leaves_by_name(batch_stats)
          )
          tree = 'batch_stats' if from_stats else 'params'
          raise ValueError(
            f'{tree}: {_trees.join(names)!r} looks like the statistics '
            f'of norm {_trees.join(owner)!r}, but its path differs, so the '
            f'edit of layer {_trees.join(edit.layer)!r} would not reach it; '
            f'{_LINE_UP_HINT}.'
          )


def _param_above(names: _trees.Names, table: dict):
  """The param whose name a state leaf's name holds before its own end
  (``0/mu/conv1/bias/0`` holds ``conv1/bias``), or None."""
  for j in range(len(names) - 1, 0, -1):
    for k in range(j):
      if names[k:j] in table:
        return names[k:j]
  return None


def _pure_or_none(tree):
  return None if tree is None else _trees.pure(tree)


def _joint_table(params, batch_stats):
  table = dict(_trees.leaves_by_name(params))
  if batch_stats is not None:
    table.update(_trees.leaves_by_name(batch_stats))
  return table


# ----------------------------------------------------------------------------
# New filters, orthogonal to given ones.


def orthogonal_filters(
  key: jax.Array,
  existing: jax.typing.ArrayLike,
  count: int,
  norm: float = 1.0,
  layer: str = 'layer',
) -> jax.Array:
  """``count`` new filters orthogonal to the ``existing`` ones.

  Filters are columns of a ``(d, k)`` matrix (a kernel reshaped to
  ``(-1, out)``). The new ones span random directions of the orthogonal
  complement of the existing filters; they are orthonormal among themselves
  when the complement has room for ``count`` of them (else only orthogonal
  to the existing ones), and scaled to Euclidean norm ``norm``.

  Args:
    key: a JAX random key.
    existing: ``(d, k)`` existing filters (``k`` may be 0).
    count: number of new filters.
    norm: the norm of each new filter.
    layer: the layer's name, for error messages.

  Returns:
    A ``(d, count)`` array in the dtype of ``existing``.

  Raises:
    ValueError: ``existing`` is not a matrix or holds NaN or inf, ``count``
      is not an int >= 0, ``norm`` is not a finite number >= 0, or the
      existing filters already span the whole filter space.
    TypeError: ``existing`` is not a floating-point array.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> kept = jnp.eye(4)[:, :2]
    >>> new = dl.orthogonal_filters(jax.random.key(0), kept, 2)
    >>> print(jnp.round(jnp.abs(kept.T @ new).max(), 6))
    0.0
  """
  count = _checks.check_int('count', count, 0, 'an int >= 0')
  if np.ndim(existing) != 2:
    raise ValueError(
      f'existing: expected the filters as columns of a (d, k) matrix (a '
      f'kernel reshaped to (-1, out)), got shape {np.shape(existing)}.'
    )
  dtype = jnp.asarray(existing).dtype
  if not jnp.issubdtype(dtype, jnp.floating):  # new filters would round to 0
    raise TypeError(
      f'existing: expected floating-point filters, got dtype {dtype}.'
    )
  filters = np.asarray(existing, np.float64)
  if not np.isfinite(filters).all():
    raise ValueError(
      f'layer {layer!r}: the existing filters hold NaN or inf; new filters '
      'are made orthogonal to finite filters only.'
    )
  # After the filters: a norm taken from them is NaN where they hold NaN.
  _checks.check_non_negative('norm', norm)
  d = filters.shape[0]
  if filters.shape[1]:
    u, s, _ = np.linalg.svd(filters, full_matrices=True)
    tol = max(filters.shape) * np.finfo(np.float32).eps * (s.max(initial=0))
    rank = int(np.sum(s > tol))
    complement = u[:, rank:]
  else:
    complement = np.eye(d)
  room = complement.shape[1]
  if room == 0 and count:
    raise ValueError(
      f'layer {layer!r}: its {filters.shape[1]} kept filters span the whole '
      f'{d}-dimensional filter space, so no new filter can be orthogonal to '
      'them; keep fewer filters or skip this layer.'
    )
  g = np.asarray(jax.random.normal(key, (room, count)), np.float64)
  if count <= room:
    g, _ = np.linalg.qr(g)
  new = complement @ g
  new /= np.maximum(np.linalg.norm(new, axis=0, keepdims=True), 1e-30)
  return jnp.asarray(new * norm, dtype=dtype)


def _new_filter_norm(scale, filters: np.ndarray) -> float:
  if scale is not None:
    return float(scale)
  if filters.shape[1] == 0:
    return 1.0
  # In float64: a float16 filter's sum of squares passes 65504 at |w| ≈ 3.8
  # over 3×3×512 weights.
  filters = filters.astype(np.float64)
  return float(np.mean(np.linalg.norm(filters, axis=0)))


# ----------------------------------------------------------------------------
# Re-initialise.


def _layer_of(name: str) -> str:
  parts = _trees.split_name(name)
  if parts and parts[-1] == 'kernel':
    parts = parts[:-1]
  return _trees.join(parts)


def reinit_unselected(
  key: jax.Array,
  params: optax.Params,
  opt_state: optax.OptState,
  layers: Sequence[str],
  *,
  keep: Optional[Mapping[str, Any]] = None,
  scale: Optional[float] = None,
  penalty: Optional[PenaltyRule] = None,
) -> tuple[optax.Params, optax.OptState]:
  """Re-initialises the unselected filters of layers, orthogonal to the kept.

  For network growth: filters outside Γ's support get fresh values in the
  orthogonal complement of the kept filters (inner products 0 in filter
  space, the kernel reshaped to ``(-1, out)``), their bias is set to 0, and
  every optimizer buffer of their kernel and bias entries (z, Γ, momentum...)
  is reset to 0, so they start a new path; a first-selection record of
  :func:`~dessilbi_jax.track_selection` is reset to NOT_SELECTED for them.
  Only the kernel and its bias are edited: a norm layer after it keeps its
  scale, offset and running statistics for those channels.

  Args:
    key: a JAX random key.
    params: the weights W.
    opt_state: the optimizer state.
    layers: the layer paths (``'conv2'``) or kernel paths to re-initialise.
    keep: per layer, a boolean vector of the filters to keep (or of 0 and
      1, or kernel-shaped); None for the filters with a weight in Γ's
      support (whatever the kernel's groups).
    scale: the norm of each new filter; None for the mean norm of the kept
      filters of the layer (1 if none is kept).
    penalty: leave it out; a rule given is checked as by
      :func:`~dessilbi_jax.support` (it must agree with the penalties the
      state records), and is not needed to find the filters.

  Returns:
    ``(params, opt_state)``, pure (NNX variables unwrapped); the edited
    arrays keep their sharding.

  Raises:
    ValueError: a layer has no kernel or no entry in ``keep``, its kept
      filters hold NaN or inf, or it has no room for orthogonal filters.
    TypeError: ``keep`` is not a dict, or a mask holds neither bools nor
      ints.
  """
  if scale is not None:
    _checks.check_positive('scale', scale)
  if keep is not None and not isinstance(keep, Mapping):
    raise TypeError(
      'keep: expected a dict {layer: mask} (one mask per layer of layers), '
      f'got {type(keep).__name__}.'
    )
  params = _trees.editable(params)
  opt_state = _trees.pure(opt_state)
  table = _trees.leaves_by_name(params)
  if penalty is not None:
    _trees.check_rule(penalty)
    _trees.grouped_penalties(_trees.core_state(opt_state), penalty)
  selected: dict[_trees.Names, jax.Array] = {}
  if keep is None:
    # Per weight: a filter is kept if any of its weights is in Γ's support,
    # however the kernel is grouped (per filter, per input, per weight).
    selected = _trees.leaves_by_name(support(opt_state))
  # A list, read twice below (a generator would be spent by the check).
  if isinstance(layers, str):
    layers = [layers]
  elif isinstance(layers, Iterable):
    layers = list(layers)
  if not isinstance(layers, list) or not all(
    isinstance(name, str) for name in layers
  ):
    raise TypeError(
      f'layers: expected layer paths as str (e.g. ["conv2"]), got {layers!r}.'
    )
  keys = jax.random.split(key, max(len(layers), 1))
  edits, new_filters = [], {}
  for layer_key, name in zip(keys, layers, strict=False):
    layer = _layer_of(name)
    width = producer_width(table, layer)
    kernel_names = (*_trees.split_name(layer), 'kernel')
    kernel = np.asarray(table[kernel_names])
    if keep is not None:
      if layer not in keep:
        raise ValueError(
          f'keep: has no entry for layer {layer!r} (its keys: '
          f'{sorted(map(str, keep))}); key the masks by layer path.'
        )
      mask = _layer_mask(keep[layer], layer)
    else:
      if kernel_names not in selected:
        raise ValueError(
          f'layers: {layer!r} is not coupled (Γ has no entry for its kernel).'
        )
      mask = np.asarray(selected[kernel_names], bool)
    mask = _channel_mask(mask, kernel.shape, layer)
    filters = kernel.reshape(-1, width)
    fresh = np.flatnonzero(~mask)
    src = np.where(mask, np.arange(width), -1)
    norm = _new_filter_norm(scale, filters[:, mask])
    new_filters[kernel_names] = (
      fresh,
      orthogonal_filters(layer_key, filters[:, mask], len(fresh), norm, layer),
    )
    edits.append(_Edit(table, None, layer, src, outputs_only=True))
  params, opt_state, _ = _apply_edits(edits, params, opt_state, None)
  params = _set_new_filters(params, new_filters)
  return params, opt_state


def _channel_mask(mask: np.ndarray, kernel_shape, layer: str) -> np.ndarray:
  """A per-output-channel mask from a per-channel, per-group or full mask."""
  width = kernel_shape[-1]
  if mask.shape == (width,):
    return mask
  if mask.shape == tuple(kernel_shape):
    return np.asarray(mask.reshape(-1, width).any(axis=0))
  raise ValueError(
    f'keep: the mask of layer {layer!r} has shape {mask.shape}; expected '
    f'({width},) (one per output channel) or the kernel shape '
    f'{tuple(kernel_shape)}.'
  )


def _set_new_filters(params, new_filters):
  def one(names, x):
    if names not in new_filters:
      return x
    idx, values = new_filters[names]
    if not len(idx):
      return x
    flat = np.array(x).reshape(-1, x.shape[-1])
    flat[:, idx] = np.asarray(values)
    return _placed_like(flat.reshape(x.shape), x)

  return _trees.map_with_names(one, params)


# ----------------------------------------------------------------------------
# Widen.


def widen(
  key: jax.Array,
  params: optax.Params,
  spec: Spec,
  layer: str,
  add: int,
  *,
  opt_state: Optional[optax.OptState] = None,
  batch_stats: Optional[Any] = None,
  scale: Optional[float] = None,
) -> Surgery:
  """Adds ``add`` output filters to ``layer`` and the inputs that read them.

  The new filters are orthogonal to the existing ones (see
  :func:`orthogonal_filters`; random directions if the filter space is
  full), with zero bias; the layer's norm gets unit scale and variance and
  zero shift and mean for them; its consumers get zero weights on the new
  input channels, so the widened model computes the same function as before
  where the norm is per channel (BatchNorm, or none: a LayerNorm, GroupNorm
  or RMSNorm over the channels computes its statistics over the new
  channels too, and the function changes).
  Optimizer buffers (z, Γ, momentum) of the old entries are carried over and
  start at 0 for the new ones; a first-selection record marks the new
  filters NOT_SELECTED. Grouped and depthwise convolutions cannot be
  widened (as :func:`slim`: leave them out of the spec).

  Args:
    key: a JAX random key.
    params: the params (in Flax NNX, ``nnx.state(model)``, which also
      carries the batch statistics: a state of ``nnx.Param`` variables
      alone leaves a BatchNorm's running statistics out, and the model
      built at the new widths would keep freshly initialised ones).
    spec: the links of the model; ``layer`` must be in it.
    layer: the layer path to widen.
    add: the number of filters to add (> 0).
    opt_state: the optimizer state to carry along, or None. Its leaves
      must be params-shaped (DessiLBI's, SGD's, Adam's, ...); a state kept
      per axis or factored (SM3, Adafactor) is refused.
    batch_stats: Linen's ``batch_stats`` collection, or None. Forgotten,
      a Linen BatchNorm's running statistics keep the old width (the
      model then refuses them); NNX's ``nnx.state(model)`` carries them.
    scale: the norm of each new filter; None for the mean norm of the
      existing ones.

  Returns:
    A :class:`Surgery` with the new trees and ``widths = {layer: new}``.

  Raises:
    ValueError: ``layer`` is not in the spec, the spec does not fit, its
      kernel holds NaN or inf, or the paths of ``opt_state`` or
      ``batch_stats`` do not line up with the params' (an edit would miss
      their leaves).
    TypeError: an NNX module is given for its state.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {'fc1': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)},
    ...           'fc2': {'kernel': jnp.ones((2, 1))}}
    >>> spec = dl.chain_spec(params, ['fc1', 'fc2'])
    >>> out = dl.widen(jax.random.key(0), params, spec, 'fc1', 2)
    >>> out.params['fc1']['kernel'].shape, out.params['fc2']['kernel'].T
    ((3, 4), Array([[1., 1., 0., 0.]], dtype=float32))
  """
  add = _checks.check_int('add', add, 1, 'a positive int')
  if not isinstance(layer, str):
    raise TypeError(
      f'layer: expected one layer path as a str (e.g. "conv2"), got '
      f'{type(layer).__name__} {layer!r}; widen one layer per call.'
    )
  if scale is not None:
    _checks.check_positive('scale', scale)
  params = _trees.editable(params)
  batch_stats = _pure_or_none(batch_stats)
  opt_state = _pure_or_none(opt_state)
  table = _joint_table(params, batch_stats)
  if layer not in spec:
    raise ValueError(
      f'layer {layer!r} is not in the spec, so its consumers are unknown; '
      f'add spec[{layer!r}] = dessilbi_jax.Link(norm=..., consumers=(...)) '
      '(layers whose outputs feed a residual addition cannot be widened '
      'alone).'
    )
  # The whole spec, as slim checks it: a norm another link claims is taken.
  spec = check_spec_table(table, spec)
  if not spec[layer].consumers:
    raise ValueError(
      f'layer {layer!r} has no consumers in the spec (its outputs feed a '
      'residual addition or the model output), so it cannot be widened alone.'
    )
  width = producer_width(table, layer)
  kernel_names = (*_trees.split_name(layer), 'kernel')
  filters = np.asarray(table[kernel_names]).reshape(-1, width)
  if not np.isfinite(filters).all():
    raise ValueError(
      f'params: the kernel of layer {layer!r} holds NaN or inf; widen needs '
      'finite filters to make the new ones orthogonal to them.'
    )
  norm = _new_filter_norm(scale, filters)
  room = filters.shape[0] - np.linalg.matrix_rank(filters.astype(np.float64))
  if room >= 1:
    new = orthogonal_filters(key, filters, add, norm, layer)
  else:
    new = jax.random.normal(key, (filters.shape[0], add))
    new = new / jnp.linalg.norm(new, axis=0) * norm
  src = np.concatenate([np.arange(width), -np.ones(add, np.int64)])
  edit = _Edit(table, spec[layer], layer, src)
  params, opt_state, batch_stats = _apply_edits(
    [edit], params, opt_state, batch_stats
  )
  params = _set_new_filters(
    params, {kernel_names: (np.arange(width, width + add), new)}
  )
  return Surgery(params, opt_state, batch_stats, {layer: width + add})


# ----------------------------------------------------------------------------
# Slim.


def _is_layer_mask(v) -> bool:
  """An array, or a non-empty Python list or tuple of scalars (a list of
  subtrees is a tree node: ``{'blocks': [{...}, {...}]}``)."""
  if hasattr(v, 'shape'):
    return True
  return (
    type(v) in (list, tuple)
    and len(v) > 0
    and all(np.ndim(x) == 0 and not isinstance(x, Mapping) for x in v)
  )


def _layer_mask(mask, name: str, what: str = 'layer') -> np.ndarray:
  """A mask (an array, a list or a tuple) as NumPy bools: of a layer (one
  per output channel), or of a ``leaf`` of a tree of masks."""
  arr = np.asarray(mask)
  if arr.dtype != bool and not np.issubdtype(arr.dtype, np.integer):
    per = ' (one per output channel)' if what == 'layer' else ''
    raise TypeError(
      f'keep: the mask of {what} {name!r} must hold bools or ints{per}, '
      f'got {type(mask).__name__} with dtype {arr.dtype}.'
    )
  other = arr[(arr != 0) & (arr != 1)]
  if other.size:  # a selection record (NOT_SELECTED) or ranks, not a mask
    raise ValueError(
      f'keep: the mask of {what} {name!r} holds {other.flat[0]}, an int '
      'other than 0 and 1: a selection record or ranks, not a mask. A mask '
      "is True where kept: support(opt_state, by_group=True), prune's "
      'masks, or record != dl.NOT_SELECTED.'
    )
  return arr.astype(bool)


def _keep_per_layer(keep, table, spec, penalties) -> dict[str, np.ndarray]:
  """Normalises ``keep`` to {producer layer: boolean per output channel}."""
  if not isinstance(keep, Mapping):
    raise TypeError(
      'keep: expected a dict {layer: mask} or a tree of masks laid out like '
      'the params (support(opt_state, by_group=True), the masks of prune), '
      f'got {type(keep).__name__}.'
    )
  if all(_is_layer_mask(v) for v in keep.values()):
    out = {}
    for layer, mask in keep.items():
      kernel_names = (*_trees.split_name(str(layer)), 'kernel')
      if kernel_names not in table:
        raise ValueError(
          f'keep: {layer!r} is not a layer of the params (no kernel '
          f'{_trees.join(kernel_names)!r}); the layers that can be slimmed '
          f'are those of the spec: {sorted(spec)}.'
        )
      if layer not in spec:
        raise ValueError(
          f'keep: layer {layer!r} is not in the spec; add spec[{layer!r}] = '
          'dessilbi_jax.Link(...) naming its norm and consumers (layers '
          'whose outputs feed a residual addition or the model output cannot '
          f'be slimmed). The spec has {sorted(spec)}.'
        )
      kernel = table[kernel_names]
      out[layer] = _channel_mask(_layer_mask(mask, layer), kernel.shape, layer)
    return out
  out = {}
  flat = _trees.leaves_by_name(_trees.pure(keep))
  for names, mask in flat.items():
    if names not in table:
      raise ValueError(
        f'keep: has a mask for {_trees.join(names)!r}, which is not a leaf '
        'of the params: the masks belong to another model, or per-layer '
        'masks ({layer: mask}) are mixed with a tree of masks; the layers '
        f'that can be slimmed are those of the spec: {sorted(spec)}.'
      )
    mask = _layer_mask(mask, _trees.join(names), 'leaf')
    layer = _trees.join(names[:-1])
    if names[-1:] == ('kernel',) and layer in spec:
      kernel = table[names]
      mask = _per_weight(mask, kernel.shape, penalties.get(names), layer)
      channels = _channel_mask(mask, kernel.shape, layer)
      out[layer] = channels | _kept_by_companions(
        flat, names, spec, layer, kernel.shape[-1]
      )
  return out


def _per_weight(mask: np.ndarray, kernel_shape, choice, layer) -> np.ndarray:
  """A per-group mask of a kernel (``support(..., by_group=True)``) spread
  over the kernel's shape, by the groups of the penalty the optimizer gave
  it (``choice``, None when no state says); other masks as they are."""
  shape = tuple(kernel_shape)
  if mask.shape == shape:
    return mask
  if not isinstance(choice, GroupLasso):
    if choice is None and mask.shape != shape[-1:]:
      raise ValueError(
        f'keep: the mask of {layer!r} has shape {mask.shape}, neither one '
        f'entry per output channel ({shape[-1]},) nor the kernel shape '
        f'{shape}; a per-group mask of a kernel grouped otherwise (e.g. per '
        'input channel) is read by the groups its optimizer state records: '
        'pass opt_state=.'
      )
    return mask
  axes = choice.group_axes(len(shape))
  if mask.shape != tuple(shape[a] for a in axes):
    raise ValueError(
      f'keep: the mask of {layer!r} has shape {mask.shape}; the optimizer '
      f'state groups its kernel of shape {shape} by {choice!r}, so expected '
      f"the groups' shape {tuple(shape[a] for a in axes)} or the kernel "
      'shape.'
    )
  spread = [n if a in axes else 1 for a, n in enumerate(shape)]
  return np.broadcast_to(mask.reshape(spread), shape)


def _kept_by_companions(flat, kernel, spec, layer, width) -> np.ndarray:
  """Channels that a keep tree (``flat``: its leaves by name) keeps through
  the layer's bias or norm.

  The masks of :func:`~dessilbi_jax.prune` drop a channel's bias and norm
  parameters only with the whole channel (groups per output filter). Under a
  lasso, prune cuts single weights: a channel can lose every weight and still
  output its bias, so it stays. A support tree has no masks there.
  """
  kept = np.zeros(width, bool)
  owners = [kernel[:-1]]
  if spec[layer].norm is not None:
    owners.append(_trees.split_name(spec[layer].norm))
  for names, mask in flat.items():
    if names[:-1] in owners and names != kernel and np.shape(mask) == (width,):
      kept |= np.asarray(mask, bool)
  return kept


def slim(
  params: optax.Params,
  spec: Spec,
  keep: Any,
  *,
  opt_state: Optional[optax.OptState] = None,
  batch_stats: Optional[Any] = None,
) -> Surgery:
  """A physically smaller model: drops unselected output filters.

  For every layer of the spec with an entry in ``keep``, the dropped filters
  leave the layer's kernel and bias, its norm's parameters and statistics,
  and the matching input channels of its consumers (rows of a Dense kernel
  reading a flattened feature map included). If the dropped channels output
  exactly zero in the model (as after :func:`~dessilbi_jax.prune`, or when
  their kernel, bias and norm shift are zero), the activations map 0 to 0
  and the norms are per channel (BatchNorm; a LayerNorm, GroupNorm or
  RMSNorm over the channels computes other statistics once channels are
  gone), the slim model computes the same function.

  A channel goes when its mask drops it whole: every entry of a
  kernel-shaped mask and, in a tree of masks such as prune's, the layer's
  bias and norm entries too (under a lasso prune cuts weights, not channels,
  so a channel that lost every weight keeps its bias and stays). A tree
  from ``support(opt_state, by_group=True)`` is read by the groups the
  optimizer state records (give ``opt_state``): under a kernel grouped per
  input channel, a filter goes only when none of its weights is selected.
  Without ``opt_state``, a kernel's mask of one entry per output channel is
  read as one, so give it for a rule that groups otherwise (a square kernel
  grouped per input would be misread).

  The optimizer state is cut, not recomputed: the consumers' z and Γ lose
  the rows of the dropped input channels, so a consumer filter's norm of z
  shrinks by those rows, and its Γ (or per-filter scale) is the old one
  until the next update computes it from the smaller z, which can leave a
  filter that was barely selected out of the support. The dropped channels
  output nothing, so the model's function is unchanged, but the slim model
  starts its own path there: it does not follow the path the large model
  would have taken.

  Grouped and depthwise convolutions (``feature_group_count > 1``) cannot
  take part: as consumers they are refused, and as producers removing a
  filter would move the filters after it into another group; leave them
  out of the spec.

  Args:
    params: the params, as in :func:`widen`.
    spec: the links of the model (:func:`~dessilbi_jax.chain_spec` or by
      hand). Layers not in it are not slimmed.
    keep: which output channels to keep: a dict ``{layer: bool array}`` (per
      channel, or kernel-shaped; a list or tuple of bools, or of ints 0
      and 1, works too), or a tree such as
      ``support(opt_state, by_group=True)`` or the masks of
      :func:`~dessilbi_jax.prune` (kernel entries of layers not in the spec
      are ignored). A selection record or ranks are refused: they are not
      masks (``record != dl.NOT_SELECTED`` is one).
    opt_state, batch_stats: as in :func:`widen`.

  Returns:
    A :class:`Surgery`; ``widths`` gives each slimmed layer's new width (to
    build the smaller model with).

  Raises:
    ValueError: a layer named in ``keep`` is not a layer of the params or
      not in the spec, the spec does not fit the params, a layer would
      lose every filter, or the paths of ``opt_state`` or ``batch_stats``
      do not line up with the params' (an edit would miss their leaves).
    TypeError: a mask given as a list or tuple holds neither bools nor
      ints, or an NNX module is given for its state.

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {'fc1': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
    ...           'fc2': {'kernel': jnp.ones((4, 1))}}
    >>> spec = dl.chain_spec(params, ['fc1', 'fc2'])
    >>> out = dl.slim(params, spec, {'fc1': jnp.array([1, 0, 0, 1], bool)})
    >>> out.widths, out.params['fc2']['kernel'].shape
    ({'fc1': 2}, (2, 1))
  """
  params = _trees.editable(params)
  batch_stats = _pure_or_none(batch_stats)
  opt_state = _pure_or_none(opt_state)
  table = _joint_table(params, batch_stats)
  spec = check_spec_table(table, spec)
  penalties = {} if opt_state is None else _state_penalties(opt_state)
  per_layer = _keep_per_layer(keep, table, spec, penalties)
  edits, widths = [], {}
  for layer, mask in per_layer.items():
    if not spec[layer].consumers:
      if mask.all():  # e.g. a support tree that keeps all of this layer
        continue
      raise ValueError(
        f'keep: layer {layer!r} has no consumers in the spec (its outputs '
        'feed a residual addition or the model output), so its width cannot '
        'change; keep all its filters.'
      )
    if not mask.any():
      raise ValueError(
        f'keep: layer {layer!r} would lose all its {mask.size} filters; '
        'keep at least one or remove the layer from the model.'
      )
    edits.append(_Edit(table, spec[layer], layer, np.flatnonzero(mask)))
    widths[layer] = int(mask.sum())
  params, opt_state, batch_stats = _apply_edits(
    edits, params, opt_state, batch_stats, penalties
  )
  return Surgery(params, opt_state, batch_stats, widths)


def set_nnx_opt_state(optimizer: Any, opt_state: optax.OptState) -> None:
  """Writes a pure optimizer state into a Flax NNX ``nnx.Optimizer``.

  After :func:`widen` or :func:`slim`, build the model at its new widths and
  a new ``nnx.Optimizer`` for it, then load the carried-over state with this
  function (its layout must be the one the new optimizer was built with).
  Each array is written with the sharding of the one it replaces, so a
  state that surgery returned on one device follows the new model's.

  Args:
    optimizer: an ``nnx.Optimizer``.
    opt_state: a pure optimizer state (e.g. ``Surgery.opt_state``).

  Raises:
    TypeError: ``optimizer`` is not an ``nnx.Optimizer``.
    ValueError: ``opt_state`` differs from the optimizer's state in its tree
      structure, at a leaf in its shape or dtype, or in the penalties it
      records (a state whose ``penalties`` are None takes the optimizer's);
      the error names the first such place, and nothing is written.
  """
  from flax import nnx

  if not isinstance(optimizer, nnx.Optimizer):
    raise TypeError(
      f'optimizer must be an nnx.Optimizer, got {type(optimizer).__name__}.'
    )
  pairs = _state_pairs(
    optimizer.opt_state,
    _trees.pure(opt_state),
    lambda x: isinstance(x, nnx.Variable),
  )
  for var, value in pairs:
    current = _trees.variable_value(var)
    if _checks._is_array(value) and _is_placed(current):
      value = jax.device_put(value, current.sharding)  # where it was
    _trees.set_variable(var, value)


_SET_STATE_HINT = (
  'build the optimizer for the edited model, with the transformation that '
  'made the state, first'
)


def _one_level(tree: Any) -> Optional[list[tuple[Any, Any]]]:
  """A pytree node's ``(key, child)`` pairs, or None for a leaf."""
  flat = jax.tree_util.tree_flatten_with_path(
    tree, is_leaf=lambda x: x is not tree
  )[0]
  if len(flat) == 1 and not flat[0][0]:
    return None
  return [(path[0], child) for path, child in flat]


def _state_pairs(held, given, is_var, path=()) -> list[tuple[Any, Any]]:
  """``(variable, value)`` for every leaf of the optimizer's state ``held``.

  Walks ``held`` and the pure state ``given`` together and raises, before
  anything is written, at the first place where they differ.
  """
  where = _trees.join(_trees.names_of(path)) or '<root>'
  current = _trees.variable_value(held) if is_var(held) else held
  if isinstance(current, PenaltyTable):
    # Static data: the optimizer's own stays. A state without penalties
    # (dropped on purpose, to change them) takes the optimizer's.
    if given is not None and given != current:
      raise ValueError(
        f'opt_state: at {where!r} it holds {given!r}, where the optimizer '
        f'holds {current!r}: it was made under other penalties; build the '
        'optimizer with the rule the state was made with (to change '
        'penalties on purpose, first set them to None: '
        'optax.tree.set(opt_state, penalties=None)).'
      )
    return []
  if _trees.is_empty(current) and _trees.is_empty(given):
    return [(held, given)] if is_var(held) else []
  mine = None if is_var(held) else _one_level(held)
  theirs = _one_level(given)
  if mine is None or theirs is None:  # a leaf on either side
    arrays = _checks._is_array(current), _checks._is_array(given)
    if not all(arrays):
      if not any(arrays) and (
        jax.tree.structure(current) == jax.tree.structure(given)  # type: ignore[operator]
      ):
        return [(held, given)]
      raise ValueError(
        f'opt_state: at {where!r} it holds {_checks._describe(given)}, '
        f'where the optimizer holds {_checks._describe(current)}; '
        f'{_SET_STATE_HINT}.'
      )
    if tuple(np.shape(given)) != tuple(np.shape(current)):
      raise ValueError(
        f'opt_state: leaf {where!r} has shape {tuple(np.shape(given))}, '
        f'the optimizer holds {tuple(np.shape(current))}; '
        f'{_SET_STATE_HINT}.'
      )
    if given.dtype != current.dtype:
      raise ValueError(
        f'opt_state: leaf {where!r} has dtype {given.dtype}, the optimizer '
        f'holds {current.dtype}; cast the state, or build the optimizer '
        'with the same state dtype.'
      )
    return [(held, given)]
  if type(held) is not type(given):
    raise ValueError(
      f'opt_state: at {where!r} it holds {_checks._describe(given)}, where '
      f'the optimizer holds {_checks._describe(held)}; {_SET_STATE_HINT}.'
    )
  keys = [k for k, _ in mine]
  other = dict(theirs)
  missing = [k for k in keys if k not in other]
  extra = [k for k in other if k not in keys]
  if missing or extra:
    name = _trees.join(_trees.names_of((*path, (missing + extra)[0])))
    what = (
      'has no entry {!r}, which the optimizer holds'
      if missing
      else 'has an entry {!r}, which the optimizer does not hold'
    )
    raise ValueError(f'opt_state: {what.format(name)}; {_SET_STATE_HINT}.')
  out = []
  for key, h in mine:
    out.extend(_state_pairs(h, other[key], is_var, (*path, key)))
  return out
