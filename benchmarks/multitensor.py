"""A multi-tensor Pallas (Triton) DessiLBI update, for measurement.

On a GPU, the update of a many-leaf model is dominated by per-kernel costs
(each leaf is at least one kernel, and XLA adds a filter-norm reduction and a
Γ pass per conv kernel). This prototype runs the whole update of
:func:`dessilbi_jax.dessilbi` (weight decay, momentum and the DessiLBI core)
for *all* leaves in a single ``pallas_call``:

- uncoupled and elementwise (lasso) leaves: one program per block of 2048
  elements, flat;
- group-lasso leaves (conv kernels, groups along the last axis): one program
  per tile of 16 filters, looping over the rows twice: the first loop updates
  momentum, W's update and z and accumulates the filters' squared norms, the
  second writes ``Γ = z · κ·max(0, 1 - λ/‖z_g‖)`` (or, with
  ``store_gamma=False``, the program writes the per-filter scale and there is
  no second loop).

Programs are numbered longest first (the big conv kernels' tiles), so that
the GPU does not start them last and finish on a few of them alone.

Its state is exactly that of ``dessilbi`` (same tree, same values up to float
rounding), so it is a drop-in for timing. With ``apply=True`` the kernel
writes the new params instead of the updates (a :class:`FusedStep`, outside
Optax's update/apply split), which is what one kernel moving the update's
bytes once would do. It lives in ``benchmarks/`` until a
GPU measurement says whether it belongs in the library; on the CPU it runs in
Pallas interpret mode (for the equality tests), and on a GPU with Triton.
Supported: a constant learning rate, momentum without Nesterov, weight decay
on the leaves of rank >= 2, the default penalty rule (or any rule whose group
lassos reduce over all axes but the last).
"""

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

import dessilbi_jax as dl
from dessilbi_jax.shrinkage import group_threshold


class FusedStep(NamedTuple):
  """An optimizer that applies its own updates: ``init(params) -> state`` and
  ``step(grads, state, params) -> (new_params, new_state)``."""

  init: Callable[[Any], Any]
  step: Callable[[Any, Any, Any], tuple[Any, Any]]


def _pow2(n: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class _Leaf:
  """Static layout of one leaf in the kernel: kind, shape, programs."""

  def __init__(self, kind, shape, lam, decayed, block, tile_cols):
    self.kind = kind  # 'plain' | 'lasso' | 'group'
    self.shape = tuple(shape)
    self.lam = lam
    self.decayed = decayed
    self.start = 0  # the first program's id, set by the layout
    if kind == 'group':
      self.rows = math.prod(shape[:-1])
      self.cols = shape[-1]
      self.tile = min(tile_cols, _pow2(self.cols))
      self.programs = -(-self.cols // self.tile)
      self.work = self.rows * self.tile  # elements per program
    else:
      self.size = math.prod(shape)
      self.programs = max(1, -(-self.size // block))
      self.work = min(self.size, block)


def dessilbi_multitensor(
  learning_rate: float,
  kappa: float = 1.0,
  nu: float = 100.0,
  momentum: float = 0.9,
  weight_decay: float = 0.0,
  penalty=None,
  store_gamma: bool = True,
  apply: bool = False,
  block: int = 2048,
  tile_cols: int = 16,
  tile_rows: int = 64,
  num_warps: int = 4,
  interpret: bool | None = None,
) -> optax.GradientTransformation:
  """``dl.dessilbi(...)``'s update as one multi-tensor Pallas kernel.

  Args:
    learning_rate, kappa, nu, momentum, weight_decay, penalty, store_gamma:
      as in :func:`dessilbi_jax.dessilbi` (constant learning rate only).
    apply: if true, the kernel writes the new params instead of the updates,
      and the result is a :class:`FusedStep` (``step(grads, state, params)
      -> (new_params, new_state)``) rather than an Optax transformation: the
      same computation without ``optax.apply_updates``'s pass per leaf.
    block: elements per program of a flat leaf (a power of 2).
    tile_cols: filters per program of a group-lasso leaf (a power of 2).
    tile_rows: rows per loop iteration of those programs (a power of 2).
    num_warps: Triton warps per program (a power of 2).
    interpret: run the kernel in Pallas interpret mode; None for "unless the
      default backend is a GPU".
  """
  for name, value in (
    ('block', block),
    ('tile_cols', tile_cols),
    ('tile_rows', tile_rows),
    ('num_warps', num_warps),
  ):
    if not isinstance(value, int) or value < 1 or value & (value - 1):
      raise ValueError(f'{name} must be a power of 2, got {value!r}.')
  if callable(learning_rate) or momentum is None:
    raise ValueError(
      'dessilbi_multitensor needs a constant learning_rate and a momentum; '
      f'got learning_rate={learning_rate!r}, momentum={momentum!r}.'
    )
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'
  reference = dl.dessilbi(
    learning_rate,
    kappa=kappa,
    nu=nu,
    momentum=momentum,
    weight_decay=weight_decay,
    penalty=penalty,
    store_gamma=store_gamma,
  )
  step = kappa * learning_rate
  z_step = learning_rate / nu

  def layout(params):
    penalties, treedef = dl.resolve_penalties(params, penalty)
    leaves = []
    for w, choice in zip(treedef.flatten_up_to(params), penalties, strict=True):
      if choice is None:
        kind, lam = 'plain', None
      elif isinstance(choice, dl.Lasso):
        kind, lam = 'lasso', float(choice.lam)
      else:
        if tuple(choice.reduce_axes(w.ndim)) != tuple(range(w.ndim - 1)):
          raise ValueError(
            'penalty: the multi-tensor kernel supports group lassos over '
            f'all axes but the last; got axes {choice.reduce_axes(w.ndim)} '
            f'for a leaf of shape {w.shape}.'
          )
        kind, lam = 'group', float(group_threshold(choice, w.shape))
      decayed = weight_decay > 0 and w.ndim > 1
      leaves.append(_Leaf(kind, w.shape, lam, decayed, block, tile_cols))
    # The longest programs first: the GPU starts programs in id order, and
    # long ones started last would run on alone at the end.
    start = 0
    for leaf in sorted(leaves, key=lambda leaf: -leaf.work):
      leaf.start = start
      start += leaf.programs
    return leaves, treedef, start

  def kernel(leaves, *refs):
    pid = pl.program_id(0)
    it = iter(refs)  # the inputs of every leaf, then the outputs
    inputs = [
      [next(it) for _ in range(3 if leaf.kind == 'plain' else 5)]
      for leaf in leaves
    ]
    outputs = [
      [next(it) for _ in range(2 if leaf.kind == 'plain' else 4)]
      for leaf in leaves
    ]
    for leaf, ins, outs in zip(leaves, inputs, outputs, strict=True):
      inside = (pid >= leaf.start) & (pid < leaf.start + leaf.programs)
      body = _group_program if leaf.kind == 'group' else _flat_program
      pl.when(inside)(
        lambda b=body, a=(leaf, pid - leaf.start, ins, outs): b(*a)
      )

  def applied(w, update):
    """What the kernel writes for W: its update, or (apply) the new W."""
    return w + update if apply else update

  def direction(leaf, g, m, w):
    if leaf.decayed:
      g = g + weight_decay * w
    return g + momentum * m

  def _flat_program(leaf, b, ins, outs):
    off = b * block
    mask = off + jnp.arange(block) < leaf.size
    at = pl.ds(off, block)
    g, m, w, *zg = (plt.load(r.at[at], mask=mask, other=0.0) for r in ins)
    m = direction(leaf, g, m, w)
    plt.store(outs[0].at[at], m, mask=mask)
    if leaf.kind == 'plain':
      plt.store(outs[1].at[at], applied(w, -step * m), mask=mask)
      return
    z, gamma = zg
    diff = w - gamma
    plt.store(outs[1].at[at], applied(w, -step * (m + diff / nu)), mask=mask)
    z = z + z_step * diff
    plt.store(outs[2].at[at], z, mask=mask)
    shrunk = jnp.sign(z) * jnp.maximum(jnp.abs(z) - leaf.lam, 0)
    plt.store(outs[3].at[at], kappa * shrunk, mask=mask)

  def _group_program(leaf, b, ins, outs):
    c0 = b * leaf.tile
    cols = c0 + jnp.arange(leaf.tile)[None, :]
    n_iter = -(-leaf.rows // tile_rows)

    def tile(i):
      r0 = i * tile_rows
      rows = r0 + jnp.arange(tile_rows)[:, None]
      mask = (rows < leaf.rows) & (cols < leaf.cols)
      return (pl.ds(r0, tile_rows), pl.ds(c0, leaf.tile)), mask

    def update(i, sq):
      at, mask = tile(i)
      g, m, w, z = (plt.load(r.at[at], mask=mask, other=0.0) for r in ins[:4])
      if store_gamma:
        gamma = plt.load(ins[4].at[at], mask=mask, other=0.0)
      else:  # the per-filter scale: Γ = z · scale
        scale = plt.load(
          ins[4].at[pl.ds(c0, leaf.tile)], mask=cols[0] < leaf.cols
        )
        gamma = z * scale[None, :]
      m = direction(leaf, g, m, w)
      plt.store(outs[0].at[at], m, mask=mask)
      diff = w - gamma
      plt.store(outs[1].at[at], applied(w, -step * (m + diff / nu)), mask=mask)
      z = z + z_step * diff
      plt.store(outs[2].at[at], z, mask=mask)
      return sq + z * z

    # Squares summed per position, reduced across rows once after the loop
    # (a reduction inside it would synchronise the warps every iteration).
    sq = jax.lax.fori_loop(
      0, n_iter, update, jnp.zeros((tile_rows, leaf.tile), jnp.float32)
    )
    sq = jnp.sum(sq, axis=0)
    nonzero = sq > 0
    norm = jnp.sqrt(jnp.where(nonzero, sq, 1.0))
    factor = jnp.where(nonzero & (norm > leaf.lam), 1 - leaf.lam / norm, 0.0)
    scale = kappa * factor
    if not store_gamma:
      plt.store(
        outs[3].at[pl.ds(c0, leaf.tile)], scale, mask=cols[0] < leaf.cols
      )
      return

    def write_gamma(j, carry):
      # Backwards: the tiles of z written last are the likeliest in cache.
      at, mask = tile(n_iter - 1 - j)
      z = plt.load(outs[2].at[at], mask=mask, other=0.0)
      plt.store(outs[3].at[at], z * scale[None, :], mask=mask)
      return carry

    # z is read back by threads other than those that wrote it only if the
    # two loops' tiles get different layouts; the barrier makes it safe
    # (interpret mode runs a program sequentially and has no barrier).
    if not interpret:
      plt.debug_barrier()
    jax.lax.fori_loop(0, n_iter, write_gamma, 0)

  def update_fn(updates, state, params=None):
    """The updates (or, with apply, the new params) and the new state."""
    if params is None:
      raise ValueError('dessilbi_multitensor needs params.')
    leaves, treedef, programs = layout(params)
    dtypes = {str(x.dtype) for x in jax.tree.leaves((params, updates, state))}
    if not dtypes <= {'float32', 'int32'}:
      raise TypeError(
        'dessilbi_multitensor supports float32 params, gradients and state; '
        f'got dtypes {sorted(dtypes)}.'
      )
    trace_state, core = state[2], state[3]
    columns = [
      treedef.flatten_up_to(t)
      for t in (updates, trace_state.trace, params, core.z, core.gamma)
    ]
    ins, out_shape, aliases = [], [], {}
    for leaf, g, m, w, z, gamma in zip(leaves, *columns, strict=True):
      # Momentum, z and Γ (and with apply, W) are written in place of their
      # old values: every element is read before the same thread writes it.
      first_in, first_out = len(ins), len(out_shape)
      aliases[first_in + 1] = first_out  # m
      if apply:
        aliases[first_in + 2] = first_out + 1  # W
      if leaf.kind != 'plain':
        aliases[first_in + 3] = first_out + 2  # z
        aliases[first_in + 4] = first_out + 3  # Γ or the per-filter scale
      as2d = (
        (lambda x, leaf=leaf: x.reshape(leaf.rows, leaf.cols))
        if (leaf.kind == 'group')
        else (lambda x: x.reshape(-1))
      )
      arrays = [as2d(g), as2d(m), as2d(w)]
      like = jax.ShapeDtypeStruct(arrays[0].shape, w.dtype)
      if leaf.kind == 'plain':
        ins += arrays
        out_shape += [like, like]
        continue
      arrays.append(as2d(z))
      if leaf.kind == 'group' and not store_gamma:
        arrays.append(gamma.reshape(-1))
        gamma_out = jax.ShapeDtypeStruct((leaf.cols,), gamma.dtype)
      else:
        arrays.append(as2d(gamma))
        gamma_out = like
      ins += arrays
      out_shape += [like, like, like, gamma_out]
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    outs = pl.pallas_call(
      lambda *refs: kernel(leaves, *refs),
      out_shape=out_shape,
      grid=(programs,),
      input_output_aliases=aliases,
      in_specs=[any_spec] * len(ins),
      out_specs=[any_spec] * len(out_shape),
      compiler_params=plt.CompilerParams(num_warps=num_warps),
      interpret=interpret,
      name='dessilbi_multitensor',
    )(*ins)
    it = iter(outs)
    new_m, new_u, new_z, new_gamma = [], [], [], []
    for leaf, z, gamma in zip(leaves, columns[3], columns[4], strict=True):
      new_m.append(next(it).reshape(leaf.shape))
      new_u.append(next(it).reshape(leaf.shape))
      if leaf.kind == 'plain':
        new_z.append(z)
        new_gamma.append(gamma)
        continue
      new_z.append(next(it).reshape(leaf.shape))
      new_gamma.append(next(it).reshape(gamma.shape))
    unflat = treedef.unflatten
    new_state = (
      state[0],
      state[1],
      trace_state._replace(trace=unflat(new_m)),
      core._replace(
        count=optax.safe_increment(core.count),
        z=unflat(new_z),
        gamma=unflat(new_gamma),
      ),
    )
    return unflat(new_u), new_state

  if apply:
    return FusedStep(reference.init, update_fn)
  return optax.GradientTransformation(reference.init, update_fn)
