"""DessiLBI's step as two multi-tensor Pallas kernels on a GPU.

Through Optax, a step of :func:`~dessilbi_jax.dessilbi` is at least one GPU
kernel per leaf (three per conv kernel: the update, the filter norms, Γ),
and ``optax.apply_updates`` adds one more pass and kernel per leaf. On a
ResNet-18 those launches, not the bytes, set the time. :func:`fused_dessilbi`
computes the same step for many leaves at once, in two kernels (Pallas
Triton):

1. one program per block of a flat leaf (biases, norms, lasso leaves), and
   one per tile of filters × chunk of rows of a group-lasso leaf: weight
   decay, momentum, W (or its update), z, Γ of the lasso leaves, and each
   chunk's share of the filters' squared norms;
2. for the group-lasso leaves, the norms from those shares, then Γ
   (``z · κ·max(0, 1 - λ/‖z_g‖)``) or, with ``store_gamma=False``, the
   per-filter scale.

The first kernel is launched once per kind of leaf (group lassos, the
others) and per ``leaves_per_kernel`` leaves, the second once per launch of
group lassos: a kernel holds a branch per leaf, and Triton's compile time
grows with the square of a kernel's branches (ResNet-18 takes seven launches
at the default of 16).

Its state is the state of ``dessilbi`` with the same arguments, leaf for
leaf, so the whole toolbox reads it and a run may switch between the two.
The values agree to the rounding of the arrays' dtype, not always to the
last bit. The kernels compute in float32 and round once, where ``dessilbi``
rounds bfloat16 and float16 intermediates too (a 16-bit last place apart);
compiled by Triton, they divide with ``div.full.f32`` (within 2 ulp) and take
square roots with ``sqrt.approx.ftz.f32``, where XLA's GPU code rounds both
correctly. A filter whose squared norm is below float32's smallest normal
number (about 1e-38) then has norm 0, so it stays out of Γ's support even
at λ = 0.
"""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from dessilbi_jax import _checks
from dessilbi_jax.alias import dessilbi, matrix_mask
from dessilbi_jax.penalties import GroupLasso, Lasso, PenaltyRule, path_str
from dessilbi_jax.shrinkage import group_threshold
from dessilbi_jax.transform import (
  DessiLBIState,
  _check_recorded_penalties,
  _resolve,
)

IMPLEMENTATIONS = ('xla', 'pallas')
# The kernels' scalar inputs, read at every step (a schedule, or a traced
# hyper-parameter, costs no compile): W's step κα, z's step α/ν, κ, ν,
# momentum β, weight decay.
_STEP, _Z_STEP, _KAPPA, _NU, _MOMENTUM, _DECAY = range(6)


class FusedDessilbi(NamedTuple):
  """DessiLBI as an ``init``/``update`` pair and a ``step`` that applies it.

  Attributes:
    init: ``init(params) -> state``, the state of :func:`dessilbi`.
    update: ``update(grads, state, params, **extra_args) -> (updates,
      state)``, as an Optax transformation (composes with ``optax.chain``;
      extra keyword arguments, such as a loss, are ignored, as by
      ``dessilbi``); followed by ``optax.apply_updates``, it is no faster
      than ``dessilbi``.
    step: ``step(grads, state, params, **extra_args) -> (new_params,
      new_state)``: the update applied in the kernel, the fast path.
  """

  init: optax.TransformInitFn
  update: optax.TransformUpdateFn
  step: Callable[[Any, Any, Any], tuple[Any, Any]]


def _pow2(n: int) -> int:
  return 1 << max(0, math.ceil(math.log2(max(n, 1))))


class _Leaf:
  """Static layout of one leaf in the kernels, and the dtypes of the
  optimizer chain it mirrors."""

  def __init__(self, kind, shape, dtypes, lam, decayed, storage, tiles):
    block, tile_cols, chunk_rows = tiles
    self.kind = kind  # 'plain' | 'lasso' | 'group' | 'empty' (size 0)
    self.coupled = lam is not None
    self.shape = tuple(shape)
    self.lam = lam
    self.decayed = decayed
    # The decayed gradient's, the direction's (momentum before the state's
    # cast) and the stored momentum's dtypes; and by scalar (_STEP, ...) the
    # dtype its product is computed in, to which a weakly typed (Python
    # float) hyper-parameter is rounded first.
    self.decay_dtype, self.d_dtype, self.m_dtype, self.scalar_dtypes = dtypes
    # Whether the state holds Γ itself (else a per-filter scale), as read
    # and as written.
    self.gamma_in_full, self.gamma_out_full = storage
    # The first kernel's call that steps this leaf, and the leaf's first
    # program there.
    self.call = self.start = 0
    self.programs = self.work = 0
    if kind == 'group':
      self.rows = math.prod(self.shape[:-1])
      self.cols = self.shape[-1]
      self.tile = min(tile_cols, _pow2(self.cols))
      self.tiles = -(-self.cols // self.tile)
      self.chunks = -(-self.rows // chunk_rows)
      self.chunk = self.rows if self.chunks == 1 else chunk_rows
      self.programs = self.tiles * self.chunks
      self.work = self.chunk * self.tile
    elif kind != 'empty':
      self.size = math.prod(self.shape)
      self.block = min(block, _pow2(self.size))
      self.programs = -(-self.size // self.block)
      self.work = self.block

  @property
  def scale_shape(self) -> tuple[int, ...]:
    """The per-filter scale's shape (``store_gamma=False``)."""
    return (1,) * (len(self.shape) - 1) + self.shape[-1:]


# The kernels' static settings (Python ints: they shape the kernels).
TILING = (
  'block',
  'tile_cols',
  'tile_rows',
  'chunk_rows',
  'num_warps',
  'leaves_per_kernel',
)


def _static_int(name: str, value: Any, power_of_two: bool = True) -> int:
  if isinstance(value, np.integer):
    value = int(value)
  if isinstance(value, (jax.Array, np.ndarray, np.generic)):
    # What optax.inject_hyperparams makes of a numeric argument.
    raise TypeError(
      f"{name} sets the kernels' shape and must be a Python int, got"
      f' {value!r}; under optax.inject_hyperparams, name the tiling in'
      f' static_args: static_args={TILING!r}.'
    )
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    what = 'a power of 2' if power_of_two else 'a positive int'
    raise ValueError(f'{name} must be {what}, got {value!r}.')
  if power_of_two and value & (value - 1):
    raise ValueError(f'{name} must be a power of 2, got {value!r}.')
  return value


def fused_dessilbi(
  learning_rate: optax.ScalarOrSchedule,
  kappa: jax.typing.ArrayLike = 1.0,
  nu: jax.typing.ArrayLike = 100.0,
  momentum: jax.typing.ArrayLike = 0.9,
  *,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
  penalty: Optional[PenaltyRule] = None,
  state_dtype: Optional[jax.typing.DTypeLike] = None,
  store_gamma: bool = True,
  implementation: Optional[str] = None,
  interpret: Optional[bool] = None,
  block: int = 2048,
  tile_cols: int = 64,
  tile_rows: int = 16,
  chunk_rows: int = 256,
  num_warps: int = 4,
  leaves_per_kernel: int = 16,
) -> FusedDessilbi:
  """:func:`~dessilbi_jax.dessilbi` as multi-tensor kernels, with a step
  that applies its own updates.

  The arguments before ``implementation`` are those of ``dessilbi`` (which
  checks them); Nesterov momentum and ``freeze`` are not offered, and a
  momentum is required. Those after ``momentum`` are keyword-only, since
  ``dessilbi`` has ``nesterov`` in the next place. The penalty rule's group
  lassos must group each leaf along its last axis (a filter per output
  channel, the default rule's conv kernels); other groupings are refused at
  ``init``.

  On an H100, the step updates ResNet-18's params in 1.26× the time of
  one pass moving the same bytes (``dessilbi`` with
  ``optax.apply_updates``: 2.1×), and a train step with it (at 32 leaves
  per launch) ran as fast as SGD's (``dessilbi``'s: 1.02×). It compiles
  1.7–2.9× slower than SGD's step (``benchmarks/README.md``).

  Args:
    learning_rate, kappa, nu, momentum, weight_decay, weight_decay_mask,
      penalty, state_dtype, store_gamma: as in ``dessilbi``; params,
      gradients and state in float32, bfloat16 or float16 (computed in
      float32).
    implementation: ``'pallas'`` for the kernels (Triton on a GPU; Pallas
      interpret mode elsewhere, slow, for tests), ``'xla'`` for ``dessilbi``
      followed by ``optax.apply_updates``, or None for the kernels where
      the step is lowered for a GPU and ``'xla'`` elsewhere: decided where
      it is lowered (``jax.lax.platform_dependent``), so a step jitted with
      arrays on the CPU of a machine with a GPU steps with XLA (called
      eagerly, the step goes by the default device). None traces the kernels only
      in a process with a GPU and a JAX with Pallas's Triton backend (which
      JAX 0.12 deprecates); to lower them for a GPU from a machine without
      one, use ``'pallas'`` with ``interpret=False``. The kernels take
      whole arrays. With sharding in types (a mesh with explicit axes),
      replicated arrays are stepped on each device (``jax.shard_map``), and
      for arrays sharded along an explicit axis None steps with XLA and
      ``'pallas'`` refuses. Under automatic axes, XLA hands the kernels
      whole arrays, gathering sharded ones.
    interpret: with the kernels, run them in Pallas interpret mode (True),
      compile them with Triton (False: also to lower for a GPU from a
      machine without one), or None for "unless the default backend is a
      GPU" (``'pallas'``) and "where lowered for a GPU, compiled" (None).
    block: elements per program of a flat leaf (a power of 2).
    tile_cols: filters per program of a group-lasso leaf (a power of 2).
    tile_rows: rows per loop iteration of those programs (a power of 2).
    chunk_rows: rows per program of a group-lasso leaf (a power of 2, at
      least ``tile_rows``).
    num_warps: Triton warps per program (a power of 2).
    leaves_per_kernel: the most leaves one launch of a kernel steps (a
      positive int). Fewer compile faster, as a kernel's compile time
      grows with the square of its leaves; more save launches, 1 to 2 µs
      each on an H100 (``benchmarks/README.md``). A leaf adds up to 72
      bytes of pointers to its launch's parameters (CUDA's classic limit
      is 4 KB). The tiling is static (Python ints); under
      ``optax.inject_hyperparams``, name it in ``static_args=TILING``.

  Returns:
    A :class:`FusedDessilbi`: ``init``, ``update`` and ``step``.

  Raises:
    ValueError: an unknown implementation, a tiling that is not a power of
      2, a ``leaves_per_kernel`` that is not a positive int, or no momentum;
      and what ``dessilbi`` raises.
    TypeError: ``interpret`` is not None or a bool, or the tiling is an
      array.

  ``update`` and ``step`` raise ValueError where ``dessilbi``'s update
  does, and with ``implementation='pallas'`` for arrays sharded along an
  explicit mesh axis (ImportError where JAX has no Pallas Triton backend).

  Example:
    >>> import jax, jax.numpy as jnp
    >>> import dessilbi_jax as dl
    >>> opt = dl.fused_dessilbi(0.05, nu=1.0, momentum=0.5)
    >>> w = {'kernel': jnp.ones((3, 3, 2, 4)), 'bias': jnp.zeros(4)}
    >>> state = opt.init(w)
    >>> grads = jax.tree.map(jnp.ones_like, w)
    >>> w, state = jax.jit(opt.step)(grads, state, w)
    >>> print(dl.get_gamma(state)['kernel'].shape)
    (3, 3, 2, 4)
  """
  if interpret is not None and not isinstance(interpret, bool):
    raise TypeError(f'interpret must be None or a bool, got {interpret!r}.')
  if implementation not in (None, *IMPLEMENTATIONS):
    raise ValueError(
      f'implementation must be None, {IMPLEMENTATIONS[0]!r} or '
      f'{IMPLEMENTATIONS[1]!r}; got {implementation!r}.'
    )
  block, tile_cols, tile_rows, chunk_rows, num_warps = (
    _static_int(name, value)
    for name, value in zip(
      TILING[:5],
      (block, tile_cols, tile_rows, chunk_rows, num_warps),
      strict=True,
    )
  )
  leaves_per_kernel = _static_int(
    'leaves_per_kernel', leaves_per_kernel, power_of_two=False
  )
  if chunk_rows < tile_rows:
    raise ValueError(
      f'chunk_rows ({chunk_rows}) must be at least tile_rows ({tile_rows}).'
    )
  if momentum is None:
    raise ValueError(
      'momentum: fused_dessilbi needs a momentum; got None (use dessilbi).'
    )
  reference = dessilbi(
    learning_rate,
    kappa=kappa,
    nu=nu,
    momentum=momentum,
    weight_decay=weight_decay,
    weight_decay_mask=weight_decay_mask,
    penalty=penalty,
    state_dtype=state_dtype,
    store_gamma=store_gamma,
  )
  if (
    state_dtype is not None
    and jax.dtypes.canonicalize_dtype(state_dtype).name not in _FLOATS
  ):
    # As JAX types it: float64 is float32 without x64 (a warning at init).
    raise TypeError(
      'state_dtype: fused_dessilbi supports float32, bfloat16 and float16 '
      f'state; got {jnp.dtype(state_dtype).name} (use dessilbi).'
    )
  mask_fn = matrix_mask if weight_decay_mask is None else weight_decay_mask
  tiles = (block, tile_cols, chunk_rows)
  settings = _Settings(tile_rows, num_warps, interpret)

  def init_fn(params):
    state = reference.init(params)  # checks the params and the rule first
    if _checks.is_map_params_placeholder(params):
      return state  # optax.tree.map_params: no arrays to check
    _check_groupings(params, _resolve(params, penalty)[0])
    _check_dtypes(params, state)
    return state

  def use_pallas(grads, state, params) -> Optional[bool]:
    """True for the kernels, False for XLA, None for the kernels where the
    step is lowered for a GPU and XLA elsewhere."""
    if implementation == 'xla':
      return False
    if implementation is None and not (_triton_backend() and _gpu_backend()):
      return False
    if not _triton_backend():
      raise ImportError(
        "implementation='pallas': this JAX has no Pallas Triton backend"
        ' (jax.experimental.pallas.triton); use implementation=None or'
        " 'xla'."
      )
    sharded = _sharded(grads, state, params)
    if sharded is None:
      return True if implementation == 'pallas' else None
    if implementation == 'pallas':
      raise ValueError(
        "implementation='pallas': the kernels take whole arrays, but"
        f' {sharded} (an explicit mesh axis). Use implementation=None, which'
        " steps such arrays with XLA, or 'xla'; or replicate them."
      )
    return False

  def run(grads, state, params, apply, settings):
    if params is None:
      raise ValueError(_checks.NO_PARAMS_MSG)
    # As JAX types them (NumPy float64 is float32 without x64), as jit and
    # dessilbi would: the kernels' outputs take these dtypes.
    grads, state, params = jax.tree.map(jnp.asarray, (grads, state, params))
    trace, core = _parts(state)
    penalties, treedef, table = _resolve(params, penalty)
    _checks.check_update_trees(grads, core, params, penalties, treedef)
    _checks.check_params_shaped(
      'state: the momentum (optax.trace)', trace.trace, params
    )
    _check_recorded_penalties(core.penalties, table)
    _check_groupings(params, penalties)
    _check_dtypes((params, grads), state)
    decay = _decay_flags(mask_fn, grads, treedef)
    lr = learning_rate(core.count) if callable(learning_rate) else learning_rate
    if jnp.ndim(lr) != 0:
      raise ValueError(
        f'learning_rate: the schedule returned an array of shape '
        f'{jnp.shape(lr)}; expected a scalar.'
      )
    step = kappa * lr
    scalars = jnp.stack(
      [
        jnp.asarray(v, jnp.float32).reshape(())
        for v in (
          step,
          jnp.asarray(lr, jnp.float32) / jnp.asarray(nu, jnp.float32),
          kappa,
          nu,
          momentum,
          weight_decay,
        )
      ]
    )
    columns = [
      treedef.flatten_up_to(t)
      for t in (grads, trace.trace, params, core.z, core.gamma)
    ]
    hyper = _Hyper(
      momentum, weight_decay, state_dtype, store_gamma, lr, step, nu
    )
    leaves = _layout(columns, penalties, decay, tiles, hyper, leaves_per_kernel)

    def kernels(scalars, columns):
      return _pallas_step(leaves, scalars, columns, settings, apply)

    mesh = _explicit_mesh((grads, state, params))
    if mesh is not None:
      # Sharding in types, every array replicated (else use_pallas said no):
      # each device runs the kernels on its whole copy, as in data parallelism.
      spec = jax.sharding.PartitionSpec()
      kernels = jax.shard_map(
        kernels, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False
      )
    new = kernels(scalars, columns)
    new_w, new_m, new_z, new_gamma = (treedef.unflatten(c) for c in new)
    new_state = (
      *state[:2],
      trace._replace(trace=new_m),
      core._replace(
        count=optax.safe_increment(core.count), z=new_z, gamma=new_gamma
      ),
    )
    return new_w, new_state

  def per_platform(choice, xla, kernels):
    """XLA's step (``choice`` False), the kernels' (True), or for None the
    kernels where the step is lowered for a GPU and XLA's elsewhere: decided
    where it is lowered, not by the default backend, so that a step jitted
    with arrays on the CPU of a machine with a GPU steps with XLA."""
    if choice is not None:
      return kernels(settings) if choice else xla()
    # Lowered for a GPU: compiled by Triton unless interpret=True.
    on_gpu = functools.partial(
      kernels, settings._replace(interpret=bool(interpret))
    )
    return jax.lax.platform_dependent(cuda=on_gpu, rocm=on_gpu, default=xla)

  # Extra keyword arguments (a loss as value=, which nnx.Optimizer passes
  # on) are accepted and ignored, as by dessilbi.
  def update_fn(updates, state, params=None, **extra_args):
    return per_platform(
      use_pallas(updates, state, params),
      lambda: reference.update(updates, state, params, **extra_args),
      lambda s: run(updates, state, params, apply=False, settings=s),
    )

  def step_fn(grads, state, params, **extra_args):
    def xla():
      updates, new_state = reference.update(grads, state, params, **extra_args)
      return optax.apply_updates(params, updates), new_state

    return per_platform(
      use_pallas(grads, state, params),
      xla,
      lambda s: run(grads, state, params, apply=True, settings=s),
    )

  return FusedDessilbi(init_fn, update_fn, step_fn)


@functools.cache
def _triton_backend() -> bool:
  """Whether this JAX has Pallas's Triton backend (deprecated in JAX 0.12
  in favour of Mosaic GPU)."""
  try:
    from jax.experimental.pallas import triton  # noqa: F401
  except ImportError:
    return False
  return True


def _gpu_backend() -> bool:
  """Whether this process has a GPU backend, default or not."""
  try:
    return bool(jax.devices('gpu'))
  except RuntimeError:
    return False


def _explicit_mesh(trees: Any) -> Any:
  """The mesh with explicit axes (sharding in types) that the arrays of
  ``trees`` are typed on: the current mesh, or outside ``jax.set_mesh`` the
  mesh in the arrays' types; None if neither has explicit axes."""
  explicit = jax.sharding.AxisType.Explicit

  def has_explicit(mesh):
    return any(kind == explicit for kind in getattr(mesh, 'axis_types', ()))

  meshes = [jax.sharding.get_abstract_mesh()] + [
    getattr(getattr(jax.typeof(x), 'sharding', None), 'mesh', None)
    for x in jax.tree.leaves(trees)
  ]
  return next((mesh for mesh in meshes if has_explicit(mesh)), None)


def _sharded(grads, state, params) -> Optional[str]:
  """The first array whose type is sharded along an explicit mesh axis,
  named with its spec, or None."""
  for label, tree in (('params', params), ('grads', grads), ('state', state)):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      spec = getattr(getattr(jax.typeof(x), 'sharding', None), 'spec', None)
      if spec is not None and any(axis is not None for axis in spec):
        name = path_str(path) or '(the root)'
        return f'{label} {name!r} is sharded as {spec}'
  return None


class _Settings(NamedTuple):
  tile_rows: int
  num_warps: int
  interpret: Optional[bool]


def _parts(state):
  """The momentum and the DessiLBI core of a ``dessilbi`` state."""
  if (
    not isinstance(state, tuple)
    or len(state) != 4
    or not isinstance(state[2], optax.TraceState)
    or not isinstance(state[3], DessiLBIState)
  ):
    raise TypeError(
      'state must be the state fused_dessilbi.init (or dessilbi with a '
      f'momentum) returned; got {type(state).__name__}.'
    )
  return state[2], state[3]


def _check_groupings(params, penalties) -> None:
  """The kernels take a group lasso's groups along the leaf's last axis."""
  for (path, w), choice in zip(
    jax.tree_util.tree_flatten_with_path(params)[0], penalties, strict=True
  ):
    if not isinstance(choice, GroupLasso):
      continue
    spans = tuple(choice.reduce_axes(w.ndim))
    if spans != tuple(range(w.ndim - 1)):
      raise ValueError(
        'penalty: fused_dessilbi supports group lassos with one group per '
        f'index of the last axis (a filter per output channel); leaf '
        f'{path_str(path)!r} of shape {tuple(w.shape)} has groups spanning '
        f'axes {spans} (use dessilbi).'
      )


_FLOATS = ('float32', 'bfloat16', 'float16')


def _check_dtypes(trees, state) -> None:
  for tree, what in ((trees, 'params and gradients'), (state, 'state')):
    for x in jax.tree.leaves(tree):
      # As JAX types it (NumPy float64 is float32 without x64); abstract
      # arrays (jax.ShapeDtypeStruct) too.
      dtype = str(jnp.result_type(x))
      if jnp.issubdtype(dtype, jnp.floating) and dtype not in _FLOATS:
        raise TypeError(
          f'fused_dessilbi supports float32, bfloat16 and float16 {what}; '
          f'got {dtype} (use dessilbi).'
        )


def _decay_flags(mask_fn, grads, treedef) -> list[bool]:
  """Per leaf: decayed or not, from the mask (function or tree) as
  ``optax.add_decayed_weights`` reads it at an update (a function of the
  gradients); it must be concrete."""
  mask = mask_fn(grads) if callable(mask_fn) else mask_fn
  full = jax.tree.map(
    lambda m, sub: jax.tree.map(lambda _: m, sub), mask, grads
  )
  flags = []
  for m in treedef.flatten_up_to(full):
    try:
      flags.append(bool(m))
    except jax.errors.ConcretizationTypeError:
      raise TypeError(
        'weight_decay_mask: fused_dessilbi needs the mask as Python or '
        'concrete bools (it decides the kernels); got a traced value.'
      ) from None
  return flags


def _in_dtype(value: float, dtype) -> float:
  """``value`` rounded to ``dtype`` (a threshold, as the shrinkage reads
  it), computed on the host."""
  return float(np.asarray(value, np.float64).astype(dtype))


class _Hyper(NamedTuple):
  """The hyper-parameters as ``dessilbi`` reads them at a step: Python
  numbers (weakly typed) or arrays."""

  momentum: Any
  weight_decay: Any
  state_dtype: Any
  store_gamma: bool
  learning_rate: Any
  step: Any  # κ·α
  nu: Any


def _scalar_dtypes(hyper, d_dtype, m, w, z, choice) -> tuple:
  """By scalar (``_STEP``, ...): the dtype ``dessilbi``'s chain multiplies
  (or divides) by it in, for one leaf. A weakly typed hyper-parameter takes
  the array's dtype there, so a bfloat16 momentum is updated with β rounded
  to bfloat16 (0.9 -> 0.8984375); the kernels round it alike."""
  dtypes = [np.dtype(np.float32)] * 6
  dtypes[_DECAY] = jnp.result_type(hyper.weight_decay, w)
  dtypes[_MOMENTUM] = jnp.result_type(hyper.momentum, m)
  if choice is None:  # W's update -step·d
    dtypes[_STEP] = jnp.result_type(hyper.step, d_dtype)
    return tuple(dtypes)
  # -step·(d + (W - Γ)/ν), z + (α/ν)·(W - Γ) with α/ν in z's precision at
  # least, Γ = κ·Prox(z) with κ in z's dtype.
  dtypes[_NU] = jnp.result_type(jnp.promote_types(w.dtype, z.dtype), hyper.nu)
  inner = jnp.promote_types(d_dtype, dtypes[_NU])
  dtypes[_STEP] = jnp.result_type(hyper.step, inner)
  dtypes[_Z_STEP] = jnp.promote_types(
    jnp.result_type(hyper.learning_rate, hyper.nu), z.dtype
  )
  dtypes[_KAPPA] = z.dtype
  return tuple(dtypes)


def _layout(columns, penalties, decay, tiles, hyper, per_call):
  """The leaves' static layout: longest programs first, at most
  ``per_call`` leaves to a ``pallas_call``."""
  # optax.add_decayed_weights skips a literal 0 (no dtype promotion either).
  weight_decay = hyper.weight_decay
  no_decay = isinstance(weight_decay, (int, float)) and weight_decay == 0
  leaves = []
  for g, m, w, z, gamma, choice, decayed in zip(
    *columns, penalties, decay, strict=True
  ):
    decayed = decayed and not no_decay
    # The dtypes optax's add_decayed_weights and trace give (a Python float
    # hyper-parameter is weakly typed and promotes nothing); trace casts the
    # momentum it keeps to state_dtype, not the direction it passes on.
    decay_dtype = jnp.result_type(g, weight_decay, w)
    d_dtype = jnp.result_type(
      decay_dtype if decayed else g.dtype, hyper.momentum, m
    )
    m_dtype = (
      # As JAX types it: float64 is float32 without x64, as in dessilbi.
      d_dtype
      if hyper.state_dtype is None
      else jax.dtypes.canonicalize_dtype(hyper.state_dtype)
    )
    scalar_dtypes = _scalar_dtypes(hyper, d_dtype, m, w, z, choice)
    dtypes = (decay_dtype, d_dtype, m_dtype, scalar_dtypes)
    lam, storage = None, (True, True)
    if choice is None:
      kind = 'plain'
    elif isinstance(choice, Lasso):
      kind = 'lasso'
      lam = _in_dtype(choice.lam, z.dtype)  # as soft_threshold rounds it
    elif w.ndim == 0:  # a group of one scalar: its shrinkage is a lasso's
      kind = 'lasso'
      lam = _in_dtype(group_threshold(choice, w.shape), z.dtype)
    else:
      kind = 'group'
      lam = _in_dtype(group_threshold(choice, w.shape), z.dtype)
      # Read as the state holds it; written as this optimizer keeps it
      # (Γ itself for groups of one weight).
      rows = math.prod(w.shape[:-1])
      storage = (gamma.shape == z.shape, hyper.store_gamma or rows == 1)
    if math.prod(w.shape) == 0:
      kind = 'empty'
    leaves.append(_Leaf(kind, w.shape, dtypes, lam, decayed, storage, tiles))
  # A call steps leaves of one kind, group lassos or the others (its
  # registers then suit them), at most per_call of them: Triton's compile
  # time grows with the square of a kernel's size. Leaves are dealt to the
  # fewest calls largest first, so that each has a share of the programs.
  # The GPU starts programs in id order: long ones started last would run on
  # alone at the end, so each call numbers its longest first.
  calls = 0
  for grouped in (True, False):
    kind = [
      x for x in leaves if x.kind != 'empty' and (x.kind == 'group') == grouped
    ]
    count = -(-len(kind) // per_call)
    kind.sort(key=lambda leaf: -leaf.programs * leaf.work)
    for n in range(count):
      start = 0
      for leaf in sorted(kind[n::count], key=lambda leaf: -leaf.work):
        leaf.call, leaf.start = calls + n, start
        start += leaf.programs
    calls += count
  return leaves


def _pallas_step(leaves, scalars, columns, settings, apply):
  """Runs the two kernels; per leaf: W (or its update), m, z and Γ (or the
  scale) as the state lays them out."""
  from jax.experimental import pallas as pl
  from jax.experimental.pallas import triton as plt

  kernels = _Kernels(pl, plt, settings.tile_rows, apply)
  interpret = settings.interpret
  if interpret is None:
    interpret = jax.default_backend() != 'gpu'

  def call(body, ins, out_shape, programs, aliases, name):
    any_spec = pl.BlockSpec(memory_space=pl.ANY)
    return pl.pallas_call(
      body,
      out_shape=out_shape,
      grid=(programs,),
      input_output_aliases=aliases,
      in_specs=[any_spec] * len(ins),
      out_specs=[any_spec] * len(out_shape),
      compiler_params=plt.CompilerParams(num_warps=settings.num_warps),
      interpret=interpret,
      name=name,
    )(*ins)

  # The first kernel: every leaf but those of size 0, in the calls the
  # layout numbered.
  per_leaf = {}
  active = [k for k, leaf in enumerate(leaves) if leaf.kind != 'empty']
  calls = 1 + max((leaves[k].call for k in active), default=-1)
  batches = [[k for k in active if leaves[k].call == n] for n in range(calls)]
  for batch in batches:
    outs = _first_call(
      call,
      kernels,
      [leaves[k] for k in batch],
      [[c[k] for c in columns] for k in batch],
      scalars,
    )
    it = iter(outs)
    for k in batch:
      per_leaf[k] = [
        next(it) for _ in range(2 if leaves[k].kind == 'plain' else 4)
      ]
  # The second kernel: the group-lasso leaves' norms, then Γ or the scale,
  # for the leaves of each call of the first.
  for batch in batches:
    if leaves[batch[0]].kind != 'group':
      continue
    written = _second_call(
      call,
      kernels,
      [leaves[k] for k in batch],
      [(columns[4][k], per_leaf[k]) for k in batch],
      scalars,
    )
    for k, value in zip(batch, written, strict=True):
      per_leaf[k][3] = value
  # Back to the leaves' shapes; a leaf of size 0 has nothing to compute.
  new_w, new_m, new_z, new_gamma = [], [], [], []
  for k, (leaf, w, z, gamma) in enumerate(
    zip(leaves, columns[2], columns[3], columns[4], strict=True)
  ):
    if leaf.kind == 'empty':
      new_m.append(jnp.zeros(leaf.shape, leaf.m_dtype))
      new_w.append(w if apply else jnp.zeros_like(w))
      new_z.append(z)
      shape = leaf.shape if leaf.gamma_out_full else leaf.scale_shape
      new_gamma.append(jnp.zeros(shape, z.dtype) if leaf.coupled else gamma)
      continue
    new = per_leaf[k]
    new_m.append(new[0].reshape(leaf.shape))
    new_w.append(new[1].reshape(leaf.shape))
    if leaf.kind == 'plain':
      new_z.append(z)
      new_gamma.append(gamma)
      continue
    new_z.append(new[2].reshape(leaf.shape))
    shape = leaf.shape if leaf.gamma_out_full else leaf.scale_shape
    new_gamma.append(new[3].reshape(shape))
  return new_w, new_m, new_z, new_gamma


def _first_call(call, kernels, leaves, columns, scalars):
  """One call of the first kernel, for ``leaves`` and their (g, m, W, z, Γ):
  per leaf the new momentum and W (or its update), and but for plain leaves
  z and Γ (lasso) or the chunks' shares of the filters' squared norms."""
  ins, out_shape, aliases = [scalars], [], {}
  for leaf, (g, m, w, z, gamma) in zip(leaves, columns, strict=True):
    as2d = (
      (lambda x, leaf=leaf: x.reshape(leaf.rows, leaf.cols))
      if leaf.kind == 'group'
      else (lambda x: x.reshape(-1))
    )
    first_in, first_out = len(ins), len(out_shape)
    arrays = [as2d(g), as2d(m), as2d(w)]
    shape = arrays[0].shape
    out_shape += [
      jax.ShapeDtypeStruct(shape, leaf.m_dtype),
      jax.ShapeDtypeStruct(shape, w.dtype),
    ]
    # Written in place of their old values where the dtypes allow: each
    # element is read before the same thread writes it.
    if m.dtype == leaf.m_dtype:
      aliases[first_in + 1] = first_out
    if kernels.apply:
      aliases[first_in + 2] = first_out + 1
    if leaf.kind != 'plain':
      read = gamma.reshape(-1) if not leaf.gamma_in_full else as2d(gamma)
      arrays += [as2d(z), read]
      out_shape.append(jax.ShapeDtypeStruct(shape, z.dtype))
      aliases[first_in + 3] = first_out + 2
      if leaf.kind == 'lasso':
        out_shape.append(jax.ShapeDtypeStruct(shape, z.dtype))
        if gamma.dtype == z.dtype:
          aliases[first_in + 4] = first_out + 3
      else:  # each chunk's share of the squared norms, in rows padded to
        # the power of 2 the second kernel reads at once (never written there,
        # masked off when read; JAX refuses a static slice past the end)
        out_shape.append(
          jax.ShapeDtypeStruct((_pow2(leaf.chunks), leaf.cols), jnp.float32)
        )
    ins += arrays
  return call(
    lambda *refs: kernels.first(leaves, *refs),
    ins,
    out_shape,
    sum(leaf.programs for leaf in leaves),
    aliases,
    'dessilbi_fused',
  )


def _second_call(call, kernels, leaves, columns, scalars):
  """One call of the second kernel, for group-lasso ``leaves`` with their
  old Γ and the first kernel's outputs: per leaf the new Γ (or scale)."""
  ins, out_shape, aliases, entries = [scalars], [], {}, []
  start = 0
  for leaf, (gamma, new) in zip(leaves, columns, strict=True):
    programs = leaf.programs if leaf.gamma_out_full else leaf.tiles
    entries.append((leaf, start, programs))
    start += programs
    shape = (leaf.rows, leaf.cols) if leaf.gamma_out_full else (leaf.cols,)
    if (
      leaf.gamma_in_full == leaf.gamma_out_full and gamma.dtype == new[2].dtype
    ):
      aliases[len(ins) + 2] = len(out_shape)  # the old Γ is not read
    alias = len(ins) + 2 in aliases
    ins += [new[2], new[3], gamma.reshape(shape if alias else (-1,))]
    out_shape.append(jax.ShapeDtypeStruct(shape, new[2].dtype))
  return call(
    lambda *refs: kernels.second(entries, *refs),
    ins,
    out_shape,
    start,
    aliases,
    'dessilbi_fused_norms',
  )


class _Kernels:
  """The two kernels' bodies (Pallas Triton), for one configuration."""

  def __init__(self, pl, plt, tile_rows, apply):
    self.pl, self.plt = pl, plt
    self.tile_rows = tile_rows
    self.apply = apply

  def load(self, ref, at, mask):
    """A tile as float32 (params and state may be bfloat16 or float16)."""
    value = self.plt.load(ref.at[at], mask=mask, other=0.0)
    return value.astype(jnp.float32)

  def store(self, ref, at, value, mask):
    self.plt.store(ref.at[at], value.astype(ref.dtype), mask=mask)

  @staticmethod
  def rounded(value, dtype):
    """``value`` as an array of ``dtype`` holds it (the next computations
    read the momentum and z that optax and the state keep)."""
    return value.astype(dtype).astype(jnp.float32)

  def scalars(self, leaf, s):
    """The scalars as ``dessilbi`` computes with them for ``leaf``: each
    rounded to the dtype of its products there."""
    return [
      x if dtype == jnp.float32 else self.rounded(x, dtype)
      for x, dtype in zip(s, leaf.scalar_dtypes, strict=True)
    ]

  def written(self, w, update, dtype):
    """W's update rounded to W's dtype (as ``optax.apply_updates`` adds
    it), or with ``apply`` the new W."""
    update = self.rounded(update, dtype)
    return w + update if self.apply else update

  def direction(self, leaf, s, g, m, w, at, mask, m_ref):
    """Stores the new momentum ``β·m + g (+ wd·W)`` and returns it as
    ``optax.trace`` passes it on (before the cast to the state's dtype)."""
    if leaf.decayed:  # optax.add_decayed_weights, in its dtype
      g = self.rounded(g + s[_DECAY] * w, leaf.decay_dtype)
    d = self.rounded(g + s[_MOMENTUM] * m, leaf.d_dtype)
    self.store(m_ref, at, d, mask)
    return d

  def first(self, leaves, scalars_ref, *refs):
    pl = self.pl
    pid = pl.program_id(0)
    s = [self.plt.load(scalars_ref.at[pl.ds(i, 1)]) for i in range(6)]
    it = iter(refs)  # every leaf's inputs, then every leaf's outputs
    ins = [
      [next(it) for _ in range(3 if x.kind == 'plain' else 5)] for x in leaves
    ]
    outs = [
      [next(it) for _ in range(2 if x.kind == 'plain' else 4)] for x in leaves
    ]
    for leaf, i, o in zip(leaves, ins, outs, strict=True):
      inside = (pid >= leaf.start) & (pid < leaf.start + leaf.programs)
      body = self.group if leaf.kind == 'group' else self.flat
      args = (leaf, pid - leaf.start, self.scalars(leaf, s), i, o)
      pl.when(inside)(lambda b=body, a=args: b(*a))

  def flat(self, leaf, b, s, ins, outs):
    pl = self.pl
    block = leaf.block
    off = b * block
    mask = off + jnp.arange(block) < leaf.size
    at = pl.ds(off, block)
    g, m, w, *zg = (self.load(r, at, mask) for r in ins)
    d = self.direction(leaf, s, g, m, w, at, mask, outs[0])
    if leaf.kind == 'plain':
      self.store(
        outs[1], at, self.written(w, -s[_STEP] * d, outs[1].dtype), mask
      )
      return
    z, gamma = zg
    diff = w - gamma
    update = -s[_STEP] * (d + diff / s[_NU])
    self.store(outs[1], at, self.written(w, update, outs[1].dtype), mask)
    z = self.rounded(z + s[_Z_STEP] * diff, outs[2].dtype)
    self.store(outs[2], at, z, mask)
    shrunk = jnp.sign(z) * jnp.maximum(jnp.abs(z) - leaf.lam, 0)
    self.store(outs[3], at, s[_KAPPA] * shrunk, mask)

  def tiles(self, leaf, t, c):
    """Filter tile ``t``, row chunk ``c``: ``tile(i) -> (index, mask)`` for
    its row tiles, and how many there are."""
    pl, rows_per = self.pl, self.tile_rows
    c0 = t * leaf.tile
    cols = c0 + jnp.arange(leaf.tile)[None, :]
    r_base = c * leaf.chunk

    def tile(i):
      r0 = r_base + i * rows_per
      rows = r0 + jnp.arange(rows_per)[:, None]
      mask = (rows < leaf.rows) & (cols < leaf.cols)
      return (pl.ds(r0, rows_per), pl.ds(c0, leaf.tile)), mask

    return tile, -(-leaf.chunk // rows_per)

  def group(self, leaf, b, s, ins, outs):
    pl = self.pl
    t, c = b // leaf.chunks, b % leaf.chunks
    c0 = t * leaf.tile
    cols = c0 + jnp.arange(leaf.tile)[None, :]
    tile, n_iter = self.tiles(leaf, t, c)

    def update(i, sq):
      at, mask = tile(i)
      g, m, w, z = (self.load(r, at, mask) for r in ins[:4])
      if leaf.gamma_in_full:
        gamma = self.load(ins[4], at, mask)
      else:  # the per-filter scale: Γ = z · scale
        scale = self.load(ins[4], pl.ds(c0, leaf.tile), cols[0] < leaf.cols)
        gamma = z * scale[None, :]
      d = self.direction(leaf, s, g, m, w, at, mask, outs[0])
      diff = w - gamma
      update = -s[_STEP] * (d + diff / s[_NU])
      self.store(outs[1], at, self.written(w, update, outs[1].dtype), mask)
      z = self.rounded(z + s[_Z_STEP] * diff, outs[2].dtype)
      self.store(outs[2], at, z, mask)
      return sq + z * z

    # Squares summed per position, reduced across rows once after the loop
    # (a reduction inside it would synchronise the warps every iteration).
    zeros = jnp.zeros((self.tile_rows, leaf.tile), jnp.float32)
    sq = jnp.sum(jax.lax.fori_loop(0, n_iter, update, zeros), axis=0)
    at = (pl.ds(c, 1), pl.ds(c0, leaf.tile))
    self.store(outs[3], at, sq[None, :], cols < leaf.cols)

  def second(self, entries, scalars_ref, *refs):
    """``entries``: (leaf, first program, programs) per group-lasso leaf."""
    pl = self.pl
    pid = pl.program_id(0)
    kappa = self.plt.load(scalars_ref.at[pl.ds(_KAPPA, 1)])
    ins, outs = refs[: 3 * len(entries)], refs[3 * len(entries) :]
    for n, (leaf, start, programs) in enumerate(entries):
      inside = (pid >= start) & (pid < start + programs)
      dtype = leaf.scalar_dtypes[_KAPPA]
      k = kappa if dtype == jnp.float32 else self.rounded(kappa, dtype)
      args = (leaf, pid - start, k, ins[3 * n : 3 * n + 3], outs[n])
      pl.when(inside)(lambda a=args: self.norms(*a))

  def norms(self, leaf, b, kappa, ins, gamma_ref):
    """The filters' norms from the chunks' shares, then Γ for one chunk of
    rows (or the per-filter scale)."""
    pl = self.pl
    z_ref, shares_ref = ins[:2]
    full = leaf.gamma_out_full
    t, c = (b // leaf.chunks, b % leaf.chunks) if full else (b, 0)
    c0 = t * leaf.tile
    cols = c0 + jnp.arange(leaf.tile)[None, :]
    chunks = _pow2(leaf.chunks)
    mask = (jnp.arange(chunks)[:, None] < leaf.chunks) & (cols < leaf.cols)
    at = (pl.ds(0, chunks), pl.ds(c0, leaf.tile))
    sq = jnp.sum(self.load(shares_ref, at, mask), axis=0)
    nonzero = sq > 0
    norm = jnp.sqrt(jnp.where(nonzero, sq, 1.0))
    factor = jnp.where(nonzero & (norm > leaf.lam), 1 - leaf.lam / norm, 0.0)
    scale = kappa * factor
    if not full:
      self.store(gamma_ref, pl.ds(c0, leaf.tile), scale, cols[0] < leaf.cols)
      return
    tile, n_iter = self.tiles(leaf, t, c)

    def write(j, carry):
      # Backwards: the tiles of z written last are the likeliest in cache.
      at, mask = tile(n_iter - 1 - j)
      z = self.load(z_ref, at, mask)
      self.store(gamma_ref, at, z * scale[None, :], mask)
      return carry

    jax.lax.fori_loop(0, n_iter, write, 0)
