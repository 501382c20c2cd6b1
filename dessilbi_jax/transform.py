"""The DessiLBI core as an Optax gradient transformation."""

import itertools
import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple, Optional, cast

import jax
import jax.numpy as jnp
import optax

from dessilbi_jax import _checks
from dessilbi_jax.penalties import (
  GroupLasso,
  Lasso,
  Penalty,
  PenaltyRule,
  PenaltyTable,
  default_penalty,
  names_of,
  path_str,
  resolved,
)
from dessilbi_jax.shrinkage import (
  group_factor,
  group_threshold,
  in_support,
  soft_threshold,
)


class DessiLBIState(NamedTuple):
  """State of :func:`scale_by_dessilbi`.

  Attributes:
    count: number of steps taken so far (int32).
    z: the auxiliary variable z (the papers' V), shaped like the params for
      coupled leaves and ``optax.MaskedNode()`` for uncoupled ones.
    gamma: the sparse structure parameter Γ = κ·Prox(z), laid out as ``z``.
    penalties: the :class:`~dessilbi_jax.PenaltyTable` the optimizer's rule
      gave the params (static data, no leaves), read by the toolbox in place
      of its ``penalty=`` argument; None in a state built by hand or whose
      penalties were dropped (``optax.tree.set(state, penalties=None)``).
  """

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count, as Optax's states do
  z: optax.Updates
  gamma: optax.Updates
  penalties: Optional[PenaltyTable] = None


def _expand(gamma: jax.Array, z: jax.Array) -> jax.Array:
  """Γ of one coupled leaf, from what the state stores there.

  That is Γ itself, or (``store_gamma=False``, group-lasso leaves) the
  per-group scale ``κ·max(0, 1 - λ/‖z_g‖)``, with one entry per group, from
  which ``Γ = z · scale``.
  """
  if tuple(gamma.shape) == tuple(z.shape):
    return gamma
  return z * gamma


def expand_gamma(gamma: Any, z: Any) -> Any:
  """Γ as arrays laid out like the params, from either storage of the state.

  Args:
    gamma: the ``gamma`` field of a :class:`DessiLBIState`: Γ, or for
      group-lasso leaves of an optimizer built with ``store_gamma=False``, the
      per-group scale (size 1 along the group's axes) with ``Γ = z · scale``.
    z: the state's ``z`` field.

  Returns:
    Γ, with arrays at coupled leaves and empty nodes at uncoupled ones.
  """
  # Match by key path: empty nodes may differ between the two trees (Flax NNX
  # turns optax.MaskedNode() into ()).
  z_by_path = dict(jax.tree_util.tree_leaves_with_path(z))
  return jax.tree_util.tree_map_with_path(
    lambda path, g: _expand(g, z_by_path[path]), gamma
  )


def _caller_stacklevel() -> int:
  """The ``stacklevel`` that points a warning at the user's code.

  Counted from the function that calls ``warnings.warn``, past every frame
  of this package and of the libraries that call into it (Optax's chains,
  JAX's transformations, Flax's optimizers, Equinox's filtered ones).
  """
  import os
  import sys
  import types

  import flax

  # Equinox's filtered transformations too, where it is imported.
  wrappers = [sys.modules[__package__], optax, jax, flax]
  wrappers += [sys.modules[m] for m in ('equinox',) if m in sys.modules]
  inside = tuple(
    os.path.dirname(str(module.__file__)) + os.sep for module in wrappers
  )
  frame: Optional[types.FrameType] = sys._getframe(2)  # the caller's caller
  level = 2
  while frame is not None and frame.f_code.co_filename.startswith(inside):
    frame, level = frame.f_back, level + 1
  return level


def _variable_paths(tree: Any) -> frozenset:
  """The key paths of the Flax NNX variables in ``tree``."""
  from flax import nnx

  def is_var(x):
    return isinstance(x, nnx.Variable)

  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_var)[0]
  return frozenset(tuple(path) for path, x in leaves if is_var(x))


def _normalise_path(
  path: tuple[Any, ...], variables: frozenset = frozenset()
) -> tuple[Any, ...]:
  """Drops the trailing ``.value`` a Flax NNX variable adds to its leaf's
  path (``variables``: the variables' paths; a field of another node that is
  named ``value`` stays)."""
  if path and isinstance(path[-1], jax.tree_util.GetAttrKey):
    if path[-1].name in ('value', 'raw_value') and path[:-1] in variables:
      return tuple(path[:-1])
  return tuple(path)


def warn_pytorch_layout(leaves: Iterable[tuple[tuple[str, ...], int]]) -> None:
  """The default rule groups conv kernels by their last axis, where Flax
  keeps the filters; leaves named ``weight`` are most likely laid out as
  in PyTorch or Equinox, filters first, whose groups it gets wrong.

  Args:
    leaves: ``(names, rank)`` of the leaves (the default rule couples
      every floating leaf of rank 3 or more).
  """
  names = [
    '/'.join(names)
    for names, rank in leaves
    if names[-1:] == ('weight',) and rank >= 3
  ]
  if names:
    warnings.warn(
      f'penalty: the default rule groups {names[:3]} by the last axis, '
      'where a Flax kernel (h, w, in, out) has its filters; a leaf named '
      '"weight" is laid out as in PyTorch or Equinox (out, in, h, w), '
      'filters first. For that layout pass a rule such as '
      "penalty_rule(conv=GroupLasso(axes=0), overrides={'bias$': None}) "
      '(README: "Other layouts"); any rule given silences this.',
      stacklevel=_caller_stacklevel(),
    )


def resolve_penalties(
  params: optax.Params, penalty: Optional[PenaltyRule] = None
) -> tuple[list[Optional[Penalty]], Any]:
  """Evaluates a penalty rule on every leaf of ``params``, with checks.

  Args:
    params: a pytree of arrays.
    penalty: a rule ``(path, leaf) -> Penalty | None``; None for
      :func:`dessilbi_jax.default_penalty`.

  Returns:
    The penalty of each leaf in flattening order, and the params' treedef.

  Raises:
    TypeError: a leaf is not a real floating array, or the rule returned
      something other than a ``Lasso``, a ``GroupLasso`` or None.
    ValueError: a ``GroupLasso``'s axes do not exist for its leaf.
  """
  penalties, treedef, _ = _resolve(params, penalty)
  return penalties, treedef


def _resolve(
  params: optax.Params, penalty: Optional[PenaltyRule]
) -> tuple[list[Optional[Penalty]], Any, PenaltyTable]:
  """:func:`resolve_penalties`, and the :class:`PenaltyTable` of its result."""
  _checks.check_rule_callable(penalty)
  rule = default_penalty if penalty is None else penalty
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  variables = _variable_paths(params)
  out: list[Optional[Penalty]] = []
  entries: list[tuple[tuple[str, ...], Penalty]] = []
  ranks: list[int] = []
  _checks.check_param_arrays(params)
  for path, leaf in leaves:
    path = _normalise_path(tuple(path), variables)
    if not hasattr(leaf, 'dtype'):
      # optax.tree.map_params initialises with one placeholder for params.
      out.append(None)
      continue
    name = path_str(path) or '<root>'
    if not jnp.issubdtype(leaf.dtype, jnp.floating):
      raise TypeError(
        f'params: leaf {name!r} has dtype {leaf.dtype}; DessiLBI needs real '
        'floating-point parameters (exclude other leaves from the optimizer, '
        'e.g. with optax.partition or nnx.Optimizer(wrt=nnx.Param)).'
      )
    if jnp.dtype(leaf.dtype).itemsize < 2:
      raise TypeError(
        f'params: leaf {name!r} has dtype {leaf.dtype}; 8-bit floats are not '
        'supported (keep a wider copy of such parameters to train them).'
      )
    choice = rule(path, leaf)
    if choice is not None and not isinstance(choice, (Lasso, GroupLasso)):
      raise TypeError(
        f'penalty: the rule returned {choice!r} for leaf {name!r}; expected '
        'a dessilbi_jax.Lasso, a dessilbi_jax.GroupLasso or None.'
      )
    if isinstance(choice, GroupLasso):
      try:
        choice.reduce_axes(leaf.ndim)
      except ValueError as e:
        raise ValueError(
          f'penalty: for leaf {name!r} of shape {tuple(leaf.shape)}: {e}'
        ) from None
    out.append(choice)
    if choice is not None:
      entries.append(
        (names_of(path), cast(Penalty, resolved(choice, leaf.ndim)))
      )
      ranks.append(leaf.ndim)
  return out, treedef, PenaltyTable(tuple(entries), tuple(ranks))


class _UnknownPenalties:
  """The penalties of a state initialised without params."""

  def __repr__(self) -> str:
    return '<penalties unknown>'


_UNKNOWN_PENALTIES = _UnknownPenalties()


def _check_recorded_penalties(recorded: Any, table: PenaltyTable) -> None:
  """A state records the penalties it was built under; an optimizer whose
  rule gives others must not silently step it with its own groups, nor a
  state built for leaves of another rank (its groups' axes are for those).
  A table without ranks (built by hand) is checked on its entries alone."""
  if not isinstance(recorded, PenaltyTable):
    return
  none = (None, None)
  for was, now in itertools.zip_longest(
    recorded.entries, table.entries, fillvalue=none
  ):
    if was != now:
      raise ValueError(
        "state: it was built under other penalties than this optimizer's "
        f'rule gives: the state records {_entry(was)} where the rule gives '
        f'{_entry(now)}. Build the optimizer with the rule the state was '
        'made with; to change penalties mid-path on purpose, give the state '
        "this optimizer's: optax.tree.set(state, "
        'penalties=dessilbi_jax.get_penalty(tx.init(params))).'
      )
  for (names, _), was_rank, now_rank in zip(
    table.entries, recorded.ranks, table.ranks, strict=False
  ):
    if was_rank != now_rank:
      raise ValueError(
        f'state: it was built for leaf {"/".join(names)!r} of rank '
        f'{was_rank}, and the params give it rank {now_rank}. A state '
        'initialised on stacked params (an ensemble) is stepped on stacked '
        'params; to step each member under jax.vmap, initialise the state '
        'under jax.vmap too.'
      )


def _entry(pair: tuple[Any, Any]) -> str:
  """A penalty table's entry as an error message names it."""
  names, choice = pair
  if names is None:
    return 'no more coupled leaves'
  return f'{"/".join(names)!r}: {choice!r}'


def scale_by_dessilbi(
  learning_rate: optax.ScalarOrSchedule,
  kappa: jax.typing.ArrayLike = 1.0,
  nu: jax.typing.ArrayLike = 100.0,
  penalty: Optional[PenaltyRule] = None,
  state_dtype: Optional[jax.typing.DTypeLike] = None,
  freeze: bool = False,
  store_gamma: bool = True,
) -> optax.GradientTransformation:
  r"""The DessiLBI (split Linearized Bregman Iteration) core.

  Takes whatever direction ``d`` the transformations before it produced (a raw
  gradient, a momentum trace, Adam's scaled moments) and, for each parameter
  ``W`` coupled to a sparse structure ``Γ`` through an auxiliary ``z``, returns
  the update of the coupled loss ``L(W) + ‖W - Γ‖² / (2ν)`` while advancing z
  and Γ in its state. With ``α`` the learning rate at this step, and the old
  ``W`` and ``Γ`` on every right-hand side:

  .. math::
    W^+ - W &= -κα \left(d + \frac{W - Γ}{ν}\right) \\
    z^+ &= z + \frac{α}{ν} (W - Γ) \\
    Γ^+ &= κ \operatorname{Prox}_Ω(z^+)

  Uncoupled parameters get ``-κα·d``. ``Prox`` is the soft-threshold of a
  :class:`~dessilbi_jax.Lasso` penalty or the group shrinkage of a
  :class:`~dessilbi_jax.GroupLasso`; Γ starts at 0 and its support
  ``{‖z_g‖ > λ}`` grows along the path.

  Args:
    learning_rate: the step size α, a float or a schedule of the step count.
    kappa: κ > 0, scales W's step and Γ's magnitude (not Γ's support).
    nu: ν > 0, the coupling strength; small ν ties W closely to Γ.
    penalty: a rule ``(path, leaf) -> Penalty | None`` deciding which leaves
      are coupled and how; None for :func:`~dessilbi_jax.default_penalty`
      (conv kernels grouped per output filter, Dense kernels elementwise,
      biases and norm parameters uncoupled). Under
      ``optax.inject_hyperparams``, pass a custom rule in ``static_args``.
    state_dtype: dtype of z and Γ; None for the params' dtype (e.g. float32
      z and Γ beside bfloat16 params).
    freeze: if true, groups of :class:`~dessilbi_jax.GroupLasso` leaves that
      are in the sparse model W* before the step (W on Γ's support: ``Γ ≠ 0``
      and ``W ≠ 0`` somewhere in the group) stop moving: their W update and
      their z step are zero. A selected group whose W is zero there (a
      pruned filter) moves on. Elementwise (lasso) and uncoupled leaves move
      as usual, as in the reference's ``step_with_freeze``. The
      state's layout does not depend on it, so a run can switch to a frozen
      optimizer mid-path with the same state.
    store_gamma: if false, Γ of group-lasso leaves (conv filters) is not
      stored: the state keeps one scale per group, ``κ·max(0, 1 - λ/‖z_g‖)``,
      and Γ is rebuilt as ``z · scale`` where needed. This saves a third of
      those leaves' optimizer memory, with the same trajectory up to float
      rounding. It is a memory option, not a speed one: the W update then
      reads the old z that the z update overwrites, and where XLA does not
      put both in one kernel it copies z first (measured: no faster in a
      ResNet-18 train step on a GPU). Lasso leaves keep Γ. Read Γ with
      :func:`dessilbi_jax.get_gamma`, which works for both storages.
      ``optax.tree.map_params`` cannot tell the scale from a params-shaped
      leaf (its placeholders carry no shape for the rule to group), so it
      applies its function to the scale too: map shardings or values over
      such a state with ``jax.tree.map`` on the arrays instead.

  Returns:
    A :class:`optax.GradientTransformation` whose state is a
    :class:`DessiLBIState`. Its ``update`` requires ``params``.

  Raises:
    ValueError: a hyper-parameter out of range (``learning_rate`` < 0,
      ``kappa`` or ``nu`` not > 0) or not finite. ``init`` and
      ``update`` raise ValueError or TypeError for params, gradients or a
      state that do not fit (the message names the leaf), ValueError for a
      ``kappa`` or ``nu`` that rounds to inf (or ``nu`` to 0) in the
      state's dtype.
    TypeError: a hyper-parameter that is not a real scalar (or, for
      ``learning_rate``, a schedule), a ``penalty`` that is not a rule, a
      ``state_dtype`` that is not floating-point, or a ``freeze`` or
      ``store_gamma`` that is not a bool.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import dessilbi_jax as dl
    >>> params = {'w': jnp.array([[2.0, 0.0], [0.0, 0.1]])}
    >>> tx = optax.chain(optax.trace(0.9), dl.scale_by_dessilbi(0.1, nu=1.0))
    >>> state = tx.init(params)
    >>> loss = lambda p: jnp.sum((p['w'] - jnp.eye(2) * 3) ** 2)
    >>> for _ in range(30):
    ...   grads = jax.grad(loss)(params)
    ...   updates, state = tx.update(grads, state, params)
    ...   params = optax.apply_updates(params, updates)
    >>> print(optax.tree.get(state, 'gamma')['w'] != 0)
    [[ True False]
     [False  True]]

  References:
    Fu, Liu, Li, Zhong, Sun, Zeng, Yao, `DessiLBI: Exploring Structural
    Sparsity of Deep Networks via Differential Inclusion Paths
    <https://proceedings.mlr.press/v119/fu20d.html>`_, ICML 2020.

    Fu et al., `Exploring Structural Sparsity of Deep Networks via Inverse
    Scale Spaces <https://arxiv.org/abs/1905.09449>`_, IEEE TPAMI 2022.
  """
  _checks.check_learning_rate(learning_rate)
  _checks.check_positive('kappa', kappa)
  _checks.check_positive('nu', nu)
  _checks.check_state_dtype(state_dtype)
  freeze = _checks.check_bool('freeze', freeze)
  store_gamma = _checks.check_bool('store_gamma', store_gamma)
  _checks.check_rule_callable(penalty)

  def init_fn(params):
    _checks.check_param_leaves(params)
    penalties, treedef, table = _resolve(params, penalty)
    if _checks.is_map_params_placeholder(params):
      # optax.tree.map_params initialises with a placeholder for the params,
      # and compares the state it gets with a real one: a leaf here matches
      # a real state's table whatever it holds (and is not params-shaped).
      table = _UNKNOWN_PENALTIES
    else:  # the placeholder has no leaves for an override to match
      _warn_unmatched_overrides(params)
      if penalty is None:
        warn_pytorch_layout(
          (names, rank)
          for (names, _), rank in zip(table.entries, table.ranks, strict=True)
        )

    z, gamma = [], []
    for leaf, choice in zip(
      treedef.flatten_up_to(params), penalties, strict=True
    ):
      if not hasattr(leaf, 'dtype'):  # placeholder of optax.tree.map_params
        z.append(leaf)
        gamma.append(leaf)
      elif choice is None:
        z.append(optax.MaskedNode())
        gamma.append(optax.MaskedNode())
      else:
        zeros = jnp.zeros_like(leaf, dtype=state_dtype)
        _checks.check_fits_dtype('kappa', kappa, zeros.dtype, 'z and Γ')
        # ν divides W - Γ and α in z's dtype or a wider one.
        _checks.check_fits_dtype('nu', nu, zeros.dtype, 'z and Γ', divisor=True)
        z.append(zeros)
        gamma.append(_new_gamma(zeros, choice))
    return DessiLBIState(
      count=jnp.zeros([], jnp.int32),
      z=treedef.unflatten(z),
      gamma=treedef.unflatten(gamma),
      penalties=table,
    )

  def _warn_unmatched_overrides(params):
    """A pattern of :func:`~dessilbi_jax.penalty_rule` that matched no leaf
    is most likely a typo (a layer meant to be uncoupled stays coupled)."""
    patterns = getattr(penalty, 'override_patterns', ())
    if not patterns:
      return
    # Leaves that optax.masked / optax.partition give to other branches are
    # MaskedNode()s here: their names count too.
    variables = _variable_paths(params)
    names = [
      path_str(_normalise_path(tuple(path), variables))
      for path, _ in jax.tree_util.tree_leaves_with_path(
        params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
      )
    ]
    for pattern in patterns:
      if not any(pattern.search(name) for name in names):
        warnings.warn(
          f'penalty: the override {pattern.pattern!r} matches no parameter '
          f'(e.g. {names[:3]}); check its spelling (patterns are regular '
          'expressions searched in paths such as "layer/kernel").',
          stacklevel=_caller_stacklevel(),
        )

  def _new_gamma(z, choice):
    """What the state stores for Γ = κ·Prox(z): Γ, or the per-group scale.

    Both storages compute Γ as ``z · scale`` for group-lasso leaves, so they
    follow one path (up to the rounding of fused multiply-adds).
    """
    kappa_z = jnp.asarray(kappa, z.dtype)
    if isinstance(choice, Lasso):
      return kappa_z * soft_threshold(z, choice.lam)
    thr = group_threshold(choice, z.shape)
    scale = kappa_z * group_factor(z, thr, choice.reduce_axes(z.ndim))
    if store_gamma or scale.shape == z.shape:
      return z * scale
    return scale

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_checks.NO_PARAMS_MSG)
    penalties, treedef, table = _resolve(params, penalty)
    _checks.check_update_trees(updates, state, params, penalties, treedef)
    _check_recorded_penalties(state.penalties, table)
    lr = (
      learning_rate(state.count) if callable(learning_rate) else learning_rate
    )
    if jnp.ndim(lr) != 0:
      raise ValueError(
        f'learning_rate: the schedule returned an array of shape '
        f'{jnp.shape(lr)}; expected a scalar.'
      )
    step = kappa * lr

    def z_step(dtype):
      # α/ν in z's precision at least: optax.inject_hyperparams keeps the
      # hyper-parameters in the params' dtype, and a float16 quotient would
      # round away the small steps of a float32 z (or flush them to zero).
      wide = jnp.promote_types(jnp.result_type(lr, nu), dtype)
      return jnp.asarray(lr, wide) / jnp.asarray(nu, wide)

    new_updates, new_z, new_gamma = [], [], []
    for d, w, z, gamma, choice in zip(
      treedef.flatten_up_to(updates),
      treedef.flatten_up_to(params),
      treedef.flatten_up_to(state.z),
      treedef.flatten_up_to(state.gamma),
      penalties,
      strict=True,
    ):
      if choice is None:
        new_updates.append((-step * d).astype(jnp.result_type(w)))
        new_z.append(z)
        new_gamma.append(gamma)
        continue
      gamma = _expand(gamma, z)
      update = -step * (d + (w - gamma) / nu)
      # z + (α/ν)(W - Γ), written as the same numbers from Γ - W so that it
      # shares no W - Γ with the update: on a GPU, XLA computes a shared
      # difference beside the convolution's transpose of W, in cuDNN's filter
      # layout, and z's whole path follows it there (five kernels per conv
      # kernel in a ResNet-18 train step instead of four; see
      # benchmarks/README.md, compile time).
      z_next = z - z_step(z.dtype) * (gamma - w)
      if freeze and isinstance(choice, GroupLasso):
        reduce_axes = choice.reduce_axes(w.ndim)
        # A group of W* (W on Γ's support) that is not zero stops, as the
        # reference's calculate_mask has it: a selected filter whose W is
        # zero there (pruned, say) goes on moving.
        in_w_star = in_support(gamma) & (w != 0)
        moving = ~jnp.any(in_w_star, axis=reduce_axes, keepdims=True)
        update = jnp.where(moving, update, 0)
        z_next = jnp.where(moving, z_next, z)
      new_updates.append(update.astype(jnp.result_type(w)))
      z_next = z_next.astype(z.dtype)
      new_z.append(z_next)
      new_gamma.append(_new_gamma(z_next, choice))

    new_state = DessiLBIState(
      count=optax.safe_increment(state.count),
      z=treedef.unflatten(new_z),
      gamma=treedef.unflatten(new_gamma),
      penalties=state.penalties,
    )
    return treedef.unflatten(new_updates), new_state

  return optax.GradientTransformation(init_fn, update_fn)
