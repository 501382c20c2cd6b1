r"""Order of selection: when each group entered Γ's support, and rankings.

DessiLBI's path is an inverse scale space: important filters enter the support
of Γ early, and the step at which a group first becomes non-zero ranks it. The
record of those steps is a small pytree of int32 arrays, one entry per group
(per output filter of a group-lasso leaf, per weight of a lasso leaf), laid out
like Γ; :data:`NOT_SELECTED` marks groups that never entered.

Two ways to keep it, both on the device with no host synchronisation:

* :func:`track_selection` wraps an optimizer; its state carries the record and
  every ``update`` refreshes it from the new Γ, so the record has one-step
  resolution and costs nothing to call.
* :func:`init_selection` / :func:`update_selection` are the same computation
  as pure functions, to call inside your own jitted step or once per epoch.

Cost of recording every step: per coupled leaf one ``|Γ| > 0`` test reduced
over each group and a ``where`` on the record. Γ has just been written by the
core in the same jitted step, so XLA reads it at most once more (4 bytes per
coupled weight in float32, against the 36 bytes the core's update moves, and
nothing extra when it fuses the test into the core's output); the record of a
group-lasso leaf has one int32 per filter, negligible beside the kernel. Lasso
leaves keep one int32 per weight (their groups are single weights), the size
of Γ, and read/write it each step. Recording once per epoch instead costs the
same per call, with a coarser resolution (ties are then broken by weight norm).
"""

import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax import _checks, _trees
from dessilbi_jax.penalties import PenaltyRule
from dessilbi_jax.shrinkage import in_support
from dessilbi_jax.transform import resolve_penalties, warn_pytorch_layout

NOT_SELECTED: int = _trees.NOT_SELECTED
"""Record value of a group that has never been in Γ's support."""

REFERENCE_NEVER: float = 2000.0
"""The reference implementation's epoch sentinel for never-selected entries."""


def init_selection(
  opt_state: optax.OptState, penalty: Optional[PenaltyRule] = None
) -> Any:
  """An empty record of first-selection steps (every group NOT_SELECTED).

  Args:
    opt_state: an optimizer state containing a DessiLBI core.
    penalty: leave it out: the groups are the penalties the state records
      (:func:`~dessilbi_jax.get_penalty`). A rule given must agree with them;
      it is used for a state that records none.

  Returns:
    A pytree laid out like Γ with int32 arrays of the group shape (``(out,)``
    for a HWIO conv kernel, the kernel's shape for a lasso leaf).

  Raises:
    ValueError: ``penalty`` is not the optimizer's rule (see
      :func:`~dessilbi_jax.support`).
  """
  core = _trees.core_state(opt_state)
  gamma = core.gamma
  penalties = _trees.grouped_penalties(core, penalty)
  # Laid out like Γ's groups, sharding included, as update_selection's
  # result is: its type stays the same along training (lax.scan, cond).
  return _trees.map_with_names(
    lambda names, g: jnp.full_like(
      _trees.group_any(in_support(g), penalties[names]),
      NOT_SELECTED,
      jnp.int32,
    ),
    gamma,
  )


def magnitude_record(
  params: optax.Params, penalty: Optional[PenaltyRule] = None
) -> Any:
  """A record in which no group was ever selected: ranking by magnitude.

  With it, :func:`rank_groups` and :func:`~dessilbi_jax.prune` order the
  groups by their norm alone (``‖W_g‖₂``, ``|W|`` for a weight): the
  magnitude-pruning baseline, for DessiLBI's W or any other model's weights.

  Args:
    params: the weights (a pytree, or a Flax NNX ``State``, e.g.
      ``nnx.state(model)``: leaves that are not floating-point, such as a
      Dropout's RNG state, get no record).
    penalty: the rule choosing the leaves and their groups (for a DessiLBI
      run, ``dl.get_penalty(opt_state)``); None for the default (conv
      kernels per output filter, Dense kernels per weight).

  Returns:
    A pytree laid out like a :func:`track_selection` record for an optimizer
    built with ``penalty``: :data:`NOT_SELECTED` int32 arrays of the group
    shape at coupled leaves, ``optax.MaskedNode()`` elsewhere.

  Warns:
    UserWarning: with the default rule, a rank >= 3 leaf is named
      ``weight`` (a PyTorch or Equinox layout, filters first, which that
      rule, reading Flax's, groups by the last axis).

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {'conv': {'kernel': jnp.array([[[[1.0, 3.0, 2.0]]]])}}
    >>> record = dl.magnitude_record(params)
    >>> print(dl.rank_groups(params, record)['conv']['kernel'])
    [2 0 1]
  """
  params = _trees.editable(params)

  def is_weight(x):
    return hasattr(x, 'dtype') and jnp.issubdtype(x.dtype, jnp.floating)

  # Leaves that are no weights (the RNG state of a Dropout in
  # nnx.state(model), the state prune and slim take) are not ranked: the
  # rule sees a float stand-in, so that it checks the rest as the optimizer
  # would, and they get no record.
  stand_in = jax.tree.map(
    lambda x: x if is_weight(x) else jnp.zeros(np.shape(x)), params
  )
  choices, treedef = resolve_penalties(stand_in, penalty)
  if penalty is None:
    warn_pytorch_layout(_trees.recorded_ranks(stand_in, None))
  weights = treedef.flatten_up_to(jax.tree.map(is_weight, params))
  out = []
  for w, choice, weight in zip(
    treedef.flatten_up_to(params), choices, weights, strict=True
  ):
    if choice is None or not weight:
      out.append(optax.MaskedNode())
      continue
    groups = _trees.group_any(w != 0, choice)  # sharded like the params
    out.append(jnp.full_like(groups, NOT_SELECTED, jnp.int32))
  return treedef.unflatten(out)


def update_selection(
  record: Any,
  opt_state: optax.OptState,
  step: Optional[jax.typing.ArrayLike] = None,
  penalty: Optional[PenaltyRule] = None,
) -> Any:
  """Stamps ``step`` on every group that is in Γ's support for the first time.

  Jit-compatible, no host synchronisation. Groups that were selected before
  keep their earlier step, also if they have left the support since.

  Args:
    record: the record from :func:`init_selection` or a previous call.
    opt_state: the optimizer state after the step(s) being recorded.
    step: the time stamp (e.g. an epoch number); None for the core's step
      count (the number of updates Γ has seen).
    penalty: leave it out: the groups are the penalties the state records
      (:func:`~dessilbi_jax.get_penalty`). A rule given must agree with them;
      it is used for a state that records none.

  Returns:
    The new record.

  Raises:
    ValueError: ``penalty`` is not the optimizer's rule (see
      :func:`~dessilbi_jax.support`), or the record has other groups than Γ
      or lacks a coupled leaf.
    TypeError: ``step`` is not a scalar step number.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import dessilbi_jax as dl
    >>> params = {'w': jnp.zeros((1, 1, 1, 3))}  # a conv with 3 filters
    >>> tx = dl.scale_by_dessilbi(0.5, nu=1.0)
    >>> state = tx.init(params)
    >>> record = dl.init_selection(state)
    >>> target = jnp.array([4.0, 1.0, 0.1]).reshape(1, 1, 1, 3)
    >>> for _ in range(6):
    ...   grads = jax.grad(lambda p: jnp.sum((p['w'] - target) ** 2))(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    ...   record = dl.update_selection(record, state)
    >>> print(record['w'])
    [         2          4 2147483647]
  """
  core = _trees.core_state(opt_state)
  _trees.check_record(_trees.pure(record))
  penalties = _trees.grouped_penalties(core, penalty)
  gamma = _trees.leaves_by_name(core.gamma)
  if step is not None:
    _check_step(step)
  stamp = core.count if step is None else step
  stamp = jnp.asarray(stamp, jnp.int32)

  unrecorded = ''
  if core.penalties is None:  # the groups came from penalty= or the default
    unrecorded = ", or pass the optimizer's rule as penalty= (none recorded)"

  def one(names, r):
    g = _trees.lookup(gamma, names, 'the record', arg='opt_state')
    now = _trees.group_any(in_support(g), penalties[names])
    if now.shape != r.shape:
      raise ValueError(
        f'record: leaf {_trees.join(names)!r} has shape {tuple(r.shape)}, '
        f'but Γ has {tuple(now.shape)} groups there; make a new record with '
        f'init_selection after changing the model{unrecorded}.'
      )
    return jnp.where(now & (r == NOT_SELECTED), stamp, r)

  new = _trees.map_with_names(one, _trees.pure(record))
  # A coupled leaf the record lacks would never be recorded.
  missing = set(gamma) - set(_trees.leaves_by_name(new))
  if missing:
    raise ValueError(
      f'record: has no entry for leaf {_trees.join(min(missing))!r} of Γ; '
      'make a new record with init_selection (a record covers every coupled '
      f'leaf){unrecorded}.'
    )
  return new


class _RecordUnderMapParams:
  """The record of a state initialised by ``optax.tree.map_params``."""

  def __repr__(self) -> str:
    return '<first_step record>'


_RECORD_UNDER_MAP_PARAMS = _RecordUnderMapParams()


class SelectionState(NamedTuple):
  """State of :func:`track_selection`.

  Attributes:
    inner_state: the wrapped optimizer's state.
    first_step: the first-selection record (see :func:`update_selection`);
      find it with ``optax.tree.get(opt_state, 'first_step')``.
  """

  inner_state: optax.OptState
  first_step: Any


def track_selection(
  inner: optax.GradientTransformation,
  penalty: Optional[PenaltyRule] = None,
) -> optax.GradientTransformationExtraArgs:
  """Wraps a DessiLBI optimizer so its state records the order of selection.

  After every update, each group that entered Γ's support for the first time
  is stamped with the core's step count: the steps the core took, so under
  ``optax.MultiSteps`` one per ``k`` calls, and under
  ``optax.apply_if_finite`` skipped steps not counted. Everything stays on
  the device; the extra cost is discussed in the module docstring.

  Args:
    inner: an optimizer containing a DessiLBI core (e.g.
      :func:`~dessilbi_jax.dessilbi`).
    penalty: leave it out: the record follows the penalties ``inner``'s
      state records. A rule given must agree with them.

  Returns:
    An :class:`optax.GradientTransformationExtraArgs` whose state is a
    :class:`SelectionState`. ``optax.tree.map_params`` maps its function
    over the inner state's params-shaped trees and hands the record, laid
    out by groups, to ``transform_non_params`` whole.

  Raises:
    TypeError: ``penalty`` is not a rule; ``update`` given a state that is
      not the :class:`SelectionState` ``init`` made.
    ValueError: at ``init``, the inner state holds no
      :class:`~dessilbi_jax.DessiLBIState`, or more than one, or a
      ``penalty`` that disagrees with the penalties it records.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import dessilbi_jax as dl
    >>> tx = dl.track_selection(dl.dessilbi(0.1, nu=1.0))
    >>> params = {'w': jnp.zeros((2, 2))}
    >>> state = tx.init(params)
    >>> target = jnp.array([[3.0, 0.0], [0.0, 1.0]])
    >>> for _ in range(20):
    ...   grads = jax.grad(lambda p: jnp.sum((p['w'] - target) ** 2))(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(optax.tree.get(state, 'first_step')['w'])
    [[         6 2147483647]
     [2147483647         11]]
  """
  inner = optax.with_extra_args_support(inner)

  def init_fn(params):
    inner_state = inner.init(params)
    if _checks.is_map_params_placeholder(params):
      # optax.tree.map_params: the record is laid out like the groups, not
      # like the params, so it is not a tree of params (a leaf here hands
      # the whole record to map_params's transform_non_params).
      return SelectionState(inner_state, _RECORD_UNDER_MAP_PARAMS)
    return SelectionState(inner_state, init_selection(inner_state, penalty))

  def update_fn(updates, state, params=None, **extra_args):
    if not isinstance(state, SelectionState):
      raise TypeError(
        'state must be the SelectionState that init returned, got '
        f'{type(state).__name__}; {_checks.RESTORE_HINT}.'
      )
    updates, inner_state = inner.update(
      updates, state.inner_state, params, **extra_args
    )
    record = update_selection(state.first_step, inner_state, penalty=penalty)
    return updates, SelectionState(inner_state, record)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_step(step: Any) -> None:
  """A Python or NumPy time stamp is a whole number that fits the int32
  record; a JAX array, whose value is not read back (no host
  synchronisation), is a scalar of an integer dtype."""
  if isinstance(step, jax.Array):  # its shape and dtype are known, no sync
    if step.shape != () or not jnp.issubdtype(step.dtype, jnp.integer):
      raise TypeError(
        'step must be a scalar step number (a JAX array of an integer '
        f'dtype), got shape {step.shape} and dtype {step.dtype}.'
      )
    return
  value = np.asarray(step)
  if (
    value.shape != ()
    or value.dtype == bool
    or not np.issubdtype(value.dtype, np.number)
    or np.issubdtype(value.dtype, np.complexfloating)
  ):
    raise TypeError(f'step must be a scalar step number, got {step!r}.')
  if not (
    np.isfinite(value)
    and value == np.round(value)
    and -NOT_SELECTED <= value < NOT_SELECTED
  ):
    raise ValueError(
      'step must be a whole number that fits the int32 record (below '
      f'NOT_SELECTED = {NOT_SELECTED}), got {step!r}.'
    )


def _check_epoch(epoch: Any) -> None:
  """An epoch is a real scalar (a JAX array's value is not read back)."""
  value = epoch if isinstance(epoch, jax.Array) else np.asarray(epoch)
  if (
    value.shape != ()
    or value.dtype == bool
    or not jnp.issubdtype(value.dtype, jnp.number)
    or jnp.issubdtype(value.dtype, jnp.complexfloating)
  ):
    raise TypeError(f'epoch must be a scalar epoch number, got {epoch!r}.')
  # A NaN epoch would stay in the record (the minimum keeps it).
  if not isinstance(value, jax.Array) and not np.isfinite(value):
    raise ValueError(f'epoch must be a finite number, got {epoch!r}.')


def rank_groups(
  params: optax.Params,
  record: Any,
  *,
  scope: str = 'layer',
  penalty: Optional[PenaltyRule] = None,
) -> Any:
  """Ranks groups for pruning: earliest selected first, ties by larger norm.

  Rank 0 is the most important group. Groups never selected come last, among
  themselves by decreasing ``‖W_g‖₂`` (``|W|`` for a weight). Groups equal in
  both come in the order of their position (flattened, leaf by leaf in the
  record's order with ``scope='global'``), on every backend.

  Args:
    params: the weights W.
    record: a first-selection record (:func:`update_selection`, or
      ``optax.tree.get(opt_state, 'first_step')`` with
      :func:`track_selection`).
    scope: ``'layer'`` ranks the groups of each leaf among themselves;
      ``'global'`` ranks all groups of all recorded leaves together.
    penalty: the rule that gives the groups: for a DessiLBI run
      ``dl.get_penalty(opt_state)``; None for the default rule.

  Returns:
    A pytree laid out like the record, of int32 ranks.

  Raises:
    TypeError: a leaf of the record is not an integer array (a boolean
      support mask or a float epoch record would be read as steps).
    ValueError: ``scope`` is neither ``'layer'`` nor ``'global'``; the
      record holds a leaf the params lack, or its groups do not fit the
      params under ``penalty``.

  Warns:
    UserWarning: with the default rule, a recorded rank >= 3 leaf is named
      ``weight`` (as for :func:`magnitude_record`).

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {'w': jnp.array([[1.0, 3.0, 2.0, 0.5]])}
    >>> record = {'w': jnp.array([[5, 2, 5, dl.NOT_SELECTED]])}
    >>> print(dl.rank_groups(params, record)['w'])
    [[2 0 1 3]]
  """
  if scope not in ('layer', 'global'):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
  record = _trees.pure(record)
  _trees.check_record(record)
  _trees.check_rule(penalty)
  if penalty is None:
    warn_pytorch_layout(_trees.recorded_ranks(params, record))
  return _rank_groups(_trees.pure(params), record, scope=scope, penalty=penalty)


@functools.partial(jax.jit, static_argnames=('scope', 'penalty'))
def _rank_groups(params, record, *, scope, penalty):
  keys = _group_keys(params, record, penalty)
  if scope == 'layer':
    return _trees.map_with_names(
      lambda names, r: _ranks(*keys[names]), _trees.pure(record)
    )
  order = list(keys)
  if not order:  # nothing recorded: nothing to rank
    return _trees.pure(record)
  steps = jnp.concatenate([keys[n][0].ravel() for n in order])
  norms = jnp.concatenate([keys[n][1].ravel() for n in order])
  ranks = _ranks(steps, norms)
  out, start = {}, 0
  for n in order:
    size = keys[n][0].size
    out[n] = ranks[start : start + size].reshape(keys[n][0].shape)
    start += size
  return _trees.map_with_names(lambda names, r: out[names], _trees.pure(record))


def _group_keys(params, record, penalty):
  """names -> (first step, group norm), group-shaped, for recorded leaves."""
  record = _trees.leaves_by_name(_trees.pure(record))
  params = _trees.pure(params)
  table = _trees.leaves_by_name(params)
  choices = _trees.penalty_table(params, record, penalty)
  keys = {}
  for names, r in record.items():
    w = _trees.lookup(table, names, 'the record')
    norm = _trees.group_norm(w, _trees.penalty_at(names, choices))
    if norm.shape != r.shape:
      raise ValueError(
        f'record: leaf {_trees.join(names)!r} has shape {tuple(r.shape)}, '
        f'but the params have {tuple(norm.shape)} groups there under the '
        'penalty rule given; pass penalty= the rule the record was made with.'
      )
    # Ranking sorts across each leaf: whole arrays, also where the params
    # are sharded over explicit mesh axes.
    keys[names] = (_trees.replicated(r), _trees.replicated(norm))
  return keys


def _ranks(steps: jax.Array, norms: jax.Array) -> jax.Array:
  """Rank of each entry: by step ascending, then norm descending, then
  position. The position is a key of the sort, so that ties go the same
  way on every backend (XLA's sort need not be stable, jnp.lexsort's is
  not asked to be)."""
  shape = steps.shape
  position = jnp.arange(steps.size, dtype=jnp.int32)
  *_, order = jax.lax.sort(
    (steps.ravel(), -norms.ravel(), position), num_keys=3
  )
  ranks = (
    jnp.zeros(order.shape, jnp.int32)
    .at[order]
    .set(jnp.arange(order.size, dtype=jnp.int32))
  )
  return ranks.reshape(shape)


class ReferenceOrder(NamedTuple):
  """The reference toolbox's ``epoch_record`` and ``prune_order``.

  Attributes:
    epoch_record: per weight, the first epoch at which ``|Γ| > 0`` was seen,
      :data:`REFERENCE_NEVER` (2000) if never; laid out like Γ.
    prune_order: per group of a group-lasso leaf, ``‖W_g‖₂ − min_g
      epoch_record``; per weight of a lasso leaf, ``|W| − epoch_record``
      (larger is more important; it mixes a norm and an epoch, as in the
      reference).
  """

  epoch_record: Any
  prune_order: Any


def reference_prune_order(
  params: optax.Params,
  opt_state: optax.OptState,
  epoch: jax.typing.ArrayLike,
  previous: Optional[ReferenceOrder] = None,
  penalty: Optional[PenaltyRule] = None,
) -> ReferenceOrder:
  r"""Reproduces the reference's ``SLBI_ToolBox.update_prune_order(epoch)``.

  .. math::
    e &\leftarrow \min(e, \; \mathrm{epoch} \text{ where } |Γ| > 0
        \text{ else } 2000) \\
    o_g &= \|W_g\|_2 - \min_{i \in g} e_i \quad\text{(group lasso)}, \qquad
    o = |W| - e \quad\text{(lasso)}

  Prefer :func:`rank_groups`, which does not mix units; this function exists
  for exact compatibility with results of the reference implementation.

  Args:
    params: the weights W.
    opt_state: the optimizer state holding Γ.
    epoch: the epoch number the reference would be called with.
    previous: the result of the previous call; None for the first call.
    penalty: leave it out: the groups are the penalties the state records
      (:func:`~dessilbi_jax.get_penalty`). A rule given must agree with them;
      it is used for a state that records none.

  Returns:
    A :class:`ReferenceOrder`.

  Raises:
    TypeError: ``epoch`` is not a real scalar, or ``previous`` is not a
      :class:`ReferenceOrder`.
    ValueError: ``epoch`` is not finite, ``penalty`` is not the optimizer's
      rule, or ``previous`` has other shapes than Γ.

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {'w': jnp.array([[0.5, -2.0]])}
    >>> state = dl.scale_by_dessilbi(1.0).init(params)
    >>> state = state._replace(gamma={'w': jnp.array([[0.0, -1.0]])})
    >>> order = dl.reference_prune_order(params, state, epoch=3)
    >>> print(order.epoch_record['w'])
    [[2000.    3.]]
    >>> print(order.prune_order['w'])
    [[-1.9995e+03 -1.0000e+00]]
  """
  _check_epoch(epoch)
  if previous is not None and not isinstance(previous, ReferenceOrder):
    raise TypeError(
      'previous: expected the ReferenceOrder of the previous call (or None), '
      f'got {type(previous).__name__}.'
    )
  core = _trees.core_state(opt_state)
  penalties = _trees.grouped_penalties(core, penalty)
  table = _trees.leaves_by_name(_trees.pure(params))
  old = (
    None
    if previous is None
    else _trees.leaves_by_name(_trees.pure(previous.epoch_record))
  )

  def record(names, g):
    # At least float32, so that epochs stay exact beside bfloat16 Γ.
    dtype = jnp.promote_types(g.dtype, jnp.float32)
    now = jnp.where(
      jnp.abs(g) > 0,
      jnp.asarray(epoch, dtype),
      jnp.asarray(REFERENCE_NEVER, dtype),
    )
    if old is None:
      return jnp.minimum(now, REFERENCE_NEVER)
    before = _trees.lookup(old, names, 'Γ', arg='previous')
    if tuple(before.shape) != tuple(g.shape):
      raise ValueError(
        f'previous: leaf {_trees.join(names)!r} has shape '
        f'{tuple(before.shape)} but Γ has {tuple(g.shape)}; start a new '
        'order (previous=None) after changing the model.'
      )
    return jnp.minimum(now, before)

  epoch_record = _trees.map_with_names(record, core.gamma)
  records = _trees.leaves_by_name(epoch_record)

  def order(names, g):
    w = _trees.lookup(table, names, 'Γ')
    _trees.check_same_shape(names, w, g, 'Γ')
    e = records[names]
    choice = penalties[names]
    axes = _trees.reduce_axes(choice, w.ndim)
    if not axes:
      return jnp.abs(w) - e
    first = jnp.min(e, axis=axes, initial=REFERENCE_NEVER)  # empty groups
    return _trees.group_norm(w, choice) - first

  prune_order = _trees.map_with_names(order, core.gamma)
  return ReferenceOrder(epoch_record, prune_order)
