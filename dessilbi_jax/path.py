"""The sparse path at one point: support of Γ, W*, the residue, a summary.

All functions are pure functions of ``(params, opt_state)``. They accept plain
pytrees (Linen params, any Optax state that contains a
:class:`~dessilbi_jax.DessiLBIState`, possibly inside chains and wrappers) and
Flax NNX states (``nnx.state(model, nnx.Param)``, ``optimizer.opt_state``).
"""

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax import _checks, _trees
from dessilbi_jax.penalties import GroupLasso, PenaltyRule, PenaltyTable
from dessilbi_jax.shrinkage import in_support
from dessilbi_jax.topology import (
  Spec,
  channel_masks,
  check_spec,
  unread_biases,
)


def get_gamma(opt_state: optax.OptState) -> Any:
  """Γ, the sparse structure, as arrays laid out like the params.

  Works for both storages of the core (``store_gamma=True``, the default, and
  ``store_gamma=False``, where Γ is rebuilt from z) and finds the core inside
  chains, wrappers and Flax NNX optimizer states.

  Args:
    opt_state: an optimizer state containing a
      :class:`~dessilbi_jax.DessiLBIState`.

  Returns:
    Γ: arrays at coupled leaves, empty nodes at uncoupled ones.

  Raises:
    ValueError: the state holds no :class:`~dessilbi_jax.DessiLBIState`,
      or more than one.

  Example:
    >>> import jax.numpy as jnp, optax
    >>> import dessilbi_jax as dl
    >>> params = {'w': jnp.array([[3.0, 0.2]])}
    >>> tx = dl.dessilbi(1.0, nu=1.0, momentum=None, store_gamma=False)
    >>> state = tx.init(params)
    >>> _, state = tx.update({'w': jnp.zeros((1, 2))}, state, params)
    >>> dl.get_gamma(state)['w']
    Array([[2., 0.]], dtype=float32)
  """
  return _trees.core_state(opt_state).gamma


def get_penalty(opt_state: optax.OptState) -> PenaltyTable:
  """The penalties a DessiLBI optimizer state records, as a penalty rule.

  The toolbox's functions that take an optimizer state read them there, so
  their ``penalty=`` can be left out. Pass this to the functions that see
  params and a selection record but no state (:func:`rank_groups`,
  :func:`prune`, :func:`magnitude_record`), for an optimizer built with
  another rule than the default one.

  Args:
    opt_state: an optimizer state containing a
      :class:`~dessilbi_jax.DessiLBIState`.

  Returns:
    A :class:`~dessilbi_jax.PenaltyTable`: each coupled leaf's penalty, by
    name; called as ``table(path, leaf)``, it is the optimizer's rule.

  Raises:
    ValueError: the state records no penalties (its ``penalties`` field was
      set to None).

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {'fc': jnp.zeros((3, 2)), 'b': jnp.zeros(2)}
    >>> rule = dl.penalty_rule(dense=dl.GroupLasso(axes=0))
    >>> state = dl.dessilbi(0.1, penalty=rule).init(params)
    >>> dl.get_penalty(state)
    PenaltyTable({'fc': GroupLasso(axes=(0,), lam=1.0, scale_by_size=False)})
  """
  table = _trees.core_state(opt_state).penalties
  if table is None:
    raise ValueError(
      'opt_state: its DessiLBIState records no penalties (penalties=None); '
      'pass the penalty rule its optimizer was built with instead.'
    )
  return table


def support(
  opt_state: optax.OptState,
  *,
  by_group: bool = False,
  penalty: Optional[PenaltyRule] = None,
) -> Any:
  """Where Γ is non-zero: the sparse structure selected so far.

  Args:
    opt_state: an optimizer state containing a
      :class:`~dessilbi_jax.DessiLBIState` (plain or Flax NNX).
    by_group: if False, one boolean per weight (``|Γ| > 0``: a NaN entry,
      which a non-finite gradient leaves, is not selected); if True, one per
      group: per output filter for a group-lasso leaf (shape ``(out,)`` for a
      HWIO conv kernel), per weight for a lasso leaf.
    penalty: leave it out: the groups are the penalties the state records
      (:func:`~dessilbi_jax.get_penalty`). A rule given must agree with them;
      it is used for a state that records none. Only used with
      ``by_group=True``.

  Returns:
    A pytree laid out like Γ: boolean arrays at coupled leaves, an empty node
    (``optax.MaskedNode()``, or ``()`` for NNX states) at uncoupled ones.

  Raises:
    ValueError: with ``by_group=True``, a ``penalty`` that disagrees with
      the penalties the state records; for a state that records none, with
      concrete arrays (not under ``jax.jit``), if Γ cannot have come from
      the rule: a filter partly in the support under a rule grouping by
      filter, or under a lasso an unselected weight with a larger ``|z|``
      than a selected one. The rule is then not the optimizer's.
    TypeError: ``by_group`` is not a bool.

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {'conv': jnp.ones((1, 1, 2, 3)), 'b': jnp.ones(3)}
    >>> state = dl.scale_by_dessilbi(1.0, nu=1.0).init(params)
    >>> state = state._replace(gamma={**state.gamma,
    ...     'conv': jnp.zeros((1, 1, 2, 3)).at[..., 1].set(0.5)})
    >>> dl.support(state, by_group=True)
    {'b': MaskedNode(), 'conv': Array([False,  True, False], dtype=bool)}
  """
  by_group = _checks.check_bool('by_group', by_group)
  core = _trees.core_state(opt_state)
  if not by_group:
    return _support(core.gamma, False, None)
  _trees.check_rule(penalty)
  _trees.grouped_penalties(core, penalty)  # checks the rule against Γ
  return _support(core.gamma, True, _trees.rule_of(core, penalty))


@functools.partial(jax.jit, static_argnames=('by_group', 'penalty'))
def _support(gamma, by_group, penalty):
  if not by_group:
    return jax.tree.map(in_support, gamma)
  penalties = _trees.penalties_by_name(gamma, penalty)
  return _trees.map_with_names(
    lambda names, g: _trees.group_any(in_support(g), penalties[names]),
    gamma,
  )


def w_star(
  params: optax.Params,
  opt_state: optax.OptState,
  *,
  channels: bool = False,
  spec: Optional[Spec] = None,
  penalty: Optional[PenaltyRule] = None,
) -> optax.Params:
  r"""W*: the weights masked by Γ's support (the sparse model on the path).

  .. math::
    W^* = W \odot \mathbb{1}[Γ \ne 0]

  Uncoupled leaves (biases, normalisation parameters) are returned unchanged,
  unless ``channels`` is set.

  Args:
    params: the weights W (a pytree, or a Flax NNX ``State``).
    opt_state: the optimizer state holding Γ.
    channels: also zero, for every output filter of a kernel that is out
      of Γ's support as a whole (none of its weights selected, whatever
      the kernel's groups: an unselected filter of a kernel grouped per
      output filter, a filter of a lasso kernel, or of a kernel grouped per
      (input, filter), with no selected weight), its bias and its norm
      layer's entries (scale and shift, and running mean and variance where
      the params hold them), so that the filter's output is exactly zero:
      the network :func:`~dessilbi_jax.slim` builds from
      ``support(opt_state, by_group=True)``. A filter here is a last-axis
      slice ``kernel[..., j]``; a bias (or norm leaf) with more axes before
      one entry per filter (``nnx.MultiHeadAttention``'s ``(heads,
      head_dim)``) loses entry ``j`` in all of them, where the kernel is
      grouped over every axis but the last (the default rule); under other
      groups it is refused.
    spec: with ``channels``, the model's spec (a ``Link`` per layer): only
      its layers lose filters, as in ``slim`` (so the classifier, which no
      spec lists, keeps its biases), and their norms are the spec's (by
      naming for a link that leaves its norm out; ``Link(norm=None)``:
      none, as in a pre-norm block, README). None:
      every coupled kernel, norms found by naming (``conv3`` → ``bn3``);
      under the default rule that includes the classifier, whose outputs
      with no selected weight then lose their bias too.
    penalty: leave it out: the groups are the penalties the state records
      (:func:`~dessilbi_jax.get_penalty`). A rule given must agree with them;
      it is used for a state that records none. Only used with
      ``channels``.

  Returns:
    A pytree laid out like the (pure) params. For Flax NNX, load it into a
    copy of the model: ``sparse = nnx.clone(model)``, then
    ``nnx.update(sparse, w_star(...))`` (which updates in place).

  Raises:
    TypeError: ``params`` is an ``nnx.Module`` (pass its state), a value
      of ``spec`` is not a :class:`~dessilbi_jax.Link`, or ``channels`` is
      not a bool.
    ValueError: the state holds no :class:`~dessilbi_jax.DessiLBIState`, or
      more than one; the params and the state do not belong to one model;
      with ``channels``, a ``spec`` or ``penalty`` that does not fit them,
      or a bias or norm leaf with more axes than one entry per filter for a
      kernel not grouped over every axis but the last (layers stacked for
      ``nnx.scan`` and grouped per layer and filter); without a ``spec``, a
      group-lasso leaf not named ``kernel`` beside a ``bias`` (a PyTorch or
      Equinox ``weight``: the filters' biases would be kept).

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {'w': jnp.array([[1.0, 2.0], [3.0, 4.0]])}
    >>> state = dl.scale_by_dessilbi(1.0).init(params)
    >>> state = state._replace(gamma={'w': jnp.array([[0.0, 1.0], [0.0, 0.0]])})
    >>> dl.w_star(params, state)['w']
    Array([[0., 2.],
           [0., 0.]], dtype=float32)
  """
  channels = _checks.check_bool('channels', channels)
  params = _trees.editable(params)
  core = _trees.core_state(opt_state)
  gamma = core.gamma
  out = _w_star(params, gamma)
  if not channels:
    return out
  if spec is not None:
    # A layer or norm misnamed: named, not skipped; norms left out, by naming.
    spec = check_spec(params, spec)
  table = _trees.leaves_by_name(out)
  gammas = _trees.leaves_by_name(gamma)
  masks = {}
  choices = _trees.grouped_penalties(core, penalty)  # checks the rule
  missed = [] if spec is not None else unread_biases(table, choices)
  if missed:
    raise ValueError(
      f'w_star(channels=True): {missed[0][0]!r} is coupled but is not a '
      "Flax kernel (a leaf named 'kernel', filters on its last axis), so "
      f'its bias {missed[0][1]!r} would be kept for filters out of the '
      'support; channels=True reads Flax layouts (README: "Other layouts"). '
      'Use channels=False for the weights alone.'
    )
  for names, choice in choices.items():
    g = gammas[names]
    if names[-1:] != ('kernel',) or g.ndim < 2:
      continue
    if spec is not None and _trees.join(names[:-1]) not in spec:
      continue  # slim leaves it whole: the classifier, a residual branch
    # A filter is out as a whole when none of its weights is selected,
    # whatever the groups (per filter, per weight, per input and filter).
    keep = jnp.any(in_support(g), axis=tuple(range(g.ndim - 1)))
    masks.update(
      channel_masks(
        table,
        names,
        keep,
        spec,
        out,
        whole_slices=_trees.is_output_grouped(choice, g.ndim),
      )
    )
  return _trees.map_with_names(
    lambda names, w: jnp.where(masks[names], w, 0) if names in masks else w,
    out,
  )


@jax.jit
def _w_star(params, gamma):
  gamma = _trees.leaves_by_name(gamma)
  seen = set()

  def mask(names, w):
    if names not in gamma:
      return w
    seen.add(names)
    g = gamma[names]
    _trees.check_same_shape(names, w, g, 'Γ')
    return jnp.where(in_support(g), w, jnp.zeros_like(w))

  out = _trees.map_with_names(mask, params)
  missing = [n for n in gamma if n not in seen]
  if missing:
    hint = _trees.nesting_hint(_trees.leaves_by_name(params), missing[0])
    raise ValueError(
      f'params: has no leaf {_trees.join(missing[0])!r}{hint}, which Γ '
      'holds; the params and the optimizer state do not belong to the same '
      'model.'
    )
  return out


def _coupled_pairs(params, opt_state):
  """(names, W, Γ) for every coupled leaf, checked for matching shapes."""
  gamma = _trees.leaves_by_name(_trees.core_state(opt_state).gamma)
  table = _trees.leaves_by_name(_trees.pure(params))
  out = []
  for names, g in gamma.items():
    w = _trees.lookup(table, names, 'Γ')
    _trees.check_same_shape(names, w, g, 'Γ')
    out.append((names, w, g))
  return out


def residue(
  params: optax.Params, opt_state: optax.OptState, nu: jax.typing.ArrayLike
) -> jax.Array:
  """The coupling residue ``Σ ‖W − Γ‖² / (2ν)`` over all coupled leaves.

  It measures how far the dense weights are from the sparse structure; it is
  the term that the coupled loss adds to the task loss.

  Args:
    params: the weights W.
    opt_state: the optimizer state holding Γ.
    nu: the coupling strength ν the optimizer uses (not stored in its state).

  Returns:
    A float scalar array (jit-compatible, no host synchronisation).

  Raises:
    ValueError: ν is concrete (not traced) and not a finite number > 0.
    TypeError: ν is not a real scalar (traced or not).

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {'w': jnp.array([[1.0, 2.0]])}
    >>> state = dl.scale_by_dessilbi(1.0).init(params)
    >>> print(dl.residue(params, state, nu=2.0))  # (1 + 4) / 4
    1.25
  """
  _checks.check_positive('nu', nu)
  pairs = [(w, g) for _, w, g in _coupled_pairs(params, opt_state)]
  return _residue(pairs, nu)


@jax.jit
def _residue(pairs, nu):
  total = jnp.zeros([], jnp.float32)
  for w, g in pairs:
    diff = (w - g).astype(jnp.promote_types(w.dtype, jnp.float32))
    total = total + jnp.sum(jnp.square(diff))
  return total / (2 * jnp.asarray(nu, total.dtype))


@dataclasses.dataclass(frozen=True)
class LayerSummary:
  """The state of one coupled leaf on the path.

  Attributes:
    name: the leaf's path, e.g. ``'conv1/kernel'``.
    shape: the leaf's shape.
    penalty: ``'group'`` or ``'elementwise'``.
    groups_selected: groups (filters; weights for an elementwise penalty)
      with Γ ≠ 0.
    groups_total: number of groups.
    weights_selected: entries with Γ ≠ 0 (positive and negative alike).
    weights_total: number of entries.
    residue: ``‖W − Γ‖² / (2ν)`` for this leaf; None when ν was not given.
    group_axes: the axes that index the groups (non-negative), e.g. ``(3,)``
      for a conv kernel's output filters; None for an elementwise penalty.
  """

  name: str
  shape: tuple[int, ...]
  penalty: str
  groups_selected: int
  groups_total: int
  weights_selected: int
  weights_total: int
  residue: Optional[float] = None
  group_axes: Optional[tuple[int, ...]] = None

  @property
  def group_kind(self) -> str:
    """What a group is, told by the leaf's rank where the groups run along
    its last axis: ``'filters'`` (rank 3 or more, a conv kernel's output
    channels), ``'neurons'`` (rank 2, a Dense kernel's outputs), else
    ``''``."""
    if len(self.shape) < 2 or self.group_axes != (len(self.shape) - 1,):
      return ''
    return 'filters' if len(self.shape) >= 3 else 'neurons'

  @property
  def group_fraction(self) -> float:
    return self.groups_selected / max(self.groups_total, 1)

  @property
  def weight_fraction(self) -> float:
    return self.weights_selected / max(self.weights_total, 1)


@dataclasses.dataclass(frozen=True)
class PathSummary:
  """A per-layer sparsity summary of the path; ``str()`` gives a table.

  Attributes:
    step: the optimizer's step count.
    layers: one :class:`LayerSummary` per coupled leaf, keyed by its name.
    params_total: number of parameters of the whole model.
    params_kept: parameters W* keeps: selected coupled weights plus every
      uncoupled parameter.
    density: ``params_kept / params_total``, the density of the whole model.
    residue: total residue ``Σ ‖W − Γ‖² / (2ν)``; None when ν was not given.
  """

  step: int
  layers: dict[str, LayerSummary]
  params_total: int
  params_kept: int
  density: float
  residue: Optional[float] = None

  def as_dict(self) -> dict[str, Any]:
    """Plain Python data (JSON-serialisable)."""
    out = dataclasses.asdict(self)
    for name, layer in self.layers.items():
      out['layers'][name]['shape'] = list(layer.shape)
      if layer.group_axes is not None:
        out['layers'][name]['group_axes'] = list(layer.group_axes)
      out['layers'][name]['group_kind'] = layer.group_kind
    return out

  def table(self) -> str:
    """A fixed-width table, one row per coupled leaf, totals at the end."""
    rows = [('layer', 'shape', 'groups', 'weights', 'residue')]

    def frac(a, b):
      return f'{a}/{b} ({a / max(b, 1):.1%})'

    def res(x):
      return '-' if x is None else f'{x:.4g}'

    for layer in self.layers.values():
      rows.append(
        (
          layer.name,
          'x'.join(str(s) for s in layer.shape),
          ' '.join(
            (frac(layer.groups_selected, layer.groups_total), layer.group_kind)
          ).rstrip(),
          frac(layer.weights_selected, layer.weights_total),
          res(layer.residue),
        )
      )
    sel = sum(v.weights_selected for v in self.layers.values())
    tot = sum(v.weights_total for v in self.layers.values())
    rows.append(('coupled', '', '', frac(sel, tot), res(self.residue)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [
      '  '.join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
      for r in rows
    ]
    lines.insert(1, '-' * len(lines[0]))
    lines.append(
      f'step {self.step}: density of the whole model {self.density:.1%} '
      f'({self.params_kept} of {self.params_total} parameters in W*)'
    )
    return '\n'.join(lines)

  def __str__(self) -> str:
    return self.table()


@functools.partial(jax.jit, static_argnames=('choices',))
def _layer_stats(arrays, choices):
  """Selected groups, selected weights and ‖W − Γ‖² of each coupled leaf."""
  out = []
  for (w, g), choice in zip(arrays, choices, strict=True):
    nz = in_support(g)
    diff = (w - g).astype(jnp.promote_types(w.dtype, jnp.float32))
    out.append(
      (
        jnp.sum(_trees.group_any(nz, choice)),
        jnp.sum(nz),
        jnp.sum(jnp.square(diff)),
      )
    )
  return out


def path_summary(
  params: optax.Params,
  opt_state: optax.OptState,
  *,
  nu: Optional[float] = None,
  penalty: Optional[PenaltyRule] = None,
) -> PathSummary:
  """Per-layer sparsity of the path: selected groups, weights, residue.

  Counts are computed on the device and fetched once (this function is for
  reporting, e.g. once per epoch).

  Args:
    params: the weights W (every parameter of the model counts towards the
      density, coupled or not).
    opt_state: the optimizer state holding Γ.
    nu: the coupling strength ν, for the residue; None to leave it out.
    penalty: leave it out: the groups are the penalties the state records
      (:func:`~dessilbi_jax.get_penalty`). A rule given must agree with them;
      it is used for a state that records none.

  Returns:
    A :class:`PathSummary`; ``print(summary)`` shows it as a table and
    ``summary.as_dict()`` gives plain data.

  Raises:
    ValueError: ``nu`` is given and not a finite number > 0.

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {'conv': {'kernel': jnp.ones((1, 1, 2, 4)), 'bias': jnp.ones(4)}}
    >>> state = dl.scale_by_dessilbi(1.0).init(params)
    >>> gamma = jnp.zeros((1, 1, 2, 4)).at[..., 0].set(1.0)
    >>> state = state._replace(gamma={'conv': {'kernel': gamma, 'bias': ()}})
    >>> s = dl.path_summary(params, state, nu=1.0)
    >>> s.layers['conv/kernel'].groups_selected, s.params_kept
    (1, 6)
  """
  if nu is not None:
    _checks.check_positive('nu', nu)
  core = _trees.core_state(opt_state)
  penalties = _trees.grouped_penalties(core, penalty)
  pairs = _coupled_pairs(params, opt_state)
  all_params = jax.tree.leaves(_trees.pure(params))
  params_total = int(sum(np.size(p) for p in all_params))

  got, count = jax.device_get(
    (
      _layer_stats(
        [(w, g) for _, w, g in pairs],
        tuple(penalties[names] for names, _, _ in pairs),
      ),
      core.count,
    )
  )
  layers = {}
  total_residue = 0.0
  for (names, w, _), (groups, weights, sq) in zip(pairs, got, strict=True):
    choice = penalties[names]
    axes = _trees.reduce_axes(choice, w.ndim)
    n_groups = int(np.prod([s for i, s in enumerate(w.shape) if i not in axes]))
    layer_res = None if nu is None else float(sq) / (2 * float(nu))
    if layer_res is not None:
      total_residue += layer_res
    name = _trees.join(names)
    layers[name] = LayerSummary(
      name=name,
      shape=tuple(int(s) for s in w.shape),
      penalty='group' if isinstance(choice, GroupLasso) else 'elementwise',
      groups_selected=int(groups),
      groups_total=n_groups,
      weights_selected=int(weights),
      weights_total=int(np.size(w)),
      residue=layer_res,
      group_axes=(
        choice.group_axes(w.ndim) if isinstance(choice, GroupLasso) else None
      ),
    )
  coupled_total = sum(v.weights_total for v in layers.values())
  coupled_kept = sum(v.weights_selected for v in layers.values())
  kept = params_total - coupled_total + coupled_kept
  return PathSummary(
    step=int(count),
    layers=layers,
    params_total=params_total,
    params_kept=kept,
    density=kept / max(params_total, 1),
    residue=None if nu is None else total_residue,
  )
