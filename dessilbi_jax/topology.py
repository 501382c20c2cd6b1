"""How the layers of a model connect, for channel-level surgery.

Pruning, re-initialising, widening and slimming act on *output channels* of a
layer (the filters of a conv, the neurons of a Dense layer: the last axis of a
Flax kernel). A channel lives on beyond its kernel: in the layer's bias, in
the normalisation layer that follows it (scale, bias, running mean and
variance) and in the input channels of every layer that reads it. A
:class:`Link` states these connections for one layer, by layer path (the
``'/'``-joined keys above the ``kernel`` leaf, e.g. ``'conv1'`` or
``'block1/conv2'``); a *spec* maps layer paths to links.

The spec is explicit on purpose: which layer reads which is a property of the
forward pass, not of the parameters. :func:`chain_spec` builds it for
sequential chains (LeNet, VGG) with defaults by naming; residual blocks list
their links by hand, and layers whose outputs meet a residual addition are
simply left out (their channels cannot be removed alone).
"""

import dataclasses
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from types import NoneType
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax import _trees


class _ByNaming:
  """The norm of a :class:`Link` that does not state one: found by naming
  (:func:`default_norm`) when the spec is checked."""

  def __repr__(self) -> str:
    return 'BY_NAMING'

  def __reduce__(self):
    return 'BY_NAMING'


BY_NAMING: Any = _ByNaming()


@dataclasses.dataclass(frozen=True)
class Link:
  """Where the output channels of one layer go.

  Attributes:
    norm: the path of the normalisation layer applied to this layer's output
      (its per-channel leaves follow the channels); None for none, stated:
      a norm that naming would pair with the layer is then left alone (a
      pre-norm block's ``norm2`` before its ``fc1``, which naming pairs
      with ``fc2``). Left out, it is found by naming when the spec is
      checked (:func:`default_norm`: ``conv3`` -> ``bn3``), as for a layer
      the spec does not list.
    consumers: the paths of the layers that read these channels as their
      inputs: a conv reads them on its kernel's axis -2; a Dense layer on its
      kernel's rows, either directly or as a feature map flattened
      channels-last (``x.reshape(n, -1)`` of an NHWC array), so its kernel has
      ``spatial × channels`` rows. Empty: the channels go where no consumer
      can follow (a residual addition, the model's output); such a link only
      names the layer's norm (for ``prune`` and ``w_star``), and ``slim`` and
      ``widen`` refuse to change the layer's width.
  """

  norm: Optional[str] = BY_NAMING
  consumers: tuple[str, ...] = ()

  def __post_init__(self):
    if self.norm is not BY_NAMING and not isinstance(
      self.norm, (str, NoneType)
    ):
      raise TypeError(
        f'norm: expected the path of a norm layer as a str (e.g. "bn1"), '
        f'or None for none; got {type(self.norm).__name__} {self.norm!r}.'
      )
    consumers = self.consumers
    if isinstance(consumers, str):
      consumers = (consumers,)
    try:
      consumers = tuple(consumers)
    except TypeError:
      consumers = None
    if consumers is None or not all(isinstance(c, str) for c in consumers):
      raise TypeError(
        'consumers: expected a layer path (str) or a sequence of them, () '
        f'for none; got {type(self.consumers).__name__} {self.consumers!r}.'
      )
    object.__setattr__(self, 'consumers', consumers)


Spec = Mapping[str, Link]


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', name)]


def kernel_layers(params: optax.Params) -> list[str]:
  """Paths of the layers holding a ``kernel`` leaf, in natural order.

  Natural order sorts digits by value (``conv2`` before ``conv10``).
  """
  names = [
    _trees.join(n[:-1])
    for n in _trees.leaves_by_name(_trees.pure(params))
    if n and n[-1] == 'kernel'
  ]
  return sorted(names, key=_natural_key)


_KIND = re.compile(r'(conv|fc|dense|linear)(?!.*(conv|fc|dense|linear))')
_NORM_WORDS = ('bn', 'norm', 'batchnorm', 'batch_norm')


def _norm_candidates(parts: _trees.Names) -> list[_trees.Names]:
  """Norm layer names for a layer by naming: ``conv3`` -> ``bn3``, ...;
  ``shortcut`` -> ``shortcut_bn``, ``shortcut_norm``."""
  last = parts[-1]
  out = []
  m = _KIND.search(last)
  if m:
    for repl in _NORM_WORDS:
      out.append((*parts[:-1], last[: m.start()] + repl + last[m.end() :]))
  out += [(*parts[:-1], f'{last}_{word}') for word in ('bn', 'norm')]
  return out


def _shapes_by_layer(table: dict) -> dict[_trees.Names, list[tuple]]:
  """The shapes of each layer's leaves (a layer: a leaf's path less its
  last name)."""
  out: dict[_trees.Names, list[tuple]] = {}
  for n, v in table.items():
    out.setdefault(n[:-1], []).append(tuple(v.shape))
  return out


def _norm_of(layers: dict, parts: _trees.Names, width: int):
  """The first naming candidate with per-channel leaves of ``width``."""
  for cand in _norm_candidates(parts):
    shapes = layers.get(cand)
    if shapes and all(shape == (width,) for shape in shapes):
      return cand
  return None


def default_norm(
  params: optax.Params,
  layer: str,
  settled: Sequence[str] = (),
  claimed: Sequence[str] = (),
) -> Optional[str]:
  """The norm layer of ``layer`` by naming: ``conv3`` -> ``bn3``/``norm3``.

  Naming assumes that a norm follows its layer. In pre-norm blocks it does
  not (a transformer's ``norm2`` before ``fc1``, paired with ``fc2`` by
  name; a pre-activation ResNet's ``bn2`` before ``conv2``): state
  ``Link(norm=None)`` for such layers in a spec.

  The last ``conv``/``fc``/``dense``/``linear`` in the layer's path is
  replaced by ``bn``, ``norm``, ``batchnorm`` or ``batch_norm``, then
  ``<layer>_bn`` and ``<layer>_norm`` are tried (``shortcut`` ->
  ``shortcut_bn``); the first candidate that exists in ``params`` with
  per-channel leaves of the layer's width wins. Where none exists, a layer
  beside it that could be its norm (per-channel leaves of its width, no
  kernel, not the norm of another layer) is not guessed either: it is an
  error (below), so that a norm named otherwise (``bn_conv1``) is not
  silently left out of pruning and slimming.

  Args:
    params: the model's params.
    layer: the layer's path.
    settled: layers whose norm is given elsewhere (a spec, ``norms=``):
      they compete for no naming candidate.
    claimed: norm layers given to other layers (a spec, ``norms=``): they
      are no candidate.

  Raises:
    TypeError: ``layer`` is not a str.
    ValueError: ``layer`` has no kernel in the params (a misspelt path is named,
      not read as a layer without norm). Naming cannot tell: the candidate found
      is also the candidate of another layer of the same width (``conv1`` and
      ``fc1`` both name ``bn1``); or no candidate exists and a layer beside it
      of per-channel leaves of its width, not claimed by another layer, does
      (``bn_conv1`` beside ``conv1``). For a layer numbered by position (Flax
      Linen's automatic ``Conv_0``, the items ``layers_0`` of a Linen list or
      ``nn.Sequential``, the items ``layers/0`` of an NNX list or
      ``nnx.Sequential``: numbers do not pair a layer with its norm), the layers
      beside it are its numbered siblings. Pass a spec (:func:`chain_spec` with
      ``norms=``; None for no norm) then.
  """
  if not isinstance(layer, str):
    raise TypeError(
      f'layer: expected a layer path as a str (e.g. "conv1"), got '
      f'{type(layer).__name__} {layer!r}.'
    )
  table = _trees.leaves_by_name(_trees.pure(params))
  return _named_norm(table, layer, settled, claimed)


def _named_norm(
  table: dict, layer: str, settled: Sequence[str], claimed: Sequence[str]
) -> Optional[str]:
  """:func:`default_norm` on leaves keyed by name."""
  parts = _trees.split_name(layer)
  width = _kernel(table, layer).shape[-1]
  layers = _shapes_by_layer(table)
  taken = {_trees.split_name(name) for name in claimed}
  found = _norm_of(layers, parts, width)
  if found in taken:
    found = None
  elsewhere = {_trees.split_name(name) for name in settled}
  if found is not None:
    rivals = [
      _trees.join(n[:-1])
      for n, v in table.items()
      if n[-1] == 'kernel'
      and n[:-1] != parts
      and n[:-1] not in elsewhere
      and v.ndim >= 2
      and _norm_of(layers, n[:-1], v.shape[-1]) == found
    ]
    if rivals:
      raise ValueError(
        f'naming cannot tell the norm layer of {layer!r}: '
        f'{_trees.join(found)!r} is the naming candidate of {rivals[0]!r} '
        f'too; give the norm of {layer!r} or of {rivals[0]!r} explicitly '
        '(chain_spec(..., norms={...}), or a Link in the spec; '
        'Link(norm=..., consumers=()) for a layer whose width must stay).'
      )
    return _trees.join(found)
  numbered = _positional_siblings(parts)
  beside = numbered or _siblings(parts)
  # Norms that naming gives other layers are theirs.
  taken |= {
    _norm_of(layers, n[:-1], v.shape[-1])
    for n, v in table.items()
    if n[-1] == 'kernel' and n[:-1] != parts and v.ndim >= 1
  }
  norms = sorted(
    _trees.join(n)
    for n, shapes in layers.items()
    if n
    and beside(n)
    and n not in taken
    and (*n, 'kernel') not in table
    and all(shape == (width,) for shape in shapes)
  )
  if not norms:
    return None
  has = f'{", ".join(norms)} {"has" if len(norms) == 1 else "have"} its width'
  if numbered is not None:
    why = (
      f'its name numbers it by position ({has}, and numbers do not pair a '
      'layer with its norm); name the modules, or give'
    )
  else:
    tried = ', '.join(_trees.join(c) for c in _norm_candidates(parts))
    why = f'no layer is named as its norm ({tried}), but {has} beside it; give'
  raise ValueError(
    f'naming cannot tell the norm layer of {layer!r}: {why} the norm of '
    f'{layer!r} explicitly (chain_spec(..., norms={{...}}), or a Link in the '
    'spec; None for no norm; Link(norm=..., consumers=()) for a layer whose '
    'width must stay).'
  )


def _siblings(parts: _trees.Names):
  """A test of the layers beside a layer: those of the same parent."""
  return lambda n: n[:-1] == parts[:-1]


_LINEN_ITEM = re.compile(r'\w+_\d+')  # Conv_0, BatchNorm_1, layers_2


def _positional_siblings(parts: _trees.Names):
  """For a layer numbered by position, a test of the layers numbered
  beside it (where its norm may be); None for a layer named otherwise.

  An item of an NNX list (``layers/0``): items of the same or a parallel
  list (``layers/1``, ``norms/0``). A Linen module named by a number
  (``Conv_0``, ``layers_0``): its numbered siblings (``BatchNorm_0``,
  ``layers_1``).
  """
  if parts[-1].isdigit():
    return lambda n: n[:-2] == parts[:-2] and n[-1].isdigit()
  if _LINEN_ITEM.fullmatch(parts[-1]):
    return lambda n: n[:-1] == parts[:-1] and bool(_LINEN_ITEM.fullmatch(n[-1]))
  return None


def chain_spec(
  params: optax.Params,
  layers: Optional[Sequence[str]] = None,
  norms: Optional[Mapping[str, Optional[str]]] = None,
) -> dict[str, Link]:
  """The spec of a sequential chain: each layer feeds the next one.

  Args:
    params: the model's params (a pytree or a Flax NNX state).
    layers: the layer paths in forward order; None for every layer with a
      ``kernel`` leaf in natural order (right for names like ``conv1``,
      ``conv2``, ``fc1``, ``fc2`` only if convs come first alphabetically;
      give the order when in doubt).
    norms: the norm layer of each layer; missing entries are found by naming
      (:func:`default_norm`), None means no norm (a norm naming would pair
      with the layer is left alone). A norm given for the last layer is kept
      in a link of its own, without consumers.

  Returns:
    A dict ``{layer: Link(norm, (next_layer,))}`` for every layer but the
    last (the last layer's outputs are the model's outputs). Where
    ``norms`` gives the last layer a norm (not None), the last layer has a
    link too, ``Link(norm, ())``: :func:`~dessilbi_jax.prune` and
    :func:`~dessilbi_jax.w_star` use that norm (``w_star(channels=True)``
    then zeroes its filters out of the support, with their bias and norm,
    as for any layer of the spec), and :func:`~dessilbi_jax.slim` keeps its
    width (it refuses a mask dropping any of its filters).

  Raises:
    TypeError: ``layers`` is a single string, not a sequence, or holds a
      path that is not a str; ``norms`` is not a mapping, or has a key that
      is not a str or a value that is neither a str nor None.
    ValueError: a layer has no kernel, ``norms`` names a layer that is not in
      the chain, a layer of width 0 feeds the next one, or the widths of
      consecutive layers do not fit (the message names both layers).

  Example:
    >>> import jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> params = {
    ...   'conv1': {'kernel': jnp.zeros((3, 3, 1, 4)), 'bias': jnp.zeros(4)},
    ...   'bn1': {'scale': jnp.ones(4), 'bias': jnp.zeros(4)},
    ...   'conv2': {'kernel': jnp.zeros((3, 3, 4, 8))},
    ...   'fc': {'kernel': jnp.zeros((8 * 4, 10))},
    ... }
    >>> spec = dl.chain_spec(params, ['conv1', 'conv2', 'fc'])
    >>> spec['conv1']
    Link(norm='bn1', consumers=('conv2',))
    >>> spec['conv2']
    Link(norm=None, consumers=('fc',))
  """
  if isinstance(layers, str):
    raise TypeError(
      f'layers must be a sequence of layer paths in forward order, got the '
      f'string {layers!r}.'
    )
  if layers is not None and (
    isinstance(layers, Mapping) or not isinstance(layers, Iterable)
  ):
    raise TypeError(
      'layers: expected a sequence of layer paths (str) in forward order, '
      f'got {type(layers).__name__} {layers!r}.'
    )
  order = list(kernel_layers(params) if layers is None else layers)
  if layers is not None:
    for i, layer in enumerate(order):
      if not isinstance(layer, str):
        raise TypeError(
          'layers: expected a sequence of layer paths (str) in forward '
          f'order, got {type(layer).__name__} {layer!r} at position {i}.'
        )
  if norms is not None and not isinstance(norms, Mapping):
    raise TypeError(
      'norms: expected a dict {layer: norm layer path or None} (e.g. '
      f'{{"conv1": "bn1"}}), got {type(norms).__name__}.'
    )
  norms = dict(norms or {})
  for layer, norm in norms.items():
    if not isinstance(layer, str):
      raise TypeError(
        'norms: expected layer paths (str) as keys, got '
        f'{type(layer).__name__} {layer!r}.'
      )
    if norm is not None and not isinstance(norm, str):
      raise TypeError(
        f'norms[{layer!r}]: expected the path of a norm layer as a str (e.g. '
        f'"bn1"), or None for no norm; got {type(norm).__name__} {norm!r}.'
      )
  table = _trees.leaves_by_name(_trees.pure(params))
  for layer in order:  # each one, also the last (it feeds no link)
    producer_width(table, layer)
  unknown = sorted(set(norms) - set(order))
  if unknown:
    raise ValueError(
      f'norms: {unknown[0]!r} is not a layer of the chain; the layers are '
      f'{order}.'
    )
  spec = {}
  given = tuple(n for n in norms.values() if n is not None)
  for producer, consumer in itertools.pairwise(order):
    norm = (
      norms[producer]
      if producer in norms
      else default_norm(params, producer, settled=tuple(norms), claimed=given)
    )
    spec[producer] = Link(norm=norm, consumers=(consumer,))
  if order and norms.get(order[-1]) is not None:
    # The last layer feeds no layer of the chain: a link for its norm only
    # (without a norm it stays out, as a classifier does: w_star keeps its
    # biases).
    spec[order[-1]] = Link(norm=norms[order[-1]], consumers=())
  check_spec(params, spec)
  return spec


def check_spec(params: optax.Params, spec: Spec) -> dict[str, Link]:
  """Checks that a spec fits the params; errors name the layer.

  Returns:
    The spec as a dict, each norm a link leaves out found by naming
    (:func:`default_norm`, with the norms the other links state taken).

  Raises:
    TypeError: ``spec`` is not a mapping, a key of it is not a str, or a
      value of it is not a :class:`Link`.
    ValueError: a layer has no kernel or has width 0 and consumers, a norm layer
      has no per-channel leaves of the producer's width or is the norm of two
      layers, a consumer's input width does not fit the producer's channels,
      or naming cannot tell the norm of a link that leaves it out (as
      :func:`default_norm` raises).
  """
  return check_spec_table(_trees.leaves_by_name(_trees.pure(params)), spec)


def _resolved(table: dict, spec: Spec) -> dict[str, Link]:
  """The spec, each norm a link leaves out found by naming."""
  stated = [layer for layer, link in spec.items() if link.norm is not BY_NAMING]
  claimed = [link.norm for link in spec.values() if isinstance(link.norm, str)]
  return {
    layer: link
    if link.norm is not BY_NAMING
    else dataclasses.replace(
      link, norm=_named_norm(table, layer, stated, claimed)
    )
    for layer, link in spec.items()
  }


def check_spec_table(table: dict, spec: Spec) -> dict[str, Link]:
  """:func:`check_spec` on leaves keyed by name."""
  if not isinstance(spec, Mapping):
    raise TypeError(
      'spec: expected a dict {layer: Link} (e.g. chain_spec(params, ...)), '
      f'got {type(spec).__name__}.'
    )
  for layer in spec:
    if not isinstance(layer, str):
      raise TypeError(
        'spec: expected layer paths (str, e.g. "conv1") as keys, got '
        f'{type(layer).__name__} {layer!r}.'
      )
  owners: dict[str, str] = {}
  for layer, link in spec.items():
    if not isinstance(link, Link):
      raise TypeError(
        f'spec[{layer!r}] must be a dessilbi_jax.Link, got {link!r}.'
      )
    producer_width(table, layer)  # a layer without kernel: named first
  spec = _resolved(table, spec)
  for layer, link in spec.items():
    width = producer_width(table, layer)
    if link.norm is not None:
      if link.norm in owners:
        raise ValueError(
          f'spec[{layer!r}]: norm layer {link.norm!r} is also the norm of '
          f'{owners[link.norm]!r}; a norm layer normalises one layer.'
        )
      owners[link.norm] = layer
      norm = _trees.split_name(link.norm)
      leaves = {n: v for n, v in table.items() if n[:-1] == norm}
      if not leaves:
        raise ValueError(
          f'spec[{layer!r}]: norm layer {link.norm!r} has no leaves in the '
          'params.'
        )
      for n, v in leaves.items():
        if tuple(v.shape) != (width,):
          raise ValueError(
            f'spec[{layer!r}]: norm leaf {_trees.join(n)!r} has shape '
            f'{tuple(v.shape)}, but layer {layer!r} has {width} output '
            'channels.'
          )
    for consumer in link.consumers:
      consumer_repeat(table, layer, consumer, width)
  return spec


def _kernel(table: dict, layer: str):
  """The kernel leaf of ``layer``; an error naming it where there is none."""
  kernel = table.get((*_trees.split_name(layer), 'kernel'))
  if kernel is None:
    raise ValueError(
      f'layer {layer!r} has no kernel in the params (expected a leaf '
      f'{layer + "/kernel"!r}: the channel tools read Flax layouts, a '
      "leaf 'kernel' with its filters on the last axis; README: \"Other "
      'layouts").'
    )
  return kernel


def producer_width(table: dict, layer: str) -> int:
  """Output channels of ``layer`` (last axis of its kernel)."""
  kernel = _kernel(table, layer)
  if kernel.ndim < 2:
    raise ValueError(
      f'layer {layer!r}: its kernel has rank {kernel.ndim}; expected a conv '
      '(HWIO) or Dense ((in, out)) kernel.'
    )
  return int(kernel.shape[-1])


def consumer_repeat(table: dict, layer: str, consumer: str, width: int) -> int:
  """How many input positions per channel ``consumer`` reads (1 for a conv).

  Raises:
    ValueError: ``layer`` has width 0 (no channel to read), or the
      consumer's input width does not fit ``width`` channels.
  """
  if width == 0:
    raise ValueError(
      f'spec[{layer!r}]: layer {layer!r} has width 0 (its kernel has 0 '
      f'output channels), so consumer {consumer!r} reads no channel of it; '
      'a layer that feeds others needs at least one output channel.'
    )
  kernel = table.get((*_trees.split_name(consumer), 'kernel'))
  if kernel is None:
    raise ValueError(
      f'spec[{layer!r}]: consumer {consumer!r} has no kernel in the params '
      f'(expected a leaf {consumer + "/kernel"!r}).'
    )
  fan_in = int(kernel.shape[-2])
  if kernel.ndim >= 3:
    if fan_in != width:
      raise ValueError(
        f'spec[{layer!r}]: consumer {consumer!r} has {fan_in} input '
        f'channels, but layer {layer!r} has {width} output channels (grouped '
        'or depthwise convolutions are not supported).'
      )
    return 1
  if fan_in % width:
    raise ValueError(
      f'spec[{layer!r}]: consumer {consumer!r} has {fan_in} inputs, not a '
      f'multiple of the {width} output channels of layer {layer!r}.'
    )
  return fan_in // width


def link_of(spec: Optional[Spec], params: Any, layer: str) -> Link:
  """The link of ``layer``: from the spec (as :func:`check_spec` returns
  it, its norms resolved), else its norm by naming only."""
  if spec is not None and layer in spec:
    return spec[layer]
  spec = spec or {}
  claimed = tuple(link.norm for link in spec.values() if link.norm is not None)
  return Link(
    norm=default_norm(params, layer, settled=tuple(spec), claimed=claimed)
  )


def _companion_mask(
  table, name, keep, kernel, whole_slices: bool
) -> Optional[jax.Array]:
  """The mask of a bias or norm leaf that goes with a kernel's filters.

  ``keep`` itself where the leaf has one entry per filter; where it has more
  axes before one entry per filter (attention's ``(heads, head_dim)`` bias,
  layers stacked for ``nnx.scan``/``nnx.vmap``), ``keep`` broadcast along
  them if the kernel's groups are whole last-axis slices (a dropped filter
  ``j`` then zeroes every output ``(..., j)``); else this raises, since a
  mask of one entry per filter would silently miss the filters dropped in
  one head or layer only. None for any other leaf (or none at all).
  """
  if name not in table:
    return None
  shape = tuple(np.shape(table[name]))
  if shape == tuple(np.shape(keep)):
    return keep
  if len(shape) <= 1 or shape[-1] != np.shape(keep)[-1]:
    return None
  if whole_slices:
    return jnp.broadcast_to(keep, shape)
  raise ValueError(
    f'layer {_trees.join(kernel[:-1])!r}: {_trees.join(name)!r} has shape '
    f'{shape}, one entry per filter along its last axis and more axes '
    '(layers stacked for nnx.scan or nnx.vmap?), while the kernel is not '
    'grouped by whole filters (every axis but the last): zeroing filters '
    'with their bias and norm needs a filter to be out in all of them. Read '
    'Γ without channels (w_star(channels=False), support) for such layers, '
    'or leave them out of prune with its layers= argument.'
  )


def unread_biases(table: dict, choices: dict) -> list[tuple[str, str]]:
  """Coupled leaves with filters whose bias the channel tools miss.

  Those tools read Flax layouts: a layer's filters are the last axis of its
  leaf ``kernel``. A coupled leaf of rank 2 or more by another name beside a
  ``bias`` (``weight``, as PyTorch and Equinox name it, filters first) is
  most likely a layer whose filters' biases they would leave as they are.

  Args:
    table: the params' leaves by name.
    choices: the penalty of each coupled leaf, by name.

  Returns:
    ``(leaf, bias)`` path strings of each such leaf.
  """
  out = []
  for names, choice in choices.items():
    bias = (*names[:-1], 'bias')
    if (
      choice is not None
      and names[-1:] not in (('kernel',), ('bias',))
      and bias in table
      and len(getattr(table.get(names), 'shape', ())) >= 2
    ):
      out.append((_trees.join(names), _trees.join(bias)))
  return out


def channel_masks(
  table: dict,
  kernel: _trees.Names,
  keep: Any,
  spec: Optional[Spec],
  params,
  *,
  whole_slices: bool = False,
) -> dict:
  """Masks of the leaves that go with a kernel's output filters.

  The layer's bias and its norm layer's per-channel parameters (scale,
  shift), when their shape is one entry per filter: zeroing a filter together
  with them makes its output exactly zero. With ``whole_slices``, so are
  those whose last axis has one entry per filter after more axes (the
  ``(heads, head_dim)`` bias of ``nnx.MultiHeadAttention``'s query, key and
  value; layers stacked for ``nnx.scan``): they get ``keep`` broadcast to
  their shape.

  Args:
    table: the params' leaves by name.
    kernel: the name of the kernel leaf (``(..., 'kernel')``).
    keep: one boolean per output filter (per last-axis index of the kernel).
    spec: the model's spec, or None to find the norm layer by naming.
    params: the params (for naming rules).
    whole_slices: the kernel's groups are whole last-axis slices (a group
      lasso over every axis but the last), so that ``keep[j]`` False means
      ``kernel[..., j]`` is zero as a whole.

  Returns:
    ``{leaf name: mask}`` for the bias and norm leaves found, each mask of
    the leaf's shape.

  Raises:
    ValueError: a bias or norm leaf has one entry per filter along its last
      axis and more axes, and not ``whole_slices``; the norm has no scale
      (or running mean) among the leaves found.
  """
  masks = {}
  bias = (*kernel[:-1], 'bias')
  mask = _companion_mask(table, bias, keep, kernel, whole_slices)
  if mask is not None:
    masks[bias] = mask
  norm = link_of(spec, params, _trees.join(kernel[:-1])).norm
  if norm is not None:
    norm_names = _trees.split_name(norm)
    found = {}
    for other in [other for other in table if other[:-1] == norm_names]:
      mask = _companion_mask(table, other, keep, kernel, whole_slices)
      if mask is not None:
        found[other] = mask
    # With a scale of 0 the norm outputs its shift; without one it outputs
    # shift - mean/σ, zero only if its running mean is zeroed with it.
    if not {'scale', 'mean'} & {other[-1] for other in found}:
      raise ValueError(
        f'the norm {norm!r} of layer {_trees.join(kernel[:-1])!r} has no '
        'scale: zeroing its shift cannot make a filter output zero while its '
        'running mean is kept elsewhere; pass the params together with the '
        "norm's statistics (in Flax NNX, nnx.state(model); in Linen, the "
        "params with the norm's mean and var from variables['batch_stats'] "
        'added to its entry), or give the norm a scale.'
      )
    masks.update(found)
  return masks
