"""Private helpers shared by the sparse-path toolbox.

Every public function of the toolbox accepts plain pytrees (Linen params,
Optax states) as well as Flax NNX states (``nnx.state(model, nnx.Param)``,
``nnx.Optimizer(...).opt_state``). It first makes them *pure* (NNX variables
unwrapped to arrays; an uncoupled leaf of Γ is then ``()`` instead of
``optax.MaskedNode()``) and matches leaves of different trees by their *names*:
the tuple of dictionary keys / attribute names / indices on a leaf's path.
"""

import functools
from collections.abc import Iterable
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dessilbi_jax import _checks
from dessilbi_jax.penalties import (
  GroupLasso,
  Lasso,
  Penalty,
  PenaltyRule,
  PenaltyTable,
  default_penalty,
  names_of,
  resolved,
)
from dessilbi_jax.transform import (
  _normalise_path,
  _variable_paths,
  expand_gamma,
  resolve_penalties,
)

Names = tuple[str, ...]


def variable_value(var: nnx.Variable) -> Any:
  """What an NNX variable holds (``get_value`` from Flax 0.12.7 on)."""
  if hasattr(nnx.Variable, 'get_value'):
    return var.get_value()
  return var.value


def set_variable(var: nnx.Variable, value: Any) -> None:
  """Writes ``value`` into an NNX variable."""
  if hasattr(nnx.Variable, 'set_value'):
    var.set_value(value)
  else:
    var.value = value


def pure(tree: Any) -> Any:
  """The tree with Flax NNX variables replaced by their values."""
  if hasattr(nnx, 'as_pure'):  # Flax 0.12.7 on
    return nnx.as_pure(tree)
  return jax.tree.map(
    lambda x: variable_value(x) if isinstance(x, nnx.Variable) else x,
    tree,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def editable(params: Any) -> Any:
  """:func:`pure` for params that a function returns edited, laid out as
  given.

  Raises:
    TypeError: ``params`` is an NNX module rather than its state (the
      result would be a module holding arrays that its attributes, such as
      its widths, do not describe).
  """
  if isinstance(params, nnx.Module):
    raise TypeError(
      f'params: got the Flax NNX module {type(params).__name__}; pass its '
      'state, nnx.state(model) (or nnx.state(model, nnx.Param) for the '
      'params alone), and load the result into a model with nnx.update.'
    )
  return pure(params)


def is_empty(x: Any) -> bool:
  """An uncoupled slot of z/Γ: ``optax.MaskedNode()``, or ``()`` after NNX."""
  return isinstance(x, tuple) and len(x) == 0


def join(names: Names) -> str:
  return '/'.join(names)


def split_name(name: str) -> Names:
  return tuple(p for p in name.split('/') if p)


def leaves_by_name(tree: Any) -> dict[Names, jax.Array]:
  """The array leaves of a pure tree, keyed by their names."""
  out = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    out[names_of(path)] = leaf
  return out


def map_with_names(fn, tree: Any) -> Any:
  """``jax.tree.map`` over a pure tree with ``fn(names, leaf)``."""
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: fn(names_of(path), leaf), tree
  )


def _is_core(path, value) -> bool:
  del value
  return getattr(path[-1], 'tuple_name', None) == 'DessiLBIState'


class Core(NamedTuple):
  """The fields of the (single) DessiLBIState inside an optimizer state."""

  count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
  z: Any
  gamma: Any
  penalties: Optional[PenaltyTable]


def core_state(opt_state: Any, arg: str = 'opt_state') -> Core:
  """Finds the DessiLBI core's count, z and Γ in a (wrapped) Optax state.

  Raises:
    ValueError: no DessiLBI core in the state, or more than one.
  """
  state = pure(opt_state)
  fields = {}
  for field in ('count', 'z', 'gamma'):
    try:
      fields[field] = optax.tree.get(state, field, filtering=_is_core)
    except KeyError:
      raise ValueError(
        f'{arg}: found more than one DessiLBI core state; pass the state of '
        'one optimizer (e.g. one branch of optax.partition).'
      ) from None
    if fields[field] is None:
      raise ValueError(
        f'{arg}: no DessiLBIState found (searched for its {field!r}); pass '
        'the state of an optimizer built with dessilbi_jax.dessilbi or '
        'dessilbi_jax.scale_by_dessilbi (for Flax NNX: optimizer.opt_state).'
      )
  fields['gamma'] = expand_gamma(fields['gamma'], fields['z'])
  recorded = optax.tree.get(state, 'penalties', filtering=_is_core)
  fields['penalties'] = recorded if isinstance(recorded, PenaltyTable) else None
  return Core(**fields)


def rule_of(core: Core, penalty: Optional[PenaltyRule] = None) -> PenaltyRule:
  """The rule that gives a state's groups: the penalties the state records
  (its optimizer's), else ``penalty``, else the default rule.

  Raises:
    ValueError: ``penalty`` gives a leaf of Γ another penalty than the state
      records (it is not the rule the optimizer was built with).
  """
  if core.penalties is None:
    return default_penalty if penalty is None else penalty
  recorded = core.penalties.by_name
  if len(recorded) < len(core.penalties.entries):
    every = [n for n, _ in core.penalties.entries]
    twice = next(n for n in every if every.count(n) > 1)
    raise ValueError(
      f'opt_state: two coupled leaves have the name {join(twice)!r} here (a '
      'trailing .value or .raw_value attribute is dropped from names, as NNX '
      "variables add one, and keys are split at '/'), so the toolbox cannot "
      'tell their groups apart; rename one.'
    )
  if penalty is None:
    return core.penalties
  gammas = leaves_by_name(core.gamma)
  for names, given in penalties_by_name(core.gamma, penalty).items():
    choice = resolved(given, gammas[names].ndim)
    if recorded.get(names) != choice:
      raise ValueError(
        f'penalty: the rule gives {join(names)!r} {choice!r}, but the '
        f"optimizer state records {recorded.get(names)!r} (its optimizer's "
        'rule); leave penalty out to use the penalties the state records.'
      )
  return penalty


def penalties_by_name(
  gamma: Any, penalty: Optional[PenaltyRule] = None
) -> dict[Names, Penalty]:
  """The penalty of every coupled leaf of Γ, keyed by name.

  Raises:
    ValueError: the rule leaves a leaf uncoupled that Γ holds.
  """
  choices, _ = resolve_penalties(gamma, penalty)
  out = {}
  leaves = jax.tree_util.tree_leaves_with_path(gamma)
  for (path, _), choice in zip(leaves, choices, strict=True):
    names = names_of(path)
    if choice is None:
      raise ValueError(
        f'penalty: the rule leaves {join(names)!r} uncoupled, but the '
        'optimizer state holds a Γ for it; pass the penalty rule the '
        'optimizer was built with.'
      )
    out[names] = choice
  return out


def grouped_penalties(
  core: Core, penalty: Optional[PenaltyRule] = None
) -> dict[Names, Penalty]:
  """:func:`penalties_by_name` for a core state, under :func:`rule_of`.

  A state that records its penalties needs no more checks. For one that
  does not (built by hand), the rule is checked against Γ: Γ = κ·Prox(z)
  leaves a trace of the groups it was made with: a group of
  a group lasso is in Γ's support or out of it as a whole; under a lasso,
  the selected entries are the ones with the largest |z|. A rule whose groups
  contradict that (another rule than the optimizer's, e.g. the default one
  for a state made with custom groups) would give groups that are not the
  optimizer's, silently; this raises instead. The check needs concrete
  arrays this process can read; it is skipped under ``jax.jit`` and for
  arrays spread over several hosts.

  Raises:
    ValueError: the rule disagrees with the state's record, leaves a coupled
      leaf uncoupled, or Γ of a leaf is not grouped the way the rule says.
  """
  penalties = penalties_by_name(core.gamma, rule_of(core, penalty))
  if core.penalties is not None:  # the optimizer's own record: nothing to check
    return penalties
  arrays = jax.tree.leaves((core.z, core.gamma))
  if any(
    isinstance(x, jax.core.Tracer) or not getattr(x, 'is_fully_addressable', 1)
    for x in arrays
  ):  # under jit, or spread over other hosts: nothing to read here
    return penalties
  zs, gammas = leaves_by_name(core.z), leaves_by_name(core.gamma)
  names = [n for n in penalties if n in zs]
  consistent = jax.device_get(
    _grouping_holds(
      [zs[n] for n in names],
      [gammas[n] for n in names],
      tuple(penalties[n] for n in names),
    )
  )
  for n, ok in zip(names, consistent, strict=True):
    if not ok:
      raise ValueError(
        f'penalty: Γ of {join(n)!r} is not grouped the way the rule says '
        f'({penalties[n]!r}); pass the penalty rule the optimizer was built '
        'with.'
      )
  return penalties


@functools.partial(jax.jit, static_argnums=2)
def _grouping_holds(zs, gammas, choices) -> list[jax.Array]:
  """Per leaf: whether Γ's support could be that of κ·Prox(z) under the
  leaf's penalty. Comparisons of supports only, not of values, so that
  states rounded to another precision on the way (bfloat16, or float32 read
  as float64) still pass.

  Entries where z is 0 are left out (Γ is 0 there in any state an optimizer
  made; hand-made states may set Γ alone), and so are non-finite ones (a
  diverged run is not a grouping error).
  """
  out = []
  for z, g, choice in zip(zs, gammas, choices, strict=True):
    nz = (z != 0) & jnp.isfinite(z) & jnp.isfinite(g)
    on, off = nz & (g != 0), nz & (g == 0)
    if isinstance(choice, Lasso):
      # Selected exactly where |z| > λ: no unselected |z| above a selected one.
      a = jnp.abs(z)
      top_off = jnp.max(jnp.where(off, a, 0), initial=0)
      low_on = jnp.min(jnp.where(on, a, jnp.inf), initial=jnp.inf)
      out.append(top_off <= low_on)
    else:
      # A group is in the support or out of it as a whole (Γ_g = z_g · s_g),
      # except where z_i · s_g underflows in Γ's dtype (float16, a group
      # that has just entered): an entry counts as out only if z_i · s_g,
      # with s_g read off the group's entries in, is clearly representable.
      axes = choice.reduce_axes(z.ndim)
      a = jnp.abs(z).astype(jnp.float32)
      ratio = jnp.abs(g).astype(jnp.float32) / jnp.where(on, a, 1)
      scale = jnp.max(jnp.where(on, ratio, 0), axis=axes, keepdims=True)
      tiny = 4 * float(jnp.finfo(g.dtype).smallest_subnormal)
      visible = off & (a * scale >= tiny)
      mixed = jnp.any(on, axis=axes) & jnp.any(visible, axis=axes)
      out.append(~jnp.any(mixed))
  return out


def reduce_axes(choice: Penalty, ndim: int) -> tuple[int, ...]:
  """The axes one group spans (none for an elementwise penalty)."""
  if isinstance(choice, Lasso):
    return ()
  return choice.reduce_axes(ndim)


def group_any(mask: jax.Array, choice: Penalty) -> jax.Array:
  """Per group: whether any entry of the group is set."""
  axes = reduce_axes(choice, mask.ndim)
  return jnp.any(mask, axis=axes) if axes else mask


def group_norm(w: jax.Array, choice: Penalty) -> jax.Array:
  """Per group: ‖W_g‖₂ (|W| for an elementwise penalty), in at least
  float32 (a float16 filter's sum of squares passes 65504 at |w| ≈ 3.8 over
  3×3×512 weights)."""
  axes = reduce_axes(choice, w.ndim)
  if not axes:
    return jnp.abs(w)
  w = w.astype(jnp.promote_types(w.dtype, jnp.float32))
  return jnp.sqrt(jnp.sum(jnp.square(w), axis=axes))


def _explicit_spec(x: Any) -> Any:
  """The PartitionSpec of x's type where it shards x over explicit mesh
  axes; None for an array whose type carries no sharding."""
  typeof = getattr(jax, 'typeof', None)
  if typeof is None or not hasattr(x, 'shape'):
    return None
  spec = getattr(getattr(typeof(x), 'sharding', None), 'spec', None)
  if spec is None or all(s is None for s in spec):
    return None
  return spec


def replicated(x: jax.Array) -> jax.Array:
  """x whole on every device where its type shards it (explicit mesh
  axes): a sort or a reshape across the sharded axis needs it whole.
  The mesh comes from x's type, so no ``jax.set_mesh`` is needed."""
  if _explicit_spec(x) is None:
    return x
  mesh = jax.typeof(x).sharding.mesh
  return jax.sharding.reshard(
    x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  )


def sharded_like(x: jax.Array, like: Any) -> jax.Array:
  """x with the sharding of ``like``'s type (explicit mesh axes), so that
  the two combine in ``jnp.where``; x itself otherwise."""
  spec = _explicit_spec(like)
  if spec is None or _explicit_spec(x) == spec:
    return x
  return jax.sharding.reshard(x, jax.typeof(like).sharding)


def expand_groups(per_group: jax.Array, choice: Penalty, ndim: int):
  """Broadcasts a per-group array back to the leaf's rank."""
  axes = reduce_axes(choice, ndim)
  return jnp.expand_dims(per_group, axes) if axes else per_group


def is_output_grouped(choice: Penalty, ndim: int) -> bool:
  """One group per output filter/neuron (the last axis of a Flax kernel)."""
  return isinstance(choice, GroupLasso) and choice.group_axes(ndim) == (
    ndim - 1,
  )


def nesting_hint(names_in_tree: Iterable[Names], names: Names) -> str:
  """Where a tree holds ``names`` one level or more down (Linen's
  ``variables`` passed for ``variables['params']``), a hint saying so."""
  for n in names_in_tree:
    if len(n) > len(names) and n[len(n) - len(names) :] == names:
      above = join(n[: len(n) - len(names)])
      return (
        f' (they hold it as {join(n)!r}: pass the subtree under {above!r}, '
        "e.g. variables['params'] in Flax Linen)"
      )
  return ''


def lookup(
  table: dict[Names, Any], names: Names, what: str, arg: str = 'params'
) -> Any:
  if names not in table:
    raise ValueError(
      f'{arg}: has no leaf {join(names)!r}{nesting_hint(table, names)}, which '
      f'{what} holds; the trees do not belong to the same model.'
    )
  return table[names]


def check_same_shape(names: Names, a: jax.Array, b: jax.Array, what: str):
  if tuple(a.shape) != tuple(b.shape):
    raise ValueError(
      f'params: leaf {join(names)!r} has shape {tuple(a.shape)} but {what} '
      f'has {tuple(b.shape)}; the trees do not belong to the same model.'
    )


def penalty_table(
  params: Any, names: Iterable[Names], penalty: Optional[PenaltyRule] = None
) -> dict[Names, Optional[Penalty]]:
  """The penalty a rule gives each leaf of ``params`` named in ``names``.

  The rule sees each leaf's own key path (as the optimizer's ``init`` does),
  so rules that look at key types or indices choose the same groups here.
  """
  _checks.check_rule_callable(penalty)
  rule = default_penalty if penalty is None else penalty
  wanted = set(names)
  out = {}
  variables = _variable_paths(params)
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    key = names_of(path)
    if key in wanted:
      out[key] = rule(_normalise_path(tuple(path), variables), leaf)
  return out


def penalty_at(names: Names, table: dict[Names, Optional[Penalty]]) -> Penalty:
  """A leaf's penalty from :func:`penalty_table`.

  Raises:
    ValueError: the rule leaves that leaf uncoupled.
  """
  choice = table.get(names)
  if choice is None:
    raise ValueError(
      f'penalty: the rule leaves {join(names)!r} uncoupled, so it has no '
      'groups; pass the penalty rule the optimizer was built with.'
    )
  return choice


# The record value of a group never selected (public as
# dessilbi_jax.NOT_SELECTED, defined here for check_record).
NOT_SELECTED = int(jnp.iinfo(jnp.int32).max)


def recorded_ranks(params: Any, record: Any) -> list[tuple[Names, int]]:
  """``(names, rank)`` of each array leaf of ``params`` that ``record``
  holds (all of them for ``record=None``)."""
  wanted = None if record is None else leaves_by_name(pure(record))
  return [
    (names, len(leaf.shape))
    for names, leaf in leaves_by_name(pure(params)).items()
    if hasattr(leaf, 'shape') and (wanted is None or names in wanted)
  ]


def check_record(record: Any, arg: str = 'record') -> None:
  """A first-selection record holds integer steps.

  Raises:
    TypeError: a leaf is not an integer array (e.g. a boolean support mask,
      or a float epoch record), whose values would be read as steps, or its
      integers cannot hold NOT_SELECTED (int8 or int16: it would read as -1,
      selected at step -1).
  """
  for names, r in leaves_by_name(record).items():
    dtype = getattr(r, 'dtype', None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
      raise TypeError(
        f'{arg}: leaf {join(names)!r} has dtype {dtype}; expected the integer '
        'first-selection steps of init_selection, update_selection, '
        'track_selection or magnitude_record (not a support mask or a '
        'ReferenceOrder epoch record).'
      )
    if jnp.iinfo(dtype).max < NOT_SELECTED:
      raise TypeError(
        f'{arg}: leaf {join(names)!r} has dtype {dtype}, which cannot hold '
        f'NOT_SELECTED ({NOT_SELECTED}); keep records in int32, as '
        'init_selection makes them.'
      )


def check_rule(penalty: Optional[PenaltyRule]) -> None:
  """A penalty rule the toolbox compiles with: callable, and hashable.

  Raises:
    TypeError: the rule is not callable, or cannot be hashed (e.g. a
      dataclass that is not frozen), so it cannot be a static argument of a
      compiled function.
  """
  _checks.check_rule_callable(penalty)
  try:
    hash(penalty)
  except TypeError:
    raise TypeError(
      f'penalty: the rule must be hashable (a function, or a frozen '
      f'dataclass with __call__), got an unhashable {type(penalty).__name__}.'
    ) from None
