"""Pruning by the order of selection, with channel semantics."""

import functools
import math
import numbers
import warnings
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax import _trees
from dessilbi_jax.penalties import GroupLasso, PenaltyRule
from dessilbi_jax.selection import _rank_groups
from dessilbi_jax.topology import (
  Spec,
  channel_masks,
  check_spec,
  unread_biases,
)
from dessilbi_jax.transform import warn_pytorch_layout


def _check_fraction(fraction: float) -> float:
  if isinstance(fraction, (bool, np.bool_)) or not isinstance(
    fraction, numbers.Real
  ):
    raise TypeError(
      f'fraction must be a Python number in [0, 1], got {fraction!r}.'
    )
  if not 0 <= fraction <= 1:
    raise ValueError(f'fraction must lie in [0, 1], got {fraction}.')
  return float(fraction)


def _select_leaves(record: Any, layers: Optional[Sequence[str]]) -> Any:
  """The record restricted to ``layers`` (layer or leaf paths)."""
  record = _trees.pure(record)
  if layers is None:
    return record
  if isinstance(layers, str):
    layers = [layers]
  wanted = {_trees.split_name(name) for name in layers}
  found = set()

  def keep(names, r):
    for cand in (names, names[:-1]):
      if cand in wanted:
        found.add(cand)
        return r
    return None

  out = _trees.map_with_names(keep, record)
  missing = wanted - found
  if missing:
    name = _trees.join(sorted(missing)[0])
    raise ValueError(
      f'layers: {name!r} is not a recorded (coupled) leaf or layer; recorded '
      f'leaves: {sorted(_trees.join(n) for n in _trees.leaves_by_name(record))}.'
    )
  return out


def _zeroes_whole_outputs(choice: GroupLasso, shape, bias) -> bool:
  """Whether a group of a kernel holds whole outputs (all the weights of
  the entries its bias adds to), so that a pruned group leaves its outputs
  at their bias: per head, or per stacked layer and filter; not per input.

  The bias spans the kernel's last axes (``(heads, head_dim)`` of
  ``(in, heads, head_dim)``), or its first and last (layers stacked first);
  groups hold whole outputs if none of their axes is an input axis.
  """
  ndim, b = len(shape), tuple(np.shape(bias))
  if b and tuple(shape[-len(b) :]) == b:
    outputs = set(range(ndim - len(b), ndim))
  elif len(b) == 2 and (shape[0], shape[-1]) == b:
    outputs = {0, ndim - 1}
  else:
    return False
  return not set(choice.group_axes(ndim)) - outputs


def prune(
  params: optax.Params,
  record: Any,
  fraction: float,
  *,
  scope: str = 'layer',
  layers: Optional[Sequence[str]] = None,
  spec: Optional[Spec] = None,
  penalty: Optional[PenaltyRule] = None,
) -> tuple[optax.Params, Any]:
  """Zeroes the lowest-ranked groups (latest selected, then smallest norm).

  Groups are ranked by :func:`~dessilbi_jax.rank_groups`. With
  ``scope='layer'``, ``floor(fraction · n)`` of the ``n`` groups of each
  leaf are pruned; with ``scope='global'``, ``floor(fraction · N)`` of the
  ``N`` groups of all leaves together. Exactly that many groups are zeroed
  (ties are broken by norm, then by position). Globally, every group of a
  layer may go (no signal then passes it); prune per layer to keep a share
  of each.

  Channel semantics: when a group is an output filter (a group-lasso leaf
  grouped over its last axis), the filter's bias and the per-channel
  entries of the layer's normalisation (scale and shift, and running mean
  and variance where the params hold them; found by naming, e.g. ``conv3``
  -> ``bn3``, or given by ``spec``) are zeroed too, so
  the channel's output is exactly zero whatever the input and the running
  statistics. A kernel of higher rank grouped over every axis but the last
  (the default for ``nnx.MultiHeadAttention``'s query, key and value kernels
  ``(in, heads, head_dim)``, or layers stacked for ``nnx.scan``) loses
  ``kernel[..., j]`` as a whole, and its bias of shape ``(..., head_dim)``
  loses ``bias[..., j]`` in every head (or layer). A leaf pruned both ways (a
  bias or norm scale coupled to Γ itself) keeps an entry only where both
  keep it.

  Args:
    params: the weights W (a pytree, or a Flax NNX ``State``).
    record: the first-selection record (``optax.tree.get(opt_state,
      'first_step')`` with :func:`~dessilbi_jax.track_selection`, or
      :func:`~dessilbi_jax.update_selection`'s result).
    fraction: the share of groups to prune, in [0, 1].
    scope: ``'layer'`` or ``'global'``.
    layers: the layers (or leaf paths) to prune; None for every recorded leaf.
    spec: links naming each layer's norm layer, where naming does not
      tell or tells wrong (``Link(norm=None)``: none; README: pre-norm
      blocks).
    penalty: the rule that gives the groups: for a DessiLBI run
      ``dl.get_penalty(opt_state)``; None for the default rule.

  Returns:
    ``(pruned_params, masks)``: the params with pruned entries set to zero,
    and boolean masks laid out like the params (True where kept).

  Raises:
    TypeError: ``params`` is an ``nnx.Module`` (pass its state), or a leaf
      of the record is not an integer array (a boolean support mask or a
      float epoch record would be read as steps).
    ValueError: ``fraction`` outside [0, 1], ``scope`` neither ``'layer'``
      nor ``'global'``, ``layers`` naming a leaf or layer the record does not
      hold; the record holds a leaf the params lack, or its groups do not
      fit the params under ``penalty``; a ``spec`` that does not fit the
      params.

  Warns:
    UserWarning: a group-lasso leaf not named ``kernel`` sits beside a
      ``bias`` (a PyTorch or Equinox ``weight``), or a kernel beside a
      ``bias`` is grouped otherwise than by whole filters (per head, per
      stacked layer and filter): its groups are pruned, its bias is kept.
      With the default rule, a recorded rank >= 3 leaf is named ``weight``
      (as for :func:`~dessilbi_jax.magnitude_record`).

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {
    ...   'conv1': {'kernel': jnp.ones((1, 1, 1, 4)), 'bias': jnp.ones(4)},
    ...   'bn1': {'scale': jnp.ones(4), 'bias': jnp.ones(4)},
    ... }
    >>> record = {'conv1': {'kernel': jnp.array([3, 1, dl.NOT_SELECTED, 2])}}
    >>> pruned, masks = dl.prune(params, record, 0.5)
    >>> print(masks['conv1']['bias'], pruned['bn1']['scale'])
    [False  True False  True] [0. 1. 0. 1.]
  """
  fraction = _check_fraction(fraction)
  if scope not in ('layer', 'global'):
    raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
  params = _trees.editable(params)
  _trees.check_rule(penalty)
  record = _select_leaves(record, layers)  # pure
  _trees.check_record(record)
  if penalty is None:
    warn_pytorch_layout(_trees.recorded_ranks(params, record))
  choices = _trees.penalty_table(params, _trees.leaves_by_name(record), penalty)
  # Under a lasso, prune cuts weights, not channels, in any layout.
  table = _trees.leaves_by_name(params)
  grouped = {n: c for n, c in choices.items() if isinstance(c, GroupLasso)}
  partly = [
    (n, (*n[:-1], 'bias'))
    for n, c in grouped.items()
    if n[-1:] == ('kernel',)
    and (*n[:-1], 'bias') in table
    and not _trees.is_output_grouped(c, table[n].ndim)
    and _zeroes_whole_outputs(c, table[n].shape, table[(*n[:-1], 'bias')])
  ]
  if partly:
    warnings.warn(
      f'prune: {_trees.join(partly[0][0])!r} is grouped by '
      f'{grouped[partly[0][0]].group_axes(table[partly[0][0]].ndim)}, not by '
      'whole filters (every axis but the last): its groups are zeroed, but '
      f'its bias {_trees.join(partly[0][1])!r} and norm are kept, so a '
      'pruned group still outputs them (zero them with the mask, or leave '
      'the layer out with layers=).',
      stacklevel=2,
    )
  missed = unread_biases(table, grouped)
  if missed:
    warnings.warn(
      f'prune: {missed[0][0]!r} is grouped but is not a Flax kernel (a leaf '
      "named 'kernel', filters on its last axis): its groups are zeroed, "
      f'but its bias {missed[0][1]!r} is kept, so a pruned filter still '
      'outputs its bias (README: "Other layouts" zeroes it with the '
      "weights' mask).",
      stacklevel=2,
    )
  # How many groups each leaf loses, counted here in Python's float64 so
  # that floor(0.7 · 10) is 7, and passed as data: one compiled program
  # serves every fraction.
  total = sum(r.size for r in jax.tree.leaves(record))
  cuts = _trees.map_with_names(
    lambda names, r: jnp.int32(
      math.floor(fraction * (total if scope == 'global' else r.size) + 1e-9)
    ),
    record,
  )
  if spec is not None:
    # Named errors, before the spec is hashed; norms left out, by naming.
    spec = check_spec(params, spec)
  spec_items = None if spec is None else tuple(sorted(dict(spec).items()))
  return _prune(
    params, record, cuts, scope=scope, spec_items=spec_items, penalty=penalty
  )


@functools.partial(jax.jit, static_argnames=('scope', 'spec_items', 'penalty'))
def _prune(params, record, cuts, *, scope, spec_items, penalty):
  spec = None if spec_items is None else dict(spec_items)
  ranks = _trees.leaves_by_name(
    _rank_groups(params, record, scope=scope, penalty=penalty)
  )
  cuts = _trees.leaves_by_name(cuts)
  table = _trees.leaves_by_name(params)
  choices = _trees.penalty_table(params, ranks, penalty)
  total = sum(r.size for r in ranks.values())
  masks: dict[_trees.Names, jax.Array] = {}
  for names, r in ranks.items():
    n = total if scope == 'global' else r.size
    keep = r < n - cuts[names]
    w = table[names]
    choice = _trees.penalty_at(names, choices)
    own = jnp.broadcast_to(_trees.expand_groups(keep, choice, w.ndim), w.shape)
    found = {names: own}
    if names[-1:] == ('kernel',) and _trees.is_output_grouped(choice, w.ndim):
      # Groups are whole last-axis slices: a companion of shape (..., width)
      # (attention's (heads, head_dim) bias) loses entry j in every head.
      found.update(
        channel_masks(table, names, keep, spec, params, whole_slices=True)
      )
    # A coupled bias or norm scale is pruned as a leaf of its own and with
    # its layer's filters: it keeps an entry only where both keep it.
    for other, m in found.items():
      masks[other] = masks[other] & m if other in masks else m

  def mask_of(names, w):
    return _trees.sharded_like(masks.get(names, jnp.ones(w.shape, bool)), w)

  mask_tree = _trees.map_with_names(mask_of, params)
  pruned = jax.tree.map(
    lambda w, m: jnp.where(m, w, jnp.zeros_like(w)), params, mask_tree
  )
  return pruned, mask_tree
