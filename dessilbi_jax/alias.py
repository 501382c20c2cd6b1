"""The full DessiLBI optimizer: Optax's momentum and weight decay + the core."""

from collections.abc import Callable
from typing import Any, Optional, Union

import jax
import jax.numpy as jnp
import optax

from dessilbi_jax import _checks
from dessilbi_jax.penalties import PenaltyRule
from dessilbi_jax.transform import scale_by_dessilbi


def matrix_mask(params: optax.Params) -> Any:
  """Weight-decay mask of the reference: True for leaves of rank >= 2.

  Biases and normalisation parameters (rank <= 1) are not decayed. The
  reference reads names and ranks (it decays what is not of rank 1 and whose
  name lacks ``'bn'``): the two agree on biases, norm parameters and kernels
  whose path does not hold ``'bn'``; a scalar (rank 0), which the reference
  decays, is left out here.
  """
  return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def _check_gradients(mask: Any) -> optax.GradientTransformation:
  """Passes updates through after checking them against the params.

  Heads the chain of :func:`dessilbi`, so that a gradient of the wrong shape
  or dtype is reported before weight decay and momentum broadcast it; its
  ``init`` checks the weight-decay mask against the params.
  """

  def init_fn(params):
    if _checks.is_map_params_placeholder(params):
      # optax.tree.map_params initialises with a leafless placeholder for
      # the params, which no mask tree is laid out like.
      return optax.EmptyState()
    _checks.check_param_arrays(params)  # before the mask reads them
    tree = mask(params) if callable(mask) else mask
    _checks.check_mask_tree(tree, params, from_function=callable(mask))
    return optax.EmptyState()

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(_checks.NO_PARAMS_MSG)
    if not isinstance(state, optax.EmptyState):
      # A state restored without a target (Orbax: lists, dicts and None)
      # would fail in the transformations after this one, unclearly.
      raise TypeError(
        'state must be the state that init returned (a tuple of Optax '
        f"states, this check's first: optax.EmptyState()); got "
        f'{type(state).__name__} in its place; {_checks.RESTORE_HINT}.'
      )
    _checks.check_gradients(updates, params)
    return updates, state

  return optax.GradientTransformation(init_fn, update_fn)


def dessilbi(
  learning_rate: optax.ScalarOrSchedule,
  kappa: jax.typing.ArrayLike = 1.0,
  nu: jax.typing.ArrayLike = 100.0,
  momentum: Optional[jax.typing.ArrayLike] = 0.9,
  nesterov: bool = False,
  weight_decay: jax.typing.ArrayLike = 0.0,
  weight_decay_mask: Optional[Union[Any, Callable[[optax.Params], Any]]] = None,
  penalty: Optional[PenaltyRule] = None,
  state_dtype: Optional[jax.typing.DTypeLike] = None,
  freeze: bool = False,
  store_gamma: bool = True,
) -> optax.GradientTransformationExtraArgs:
  r"""DessiLBI: SGD with momentum on a coupled loss, with a sparse path Γ.

  The optimizer of the reference implementation, built from Optax's pieces:
  ``optax.chain(optax.add_decayed_weights(weight_decay, mask),
  optax.trace(momentum, nesterov), scale_by_dessilbi(...))``, headed by a
  check of the gradients against the params. The direction is
  ``d = m`` with ``m ← β·m + g + wd·W`` (PyTorch-SGD momentum, weight decay
  inside the buffer; ``d = g + wd·W + β·m`` with Nesterov), and the core
  applies the linearized Bregman step of :func:`scale_by_dessilbi`:

  .. math::
    W^+ - W &= -κα \left(d + \frac{W - Γ}{ν}\right) \\
    z^+ &= z + \frac{α}{ν} (W - Γ), \qquad Γ^+ = κ \operatorname{Prox}_Ω(z^+)

  Reference settings: κ = 1, ν = 100 (20 for LeNet/MNIST, 100–500 on
  CIFAR, 1000 on ImageNet), momentum 0.9, weight decay 0 (1e-4–5e-4 on CIFAR).

  Args:
    learning_rate: the step size α, a float or a schedule of the step count.
    kappa: κ > 0, scales W's step and Γ's magnitude.
    nu: ν > 0, the coupling strength between W and Γ.
    momentum: β in [0, 1), or None for no momentum buffer.
    nesterov: use Nesterov momentum (the reference's lottery variant).
    weight_decay: coefficient of the L2 term added to the gradient, >= 0.
    weight_decay_mask: pytree of bools laid out like the params or a prefix
      of them (or a function of the params returning one) choosing the
      leaves to decay; None for :func:`matrix_mask` (leaves of rank >= 2, as
      in the reference). A single bool for params laid out as a tree is
      refused at ``init`` (it is what a mask function forgotten in
      ``optax.inject_hyperparams``'s ``static_args`` gives); a function may
      return one (``lambda params: True`` decays every leaf).
    penalty: rule ``(path, leaf) -> Penalty | None`` choosing the coupled
      leaves and their penalty; None for :func:`~dessilbi_jax.default_penalty`.
    state_dtype: dtype of the momentum buffer, z and Γ; None for the params'
      (for z and Γ; the momentum buffer is ``optax.trace``'s, which promotes
      it to the gradients' dtype when that is wider, e.g. float32 gradients
      for bfloat16 params: pass ``state_dtype`` to keep it fixed, as
      ``lax.scan`` and ``optax.MultiSteps`` need).
    freeze: stop the filters of W* (groups where ``Γ ≠ 0`` and ``W ≠ 0``)
      from moving, as the reference's ``step_with_freeze`` does; see
      :func:`scale_by_dessilbi`.
    store_gamma: keep Γ in the state (default), or rebuild it from z and a
      per-group factor (less memory, same path; read Γ with
      :func:`~dessilbi_jax.get_gamma`).

  Returns:
    An :class:`optax.GradientTransformationExtraArgs`; its state is a tuple
    whose last entry is the :class:`~dessilbi_jax.DessiLBIState` (find Γ with
    ``optax.tree.get(state, 'gamma')``).

  Raises:
    ValueError: a hyper-parameter out of range (``learning_rate`` or
      ``weight_decay`` < 0, ``kappa`` or ``nu`` not > 0, ``momentum``
      outside [0, 1)) or not finite. ``init`` and
      ``update`` raise ValueError or TypeError for params, gradients or a
      state that do not fit (the message names the leaf), ValueError for a
      ``kappa`` or ``nu`` that rounds to inf (or ``nu`` to 0) in the
      state's dtype.
    TypeError: a hyper-parameter that is not a real scalar (or, for
      ``learning_rate``, a schedule), a ``penalty`` that is not a rule, a
      ``state_dtype`` that is not floating-point, a ``weight_decay_mask``
      that is not None, a function or a tree, or a ``nesterov``, ``freeze``
      or ``store_gamma`` that is not a bool.

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import dessilbi_jax as dl
    >>> target = jnp.array([[3.0, 0.0], [0.0, -2.0]])
    >>> loss = lambda w: jnp.sum((w - target) ** 2)
    >>> tx = dl.dessilbi(learning_rate=0.05, nu=1.0)
    >>> w = jnp.zeros((2, 2))
    >>> state = tx.init(w)
    >>> for _ in range(200):
    ...   updates, state = tx.update(jax.grad(loss)(w), state, w)
    ...   w = optax.apply_updates(w, updates)
    >>> print(jnp.round(w, 2))
    [[ 3.  0.]
     [ 0. -2.]]
    >>> print(optax.tree.get(state, 'gamma') != 0)
    [[ True False]
     [False  True]]

  References:
    Fu et al., `DessiLBI: Exploring Structural Sparsity of Deep Networks via
    Differential Inclusion Paths <https://proceedings.mlr.press/v119/fu20d.html>`_,
    ICML 2020.
  """
  _checks.check_learning_rate(learning_rate)
  if momentum is not None:
    _checks.check_unit_interval('momentum', momentum)
  _checks.check_non_negative('weight_decay', weight_decay)
  nesterov = _checks.check_bool('nesterov', nesterov)
  if nesterov and momentum is None:
    raise ValueError('nesterov=True needs a momentum, got momentum=None.')
  core = scale_by_dessilbi(
    learning_rate=learning_rate,
    kappa=kappa,
    nu=nu,
    penalty=penalty,
    state_dtype=state_dtype,
    freeze=freeze,
    store_gamma=store_gamma,
  )
  mask = matrix_mask if weight_decay_mask is None else weight_decay_mask
  if not callable(mask):
    _checks.check_mask_leaves(mask)
  parts = [
    _check_gradients(mask),
    optax.add_decayed_weights(weight_decay, mask),
  ]
  if momentum is not None:
    parts.append(
      optax.trace(
        decay=momentum, nesterov=nesterov, accumulator_dtype=state_dtype
      )
    )
  parts.append(core)
  chain = optax.chain(*parts)
  if momentum is None:
    return chain

  def update_fn(updates, state, params=None, **extra_args):
    # The momentum buffer, checked before optax.trace broadcasts against it
    # (a buffer of another model would fail there with a pytree error).
    trace = state[2] if isinstance(state, tuple) and len(state) == 4 else None
    if params is not None and isinstance(trace, optax.TraceState):
      _checks.check_params_shaped(
        'state: the momentum (optax.trace)', trace.trace, params
      )
    return chain.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)
