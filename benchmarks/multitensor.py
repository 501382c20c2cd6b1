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
Run as a script, it checks the compiled kernel against ``dessilbi`` on a
model's params (:func:`agreement`), which a GPU run does before timing it.
Supported: a learning rate or schedule, float32 / bfloat16 / float16 params
and state (computed in float32), momentum without Nesterov, weight decay
on the leaves of rank >= 2, the default penalty rule (or any rule whose group
lassos reduce over all axes but the last).
"""

import argparse
import json
import math
import sys
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

  def __init__(self, kind, shape, lam, decayed, block, tile_cols, chunk_rows):
    self.kind = kind  # 'plain' | 'lasso' | 'group'
    self.shape = tuple(shape)
    self.lam = lam
    self.decayed = decayed
    self.start = 0  # the first program's id, set by the layout
    if kind == 'group':
      self.rows = math.prod(shape[:-1])
      self.cols = shape[-1]
      self.tile = min(tile_cols, _pow2(self.cols))
      self.tiles = -(-self.cols // self.tile)
      # Rows per program: all of them, or (split) chunks of chunk_rows.
      self.chunks = 1 if chunk_rows is None else -(-self.rows // chunk_rows)
      self.chunk = self.rows if self.chunks == 1 else chunk_rows
      self.programs = self.tiles * self.chunks
      self.work = self.chunk * self.tile  # elements per program
    else:
      self.size = math.prod(shape)
      self.programs = max(1, -(-self.size // block))
      self.work = min(self.size, block)


def dessilbi_multitensor(
  learning_rate: optax.ScalarOrSchedule,
  kappa: float = 1.0,
  nu: float = 100.0,
  momentum: float = 0.9,
  weight_decay: float = 0.0,
  penalty=None,
  store_gamma: bool = True,
  state_dtype=None,
  apply: bool = False,
  block: int = 2048,
  tile_cols: int = 16,
  tile_rows: int = 64,
  num_warps: int = 4,
  chunk_rows: int | None = None,
  interpret: bool | None = None,
) -> optax.GradientTransformation:
  """``dl.dessilbi(...)``'s update as one multi-tensor Pallas kernel.

  Args:
    learning_rate, kappa, nu, momentum, weight_decay, penalty, store_gamma,
      state_dtype: as in :func:`dessilbi_jax.dessilbi` (the learning rate a
      float or a schedule, which the kernel reads at every step; params,
      gradients and state in float32, bfloat16 or float16, computed in
      float32).
    apply: if true, the kernel writes the new params instead of the updates,
      and the result is a :class:`FusedStep` (``step(grads, state, params)
      -> (new_params, new_state)``) rather than an Optax transformation: the
      same computation without ``optax.apply_updates``'s pass per leaf.
    block: elements per program of a flat leaf (a power of 2).
    tile_cols: filters per program of a group-lasso leaf (a power of 2).
    tile_rows: rows per loop iteration of those programs (a power of 2).
    num_warps: Triton warps per program (a power of 2).
    chunk_rows: None: a program of a group-lasso leaf covers all its rows
      and writes Γ itself (one kernel in all). A power of 2 (at least
      ``tile_rows``): programs cover tiles of ``chunk_rows`` rows (more
      programs at once for the large conv kernels) and write partial filter
      norms; a second kernel sums them and writes Γ (reading z once more)
      or the per-filter scale.
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
  if chunk_rows is not None and (
    not isinstance(chunk_rows, int)
    or chunk_rows < tile_rows
    or chunk_rows & (chunk_rows - 1)
  ):
    raise ValueError(
      'chunk_rows must be None or a power of 2 of at least tile_rows '
      f'({tile_rows}), got {chunk_rows!r}.'
    )
  split = chunk_rows is not None
  if momentum is None:
    raise ValueError('dessilbi_multitensor needs a momentum; got None.')
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
    state_dtype=state_dtype,
  )

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
      leaves.append(
        _Leaf(kind, w.shape, lam, decayed, block, tile_cols, chunk_rows)
      )
    # The longest programs first: the GPU starts programs in id order, and
    # long ones started last would run on alone at the end.
    start = 0
    for leaf in sorted(leaves, key=lambda leaf: -leaf.work):
      leaf.start = start
      start += leaf.programs
    return leaves, treedef, start

  def kernel(leaves, lr_ref, *refs):
    pid = pl.program_id(0)
    # This step's learning rate, shape (1,): W's step κα and z's step α/ν.
    lr = plt.load(lr_ref.at[pl.ds(0, 1)])
    rates = (kappa * lr, lr / nu)
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
        lambda b=body, a=(leaf, pid - leaf.start, ins, outs): b(*a, rates)
      )

  def load(ref, at, mask):
    """A tile as float32 (params and gradients may be bfloat16/float16)."""
    return plt.load(ref.at[at], mask=mask, other=0.0).astype(jnp.float32)

  def store(ref, at, value, mask):
    plt.store(ref.at[at], value.astype(ref.dtype), mask=mask)

  def stored(value, ref):
    """``value`` as ``ref`` will hold it: Γ comes from the z the state keeps
    (rounded to the state's dtype), as in dessilbi."""
    return value.astype(ref.dtype).astype(jnp.float32)

  def applied(w, update, dtype):
    """What the kernel writes for W: its update, or (apply) the new W, with
    the update rounded to W's dtype first, as optax.apply_updates adds it."""
    update = update.astype(dtype).astype(jnp.float32)
    return w + update if apply else update

  def direction(leaf, g, m, w, dtype):
    if leaf.decayed:  # optax.add_decayed_weights, in the gradients' dtype
      g = (g + weight_decay * w).astype(dtype).astype(jnp.float32)
    return g + momentum * m

  def _flat_program(leaf, b, ins, outs, rates):
    step, z_step = rates
    off = b * block
    mask = off + jnp.arange(block) < leaf.size
    at = pl.ds(off, block)
    g, m, w, *zg = (load(r, at, mask) for r in ins)
    m = direction(leaf, g, m, w, ins[0].dtype)
    store(outs[0], at, m, mask)
    if leaf.kind == 'plain':
      store(outs[1], at, applied(w, -step * m, outs[1].dtype), mask)
      return
    z, gamma = zg
    diff = w - gamma
    update = -step * (m + diff / nu)
    store(outs[1], at, applied(w, update, outs[1].dtype), mask)
    z = stored(z + z_step * diff, outs[2])
    store(outs[2], at, z, mask)
    shrunk = jnp.sign(z) * jnp.maximum(jnp.abs(z) - leaf.lam, 0)
    store(outs[3], at, kappa * shrunk, mask)

  def _row_tiles(leaf, t, c):
    """The tiles (rows × filters) of filter tile ``t``, row chunk ``c``:
    ``tile(i) -> (index, mask)`` and how many there are."""
    c0 = t * leaf.tile
    cols = c0 + jnp.arange(leaf.tile)[None, :]
    r_base = c * leaf.chunk

    def tile(i):
      r0 = r_base + i * tile_rows
      rows = r0 + jnp.arange(tile_rows)[:, None]
      mask = (rows < leaf.rows) & (cols < leaf.cols)
      return (pl.ds(r0, tile_rows), pl.ds(c0, leaf.tile)), mask

    return tile, -(-leaf.chunk // tile_rows)

  def _scale(leaf, sq):
    """κ·max(0, 1 - λ/‖z_g‖) from the filters' squared norms."""
    nonzero = sq > 0
    norm = jnp.sqrt(jnp.where(nonzero, sq, 1.0))
    factor = jnp.where(nonzero & (norm > leaf.lam), 1 - leaf.lam / norm, 0.0)
    return kappa * factor

  def _write_gamma(tile, n_iter, z_ref, gamma_ref, scale):
    def body(j, carry):
      # Backwards: the tiles of z written last are the likeliest in cache.
      at, mask = tile(n_iter - 1 - j)
      z = load(z_ref, at, mask)
      store(gamma_ref, at, z * scale[None, :], mask)
      return carry

    jax.lax.fori_loop(0, n_iter, body, 0)

  def _group_program(leaf, b, ins, outs, rates):
    step, z_step = rates
    t, c = (b // leaf.chunks, b % leaf.chunks) if split else (b, 0)
    c0 = t * leaf.tile
    cols = c0 + jnp.arange(leaf.tile)[None, :]
    tile, n_iter = _row_tiles(leaf, t, c)

    def update(i, sq):
      at, mask = tile(i)
      g, m, w, z = (load(r, at, mask) for r in ins[:4])
      if store_gamma:
        gamma = load(ins[4], at, mask)
      else:  # the per-filter scale: Γ = z · scale
        scale = load(ins[4], pl.ds(c0, leaf.tile), cols[0] < leaf.cols)
        gamma = z * scale[None, :]
      m = direction(leaf, g, m, w, ins[0].dtype)
      store(outs[0], at, m, mask)
      diff = w - gamma
      update = -step * (m + diff / nu)
      store(outs[1], at, applied(w, update, outs[1].dtype), mask)
      z = stored(z + z_step * diff, outs[2])
      store(outs[2], at, z, mask)
      return sq + z * z

    # Squares summed per position, reduced across rows once after the loop
    # (a reduction inside it would synchronise the warps every iteration).
    sq = jax.lax.fori_loop(
      0, n_iter, update, jnp.zeros((tile_rows, leaf.tile), jnp.float32)
    )
    sq = jnp.sum(sq, axis=0)
    if split:  # this chunk's share of the norms, for the second kernel
      at = (pl.ds(c, 1), pl.ds(c0, leaf.tile))
      store(outs[3], at, sq[None, :], cols < leaf.cols)
      return
    scale = _scale(leaf, sq)
    if not store_gamma:
      store(outs[3], pl.ds(c0, leaf.tile), scale, cols[0] < leaf.cols)
      return
    # z is read back by threads other than those that wrote it only if the
    # two loops' tiles get different layouts; the barrier makes it safe
    # (interpret mode runs a program sequentially and has no barrier).
    if not interpret:
      plt.debug_barrier()
    _write_gamma(tile, n_iter, outs[2], outs[3], scale)

  def _norms_program(leaf, b, ins, outs):
    """The second kernel (split): the norms from the chunks' partial sums,
    then Γ for one chunk of rows (or the per-filter scale)."""
    z_ref, partial_ref = ins[:2]
    t, c = (b // leaf.chunks, b % leaf.chunks) if store_gamma else (b, 0)
    c0 = t * leaf.tile
    cols = c0 + jnp.arange(leaf.tile)[None, :]
    chunks = _pow2(leaf.chunks)
    mask = (jnp.arange(chunks)[:, None] < leaf.chunks) & (cols < leaf.cols)
    at = (pl.ds(0, chunks), pl.ds(c0, leaf.tile))
    scale = _scale(leaf, jnp.sum(load(partial_ref, at, mask), axis=0))
    if not store_gamma:
      store(outs[0], pl.ds(c0, leaf.tile), scale, cols[0] < leaf.cols)
      return
    tile, n_iter = _row_tiles(leaf, t, c)
    _write_gamma(tile, n_iter, z_ref, outs[0], scale)

  def norms_kernel(entries, *refs):
    """``entries``: (leaf, first program, programs) per group-lasso leaf."""
    pid = pl.program_id(0)
    ins, outs = refs[: 3 * len(entries)], refs[3 * len(entries) :]
    for i, (leaf, start, programs) in enumerate(entries):
      inside = (pid >= start) & (pid < start + programs)
      pl.when(inside)(
        lambda a=(leaf, pid - start, ins[3 * i : 3 * i + 3], outs[i:]): (
          _norms_program(*a)
        )
      )

  def call(body, ins, out_shape, programs, aliases, name):
    """A ``pallas_call`` of ``body`` on a 1-D grid, refs in memory."""
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
      body,
      out_shape=out_shape,
      grid=(programs,),
      input_output_aliases=aliases,
      in_specs=[any_spec] * len(ins),
      out_specs=[any_spec] * len(out_shape),
      compiler_params=plt.CompilerParams(num_warps=num_warps),
      interpret=interpret,
      name=name,
    )(*ins)

  def norms_pass(leaves, gammas, outs):
    """The second kernel (split): Γ (or the scale) of every group-lasso leaf
    from its new z and partial norms; ``outs`` (the first kernel's outputs)
    with the partial norms replaced by Γ."""
    entries, ins, out_shape, aliases, where = [], [], [], {}, []
    start, at = 0, 0
    for leaf, gamma in zip(leaves, gammas, strict=True):
      n = 2 if leaf.kind == 'plain' else 4
      if leaf.kind == 'group':
        programs = leaf.programs if store_gamma else leaf.tiles
        entries.append((leaf, start, programs))
        start += programs
        old = gamma.reshape(outs[at + 2].shape if store_gamma else -1)
        # The old Γ's buffer takes the new Γ (it is not read).
        aliases[len(ins) + 2] = len(out_shape)
        ins += [outs[at + 2], outs[at + 3], old]
        out_shape.append(jax.ShapeDtypeStruct(old.shape, old.dtype))
        where.append(at + 3)
      at += n
    if not entries:
      return outs
    new = call(
      lambda *refs: norms_kernel(entries, *refs),
      ins,
      out_shape,
      start,
      aliases,
      'dessilbi_multitensor_norms',
    )
    for i, value in zip(where, new, strict=True):
      outs[i] = value
    return outs

  def update_fn(updates, state, params=None):
    """The updates (or, with apply, the new params) and the new state."""
    if params is None:
      raise ValueError('dessilbi_multitensor needs params.')
    leaves, treedef, programs = layout(params)
    floats = {'float32', 'bfloat16', 'float16'}
    dtypes = {str(x.dtype) for x in jax.tree.leaves((params, updates, state))}
    if not dtypes <= floats | {'int32'}:
      raise TypeError(
        'dessilbi_multitensor supports float32, bfloat16 and float16 params, '
        f'gradients and state; got dtypes {sorted(dtypes)}.'
      )
    trace_state, core = state[2], state[3]
    columns = [
      treedef.flatten_up_to(t)
      for t in (updates, trace_state.trace, params, core.z, core.gamma)
    ]
    # The learning rate at this step (a schedule of the core's step count, as
    # in dessilbi), read by the kernel, so that a schedule costs no compile.
    lr = learning_rate(core.count) if callable(learning_rate) else learning_rate
    ins, out_shape, aliases = [jnp.asarray(lr, jnp.float32).reshape(1)], [], {}
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
      shape = arrays[0].shape
      # Each output in the dtype of what it replaces (W's update in W's).
      m_out = jax.ShapeDtypeStruct(shape, m.dtype)
      w_out = jax.ShapeDtypeStruct(shape, w.dtype)
      if leaf.kind == 'plain':
        ins += arrays
        out_shape += [m_out, w_out]
        continue
      arrays.append(as2d(z))
      if leaf.kind == 'group' and not store_gamma:
        arrays.append(gamma.reshape(-1))
        gamma_out = jax.ShapeDtypeStruct((leaf.cols,), gamma.dtype)
      else:
        arrays.append(as2d(gamma))
        gamma_out = jax.ShapeDtypeStruct(shape, gamma.dtype)
      if leaf.kind == 'group' and split:
        # The chunks' partial norms; Γ is written by the second kernel.
        del aliases[first_in + 4]
        gamma_out = jax.ShapeDtypeStruct((leaf.chunks, leaf.cols), jnp.float32)
      ins += arrays
      out_shape += [
        m_out,
        w_out,
        jax.ShapeDtypeStruct(shape, z.dtype),
        gamma_out,
      ]
    outs = call(
      lambda *refs: kernel(leaves, *refs),
      ins,
      out_shape,
      programs,
      aliases,
      'dessilbi_multitensor',
    )
    if split:
      outs = norms_pass(leaves, columns[4], list(outs))
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


VARIANTS = {
  # name: (keyword arguments of dessilbi_multitensor, store_gamma of dessilbi)
  'dessilbi_mt': ({}, True),
  'dessilbi_mt_z': ({'store_gamma': False}, False),
  'dessilbi_mt_apply': ({'apply': True}, True),
  # The conv kernels' rows split into chunks; a second kernel writes Γ.
  'dessilbi_mt_split_apply': (
    {'apply': True, 'tile_cols': 32, 'tile_rows': 32, 'chunk_rows': 256},
    True,
  ),
}


def _lams_from(z, penalties, fraction):
  """Thresholds that select about ``fraction`` of the groups (or elements)
  of a lasso-free run's z: a quantile of its group norms, or of its |z|."""
  lams = {}
  for kind in (dl.GroupLasso, dl.Lasso):
    sizes = []
    for x, choice in zip(z, penalties, strict=True):
      if isinstance(choice, kind):
        axes = (
          tuple(choice.reduce_axes(x.ndim)) if kind is dl.GroupLasso else ()
        )
        sizes.append(jnp.sqrt(jnp.sum(x * x, axis=axes)).reshape(-1))
    if sizes:
      lams[kind] = float(jnp.quantile(jnp.concatenate(sizes), 1 - fraction))
  return lams


def agreement(
  params: Any,
  variants=tuple(VARIANTS),
  steps: int = 4,
  learning_rate: float = 0.5,
  nu: float = 2.0,
  weight_decay: float = 1e-4,
  selected: float = 0.5,
  interpret: bool | None = None,
) -> dict:
  """How closely the kernel follows ``dessilbi`` on ``params``: the largest
  differences after ``steps`` steps from the same start, with the same
  gradients (normal noise, one draw per step).

  The thresholds λ are set so that about ``selected`` of the conv filters and
  of the Dense weights are in Γ's support at the end (from a run with λ = 0),
  so that Γ, the norms and the shrinkage are all exercised, not only zeros.

  Returns:
    Per variant: the largest absolute difference and the largest one relative
    to the reference leaf's largest magnitude, over the params and over the
    whole state; and for the conv filters and the Dense weights, how many are
    in Γ's support in one run and not the other, and the share selected in
    the reference run.
  """
  penalties, treedef = dl.resolve_penalties(params, None)
  keys = jax.random.split(jax.random.key(0), steps)
  grads = [
    treedef.unflatten(
      jax.random.normal(k, w.shape, w.dtype)
      for k, w in zip(
        jax.random.split(key, treedef.num_leaves),
        treedef.flatten_up_to(params),
        strict=True,
      )
    )
    for key in keys
  ]

  def run(tx, step_fn):
    state, p = tx.init(params), params
    step = jax.jit(step_fn, donate_argnums=(1, 2))
    p, state = jax.tree.map(jnp.copy, (p, state))
    for g in grads:
      p, state = step(g, state, p)
    return p, state

  def optax_step(tx):
    def step(g, state, p):
      updates, state = tx.update(g, state, p)
      return optax.apply_updates(p, updates), state

    return step

  free = dl.penalty_rule(
    conv=dl.GroupLasso(axes=(-1,), lam=0.0), dense=dl.Lasso(lam=0.0)
  )
  kwargs = dict(learning_rate=learning_rate, nu=nu, weight_decay=weight_decay)
  tx = dl.dessilbi(**kwargs, penalty=free)
  _, state = run(tx, optax_step(tx))
  lams = _lams_from(treedef.flatten_up_to(state[3].z), penalties, selected)
  rule = dl.penalty_rule(
    conv=dl.GroupLasso(axes=(-1,), lam=lams.get(dl.GroupLasso, 1.0)),
    dense=dl.Lasso(lam=lams.get(dl.Lasso, 1.0)),
  )
  kwargs['penalty'] = rule
  references = {}
  out = {'lams': {k.__name__: v for k, v in lams.items()}, 'results': {}}
  for name in variants:
    options, store_gamma = VARIANTS[name]
    if store_gamma not in references:
      tx = dl.dessilbi(**kwargs, store_gamma=store_gamma)
      references[store_gamma] = run(tx, optax_step(tx))
    want = references[store_gamma]
    fused = dessilbi_multitensor(**kwargs, **options, interpret=interpret)
    got = run(fused, fused.step if options.get('apply') else optax_step(fused))
    out['results'][name] = _compare(got, want, penalties, treedef)
  return out


def _compare(got, want, penalties, treedef) -> dict:
  def errors(a, b):
    pairs = list(zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    absolute = max(float(jnp.max(jnp.abs(x - y))) for x, y in pairs)
    relative = max(
      float(jnp.max(jnp.abs(x - y)) / jnp.maximum(jnp.max(jnp.abs(y)), 1e-30))
      for x, y in pairs
    )
    return absolute, relative

  assert jax.tree.structure(got) == jax.tree.structure(want)
  params_abs, params_rel = errors(got[0], want[0])
  state_abs, state_rel = errors(got[1], want[1])
  out = {
    'params_max_abs': params_abs,
    'params_max_rel': params_rel,
    'state_max_abs': state_abs,
    'state_max_rel': state_rel,
  }
  gammas = [treedef.flatten_up_to(dl.get_gamma(s)) for s in (got[1], want[1])]
  for kind, unit in ((dl.GroupLasso, 'filters'), (dl.Lasso, 'weights')):
    pairs = [
      (a, b, c)
      for a, b, c in zip(*gammas, penalties, strict=True)
      if isinstance(c, kind)
    ]
    if not pairs:
      continue
    mismatch = selected = units = 0
    for a, b, c in pairs:
      axes = tuple(c.reduce_axes(a.ndim)) if kind is dl.GroupLasso else ()
      in_a, in_b = (jnp.any(x != 0, axis=axes) for x in (a, b))
      mismatch += int(jnp.sum(in_a != in_b))
      selected += int(jnp.sum(in_b))
      units += int(in_b.size)
    out[unit] = {
      'count': units,
      'support_mismatches': mismatch,
      'selected_share': selected / units,
    }
  # Float32 rounding stays far below this; a wrong kernel does not.
  out['ok'] = (
    max(params_rel, state_rel) < 1e-4
    and sum(
      out[u]['support_mismatches'] for u in ('filters', 'weights') if u in out
    )
    == 0
  )
  return out


def parse_args(argv=None) -> argparse.Namespace:
  """The command line of :func:`main`."""
  from benchmarks.models import MODELS

  parser = argparse.ArgumentParser(description=main.__doc__.split('\n\n')[0])
  parser.add_argument('--model', choices=sorted(MODELS), default='lenet5')
  parser.add_argument('--steps', type=int, default=4)
  parser.add_argument(
    '--variants', nargs='+', choices=sorted(VARIANTS), default=list(VARIANTS)
  )
  parser.add_argument('--json', default=None, help='write results here')
  return parser.parse_args(argv)


def main(argv=None) -> dict:
  """Checks the kernel against ``dessilbi`` on a model's params and prints
  the differences (see :func:`agreement`)."""
  args = parse_args(argv)
  from benchmarks import harness

  _, params, _, _, _ = harness.build(args.model, 2)
  out = agreement(params, args.variants, steps=args.steps)
  out.update(model=args.model, steps=args.steps, backend=jax.default_backend())
  print(
    f'{args.model}, {args.steps} steps on {out["backend"]}; λ {out["lams"]}'
  )
  for name, row in out['results'].items():
    supports = ', '.join(
      f'{row[unit]["support_mismatches"]} of {row[unit]["count"]} {unit}'
      f' ({row[unit]["selected_share"]:.0%} selected)'
      for unit in ('filters', 'weights')
      if unit in row
    )
    print(
      f'  {name:18s} {"ok" if row["ok"] else "MISMATCH"}; max difference:'
      f' params {row["params_max_abs"]:.1e}'
      f' ({row["params_max_rel"]:.1e} rel), state {row["state_max_abs"]:.1e}'
      f' ({row["state_max_rel"]:.1e} rel); in one support only: {supports}',
      flush=True,
    )
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == '__main__':
  sys.path.insert(0, __file__.rsplit('/', 2)[0])  # the repository root
  main()
