"""Penalties: which parameters DessiLBI couples to a sparse Γ, and how.

A *penalty rule* is a function ``rule(path, leaf) -> Penalty | None`` evaluated
once per parameter leaf. ``None`` leaves the parameter uncoupled (a plain
``-κα·d`` step, no z and no Γ); :class:`Lasso` couples it elementwise and
:class:`GroupLasso` couples it with one group per index of the chosen axes.

The default rule, :func:`default_penalty`, is right for Flax NNX and Linen
layouts: convolution kernels (rank >= 3, HWIO) get one group per output filter
(the last axis), rank-2 kernels (Dense, ``(in, out)``) are elementwise, and
rank <= 1 leaves (biases, normalisation scales) are uncoupled. Build a rule with
other choices, or per-layer overrides, with :func:`penalty_rule`.
"""

import dataclasses
import functools
import json
import math
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union, cast

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization
from jax import export

KeyPath = tuple[Any, ...]


def _is_int(value: Any) -> bool:
  """A Python or NumPy integer, not a bool."""
  return isinstance(value, numbers.Integral) and not isinstance(
    value, (bool, np.bool_)
  )


def _check_lam(lam: float) -> float:
  if isinstance(lam, (jax.Array, np.ndarray)) and lam.shape == ():
    # A scalar array is a number here: a penalty is static (hashed into the
    # compiled step), so its λ must be concrete.
    try:
      lam = lam.item()
    except jax.errors.ConcretizationTypeError:
      raise TypeError(
        'lam must be concrete: a penalty is static (part of the compiled '
        'step), so λ cannot be a traced value; got a traced array.'
      ) from None
  if isinstance(lam, bool) or not isinstance(lam, numbers.Real):
    raise TypeError(
      f'lam must be a real number (the shrinkage threshold λ), got '
      f'{type(lam).__name__}.'
    )
  if not math.isfinite(lam) or lam < 0:
    raise ValueError(f'lam must be a finite number >= 0, got {lam}.')
  return float(lam)


@dataclasses.dataclass(frozen=True)
class Lasso:
  """Elementwise (lasso) penalty: ``Γ = κ·sign(z)·max(|z| - λ, 0)``.

  Attributes:
    lam: the threshold λ (default 1, as in the reference implementation).

  Raises:
    TypeError: ``lam`` is not a real number.
    ValueError: ``lam`` is negative or not finite.
  """

  lam: float = 1.0

  def __post_init__(self):
    object.__setattr__(self, 'lam', _check_lam(self.lam))


@dataclasses.dataclass(frozen=True)
class GroupLasso:
  """Group-lasso penalty: ``Γ_g = κ·z_g·max(0, 1 - λ_g / ‖z_g‖₂)``.

  A group is the set of entries that share one index along ``axes``: with the
  default ``axes=(-1,)`` a Flax conv kernel (HWIO) has one group per output
  filter and a Dense kernel ``(in, out)`` one group per output neuron; use
  ``axes=(0,)`` for one group per input of a Dense kernel.

  Attributes:
    axes: the axes that index the groups; the norm runs over all other axes.
    lam: the threshold λ (default 1, as in the reference implementation).
    scale_by_size: if true, the threshold is ``λ·√|g|`` with ``|g|`` the
      number of entries in a group (the reference's lottery-ticket variant).

  Raises:
    TypeError: ``axes`` is not an int or a sequence of ints, ``lam`` is not
      a real number, or ``scale_by_size`` is not a bool.
    ValueError: ``lam`` is negative or not finite (axes that do not exist
      for a leaf, or name one axis twice, are refused where the rule is
      applied to it: at the optimizer's ``init``).
  """

  axes: Union[int, Sequence[int]] = (-1,)
  lam: float = 1.0
  scale_by_size: bool = False

  def __post_init__(self):
    axes = (self.axes,) if _is_int(self.axes) else self.axes
    # A str or bytes is a sequence too ('' would be no axes, b'\x03' axis 3).
    if (
      not isinstance(axes, Sequence)
      or isinstance(axes, (str, bytes))
      or not all(_is_int(a) for a in axes)
    ):
      raise TypeError(
        f'axes must be an int or a sequence of ints, got {self.axes!r}.'
      )
    object.__setattr__(self, 'axes', tuple(int(a) for a in axes))
    object.__setattr__(self, 'lam', _check_lam(self.lam))
    if not isinstance(self.scale_by_size, (bool, np.bool_)):
      raise TypeError(
        f'scale_by_size must be a bool, got {self.scale_by_size!r}.'
      )
    object.__setattr__(self, 'scale_by_size', bool(self.scale_by_size))

  def group_axes(self, ndim: int) -> tuple[int, ...]:
    """The axes indexing the groups, non-negative, for a leaf of rank ndim."""
    out = []
    # A tuple of ints once __post_init__ has run.
    for a in cast(tuple[int, ...], self.axes):
      if not -ndim <= a < ndim:
        raise ValueError(
          f'GroupLasso axes={self.axes} do not exist for a parameter of '
          f'rank {ndim}.'
        )
      out.append(a % ndim)
    if len(set(out)) != len(out):
      raise ValueError(f'GroupLasso axes={self.axes} repeat an axis.')
    return tuple(sorted(out))

  def reduce_axes(self, ndim: int) -> tuple[int, ...]:
    """The axes a group norm runs over, for a leaf of rank ndim."""
    keep = self.group_axes(ndim)
    return tuple(a for a in range(ndim) if a not in keep)

  def group_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
    """The shape of one entry per group: size 1 along the reduced axes."""
    reduce_axes = self.reduce_axes(len(shape))
    return tuple(1 if a in reduce_axes else n for a, n in enumerate(shape))


_NO_LEAF = object()

Penalty = Union[Lasso, GroupLasso]
PenaltyRule = Callable[[KeyPath, Any], Union[Penalty, None]]

_ONE_ARGUMENT_MSG = (
  'penalty: a rule is called as rule(path, leaf), here with one argument: '
  'under optax.inject_hyperparams, name penalty in static_args (e.g. '
  "static_args=('penalty',))."
)


def resolved(choice: Union[Penalty, None], ndim: int) -> Union[Penalty, None]:
  """``choice`` for a leaf of rank ``ndim``, spelled one way: a group
  lasso's axes non-negative and sorted (``axes=-1`` and ``axes=(3,)`` give
  the same groups of a rank-4 kernel, and compare equal once resolved)."""
  if isinstance(choice, GroupLasso):
    return dataclasses.replace(choice, axes=choice.group_axes(ndim))
  return choice


def path_str(path: KeyPath) -> str:
  """A readable ``'layer/name'`` string for a parameter's key path."""
  return jax.tree_util.keystr(tuple(path), simple=True, separator='/')


def _key_name(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def names_of(path: KeyPath) -> tuple[str, ...]:
  """``(DictKey('conv1'), DictKey('kernel'))`` -> ``('conv1', 'kernel')``.

  A trailing ``.value`` or ``.raw_value`` attribute (an NNX variable's) is
  dropped, and a key holding ``/`` is split there, so that every name joins
  and splits back the same (``'enc/conv1'`` names ``{'enc/conv1': ...}`` and
  ``{'enc': {'conv1': ...}}`` alike).
  """
  keys = tuple(path)
  if keys and isinstance(keys[-1], jax.tree_util.GetAttrKey):
    if keys[-1].name in ('value', 'raw_value'):
      keys = keys[:-1]
  return tuple(part for k in keys for part in _key_name(k).split('/') if part)


@jax.tree_util.register_static
@dataclasses.dataclass(frozen=True)
class PenaltyTable:
  """The penalty of every coupled leaf, as an optimizer resolved its rule.

  The state of :func:`~dessilbi_jax.scale_by_dessilbi` carries one (its
  ``penalties`` field), so the toolbox knows the optimizer's groups without
  being given its rule again. It is static pytree data: it adds no leaves
  to the state, only to its tree structure, and compares by value.

  It is itself a penalty rule, ``table(path, leaf)``: the recorded penalty
  for a leaf of that path, None for any other leaf. Pass
  :func:`~dessilbi_jax.get_penalty` of a state as ``penalty=`` to the
  functions that see params and a record but no optimizer state
  (:func:`~dessilbi_jax.rank_groups`, :func:`~dessilbi_jax.prune`,
  :func:`~dessilbi_jax.magnitude_record`).

  Attributes:
    entries: ``(names, penalty)`` pairs in the params' flattening order,
      ``names`` being the keys on a leaf's path (``('conv1', 'kernel')``),
      a group lasso's axes resolved for the leaf (non-negative, sorted).
    ranks: each entry's leaf rank, which its resolved axes are for; a leaf
      of another rank by that name (e.g. Γ of a ``jax.vmap``-stacked
      ensemble of states) is refused. Empty: not checked.
  """

  entries: tuple[tuple[tuple[str, ...], Penalty], ...] = ()
  ranks: tuple[int, ...] = ()

  @functools.cached_property
  def by_name(self) -> dict[tuple[str, ...], Penalty]:
    """The entries as a dict."""
    return dict(self.entries)

  @functools.cached_property
  def _rank_by_name(self) -> dict[tuple[str, ...], int]:
    return {n: r for (n, _), r in zip(self.entries, self.ranks, strict=False)}

  def __call__(
    self, path: KeyPath, leaf: Any = _NO_LEAF
  ) -> Union[Penalty, None]:
    if leaf is _NO_LEAF:
      raise TypeError(_ONE_ARGUMENT_MSG)
    names = names_of(path)
    choice = self.by_name.get(names)
    rank = self._rank_by_name.get(names)
    if rank is not None and getattr(leaf, 'ndim', rank) != rank:
      raise ValueError(
        f'penalty: leaf {"/".join(names)!r} has rank {leaf.ndim}, but the '
        f'optimizer gave it {choice!r} as a leaf of rank {rank}; for an '
        'ensemble of states stacked by jax.vmap, call the toolbox under '
        'jax.vmap too.'
      )
    return choice

  def __repr__(self) -> str:
    inner = ', '.join(f"'{'/'.join(n)}': {p!r}" for n, p in self.entries)
    return f'PenaltyTable({{{inner}}})'


# Flax's serialization (to_bytes, to_state_dict) writes None for it, as for a
# state without penalties (JAX flattens no leaves of either), and restores the
# target's own.
serialization.register_serialization_state(
  PenaltyTable, lambda table: None, lambda target, state: target
)


def _table_to_json(table: PenaltyTable) -> bytes:
  """The table as JSON: it is part of a state's tree structure, which
  ``jax.export`` writes into a serialized function's calling convention."""

  def penalty(p: Penalty) -> dict[str, Any]:
    if isinstance(p, Lasso):
      return {'lasso': {'lam': p.lam}}
    return {
      'group': {
        'axes': list(cast(tuple[int, ...], p.axes)),
        'lam': p.lam,
        'scale_by_size': p.scale_by_size,
      }
    }

  entries = [[list(names), penalty(p)] for names, p in table.entries]
  data = {'entries': entries, 'ranks': list(table.ranks)}
  return json.dumps(data).encode('utf-8')


def _table_from_json(data: bytes) -> PenaltyTable:
  def penalty(d: dict[str, Any]) -> Penalty:
    if 'lasso' in d:
      return Lasso(**d['lasso'])
    return GroupLasso(**d['group'])

  loaded = json.loads(data.decode('utf-8'))
  return PenaltyTable(
    tuple((tuple(names), penalty(p)) for names, p in loaded['entries']),
    tuple(loaded['ranks']),
  )


# So that a jitted step taking or returning a DessiLBI state can be
# serialized with jax.export. The program registers the NamedTuple states,
# Optax's and this library's, with export.register_namedtuple_serialization
# (registering a type twice is an error).
export.register_pytree_node_serialization(
  PenaltyTable,
  serialized_name='dessilbi_jax.PenaltyTable',
  serialize_auxdata=_table_to_json,
  deserialize_auxdata=_table_from_json,
)


def penalty_rule(
  conv: Union[Penalty, None] = GroupLasso(axes=(-1,)),
  dense: Union[Penalty, None] = Lasso(),
  overrides: Union[Mapping[str, Union[Penalty, None]], None] = None,
) -> PenaltyRule:
  """Builds a penalty rule from per-rank defaults and per-path overrides.

  Args:
    conv: the penalty of rank >= 3 leaves (Flax conv kernels, HWIO). Other
      rank-3 kernels (``DenseGeneral``, attention projections) are matched too:
      name them in ``overrides`` to give them another penalty.
    dense: the penalty of rank-2 leaves (Flax Dense kernels, ``(in, out)``).
    overrides: maps regular expressions to penalties; the first pattern that
      ``re.search`` finds in a leaf's path string (``'layer/kernel'``) decides
      that leaf, before the rank defaults. ``None`` leaves a leaf uncoupled.

  Returns:
    A rule ``(path, leaf) -> Penalty | None``. Rank <= 1 leaves that no
    override names are uncoupled.

  Raises:
    TypeError: ``conv``, ``dense`` or a value of ``overrides`` is not a
      ``Lasso``, a ``GroupLasso`` or None, or ``overrides`` is not a
      mapping.
    ValueError: a key of ``overrides`` is not a regular expression.

  Example:
    >>> import dessilbi_jax as dl
    >>> rule = dl.penalty_rule(overrides={'head': None})
    >>> import jax.numpy as jnp
    >>> from jax.tree_util import DictKey
    >>> rule((DictKey('head'), DictKey('kernel')), jnp.zeros((4, 2))) is None
    True
    >>> rule((DictKey('body'), DictKey('kernel')), jnp.zeros((4, 2)))
    Lasso(lam=1.0)
  """
  for name, value in (('conv', conv), ('dense', dense)):
    if value is not None and not isinstance(value, (Lasso, GroupLasso)):
      raise TypeError(
        f'{name} must be a Lasso, a GroupLasso or None, got {value!r}.'
      )
  if overrides is not None and not isinstance(overrides, Mapping):
    raise TypeError(
      'overrides must be a mapping {regular expression: penalty or None}, '
      f'got {type(overrides).__name__}.'
    )
  compiled = []
  for pattern, value in (overrides or {}).items():
    if value is not None and not isinstance(value, (Lasso, GroupLasso)):
      raise TypeError(
        f'overrides[{pattern!r}] must be a Lasso, a GroupLasso or None, '
        f'got {value!r}.'
      )
    try:
      compiled.append((re.compile(pattern), value))
    except (re.error, TypeError) as e:
      raise ValueError(
        f'overrides: {pattern!r} is not a regular expression: {e}.'
      ) from None

  def rule(path: KeyPath, leaf: Any = _NO_LEAF) -> Union[Penalty, None]:
    if leaf is _NO_LEAF:
      raise TypeError(_ONE_ARGUMENT_MSG)
    name = path_str(path)
    for pattern, value in compiled:
      if pattern.search(name):
        return value
    ndim = jnp.ndim(leaf)
    if ndim >= 3:
      return conv
    if ndim == 2:
      return dense
    return None

  # The override patterns, so that init can say which of them matched nothing.
  rule.override_patterns = tuple(p for p, _ in compiled)  # type: ignore[attr-defined]
  return rule


default_penalty: PenaltyRule = penalty_rule()
default_penalty.__doc__ = (
  'The default rule: conv kernels (rank >= 3) -> GroupLasso over the last '
  'axis, rank-2 kernels -> Lasso, rank <= 1 -> uncoupled; λ = 1.'
)
