"""Sparse-path training of a small CNN on scikit-learn's digits with DessiLBI.

DessiLBI trains the dense weights W by SGD with momentum on a loss coupled to a
sparse structure Γ, and Γ grows along a path from empty: a convolution filter
(or a Dense weight) enters the model's structure when its Γ group becomes
non-zero. This script trains a two-layer Flax NNX convnet on the 8x8 digits
bundled with scikit-learn (1797 images, no download) and reports, after each
epoch, the test accuracy of the dense weights W, the test accuracy of the
sparse weights W* (W with every entry outside Γ's support set to zero, the
biases and normalisation parameters kept), and how many filters and weights
are selected in each layer.

Run::

  python examples/train_digits.py              # defaults: ~5 s on 2 CPU cores
  python examples/train_digits.py --nu 8 --schedule constant --epochs 50 \
    --out runs/nu8                             # a slower path

It writes ``<out>/metrics.json`` with the configuration and one record per
epoch.
"""

import argparse
import json
import pathlib
import time
from collections.abc import Sequence
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

import dessilbi_jax as dl

NUM_CLASSES = 10


# ----------------------------------------------------------------------------
# Data.


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """The digits, split 75/25 (stratified, seed 0), as NHWC float32 images.

  Pixels (0..16) are scaled to [0, 1], then standardised with the mean and
  standard deviation of the training images.
  """
  digits = load_digits()
  images = digits.images.astype(np.float32) / 16.0
  labels = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = train_test_split(
    images, labels, test_size=0.25, stratify=labels, random_state=0
  )
  mean, std = x_train.mean(), x_train.std()
  x_train = ((x_train - mean) / std)[..., None]
  x_test = ((x_test - mean) / std)[..., None]
  return x_train, y_train, x_test, y_test


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, rng):
  """Shuffled full batches of one epoch (the last incomplete one is dropped)."""
  order = rng.permutation(len(x))
  for i in range(len(x) // batch_size):
    idx = order[i * batch_size : (i + 1) * batch_size]
    yield x[idx], y[idx]


# ----------------------------------------------------------------------------
# Model.


class CNN(nnx.Module):
  """conv-bn-relu-pool twice, then a linear classifier (8x8 -> 4x4 -> 2x2)."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
    self.bn1 = nnx.BatchNorm(16, rngs=rngs)
    self.conv2 = nnx.Conv(16, 32, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(32, rngs=rngs)
    self.fc = nnx.Linear(2 * 2 * 32, NUM_CLASSES, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.bn1(self.conv1(x)))
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    x = nnx.relu(self.bn2(self.conv2(x)))
    x = nnx.max_pool(x, (2, 2), strides=(2, 2))
    return self.fc(x.reshape(x.shape[0], -1))


@nnx.jit
def train_step(
  model: CNN, optimizer: nnx.Optimizer, x: jax.Array, y: jax.Array
) -> jax.Array:
  def loss_fn(model):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


@nnx.jit
def accuracy(model: CNN, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(model(x), axis=-1) == y)


# ----------------------------------------------------------------------------
# The sparse structure Γ.


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def get_gamma(optimizer: nnx.Optimizer) -> nnx.State:
  """Γ as arrays, laid out like the params; uncoupled leaves are MaskedNode."""
  return nnx.as_pure(optax.tree.get(optimizer.opt_state, 'gamma'))


def sparse_params(params: nnx.State, gamma: nnx.State) -> nnx.State:
  """W*: W zeroed outside Γ's support; uncoupled leaves (biases...) are kept.

  Γ's uncoupled leaves are ``optax.MaskedNode()`` (an empty pytree), hence the
  ``is_leaf``: the map runs over Γ's structure, with W's leaves beside it.
  """
  return jax.tree.map(
    lambda g, w: w if _is_masked(g) else jnp.where(g != 0, w, 0),
    gamma,
    params,
    is_leaf=_is_masked,
  )


def selected_counts(gamma: nnx.State) -> dict[str, dict[str, Any]]:
  """Selected / total per coupled layer: conv filters, or Dense weights.

  A conv filter (the last axis of an HWIO kernel, the default penalty's group)
  is selected when its Γ group is non-zero; a Dense weight when its Γ entry is.
  """
  out = {}
  for path, g in jax.tree_util.tree_leaves_with_path(gamma, is_leaf=_is_masked):
    if _is_masked(g):
      continue
    g = np.asarray(g)
    layer = dl.path_str(path).split('/')[0]
    if g.ndim >= 3:
      nonzero = np.any(g != 0, axis=tuple(range(g.ndim - 1)))
      unit = 'filters'
    else:
      nonzero = g != 0
      unit = 'weights'
    out[layer] = {
      'selected': int(nonzero.sum()),
      'total': int(nonzero.size),
      'unit': unit,
    }
  return out


def format_counts(counts: dict[str, dict[str, Any]]) -> str:
  """E.g. ``'conv1 5/16 conv2 12/32 filters, fc 130/1280 weights'``."""
  runs: list[tuple[str, list[str]]] = []
  for layer, c in counts.items():
    if not runs or runs[-1][0] != c['unit']:
      runs.append((c['unit'], []))
    runs[-1][1].append(f'{layer} {c["selected"]}/{c["total"]}')
  return ', '.join(' '.join(parts) + f' {unit}' for unit, parts in runs)


# ----------------------------------------------------------------------------
# Training.


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__.split('\n\n')[0],
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  p.add_argument('--epochs', type=int, default=30, help='passes over the data')
  p.add_argument('--batch-size', type=int, default=64, help='images per step')
  p.add_argument('--lr', type=float, default=0.1, help='peak learning rate α')
  p.add_argument(
    '--schedule',
    choices=('cosine', 'constant'),
    default='cosine',
    help='learning-rate schedule over all steps',
  )
  p.add_argument('--kappa', type=float, default=1.0, help='κ')
  p.add_argument(
    '--nu',
    type=float,
    default=3.0,
    help='ν; smaller ν grows Γ faster (the path here has only ~630 steps)',
  )
  p.add_argument('--momentum', type=float, default=0.9, help='β')
  p.add_argument(
    '--weight-decay', type=float, default=0.0, help='L2 on kernels'
  )
  p.add_argument('--seed', type=int, default=0, help='init and shuffling')
  p.add_argument(
    '--out',
    type=pathlib.Path,
    default=pathlib.Path('runs/digits'),
    help='folder of metrics.json',
  )
  p.add_argument('--no-progress', action='store_true', help='no tqdm bar')
  args = p.parse_args(argv)
  if args.epochs < 1:
    p.error('--epochs must be >= 1')
  if args.batch_size < 1:
    p.error('--batch-size must be >= 1')
  return args


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Trains, writes ``<out>/metrics.json`` and returns the last epoch's record.

  The record has ``epoch``, ``loss`` (mean training loss of the epoch),
  ``acc`` (dense test accuracy), ``wstar_acc`` (test accuracy of W*),
  ``selected`` (per layer: selected, total, unit) and ``time_s``; the returned
  dict adds ``metrics_path``.
  """
  args = parse_args(argv)
  x_train, y_train, x_test, y_test = load_data()
  if args.batch_size > len(x_train):
    raise SystemExit(f'--batch-size must be <= {len(x_train)} (the train set)')
  steps_per_epoch = len(x_train) // args.batch_size
  total_steps = args.epochs * steps_per_epoch

  if args.schedule == 'cosine':
    learning_rate = optax.cosine_decay_schedule(args.lr, total_steps)
  else:
    learning_rate = args.lr
  tx = dl.dessilbi(
    learning_rate=learning_rate,
    kappa=args.kappa,
    nu=args.nu,
    momentum=args.momentum,
    weight_decay=args.weight_decay,
  )
  model = CNN(rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  data_rng = np.random.default_rng(args.seed)
  x_test_dev, y_test_dev = jnp.asarray(x_test), jnp.asarray(y_test)

  n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  print(
    f'digits: {len(x_train)} train / {len(x_test)} test, '
    f'{n_params} parameters, {steps_per_epoch} steps/epoch, '
    f'device {jax.devices()[0].platform}'
  )
  print(
    f'dessilbi: lr {args.lr} ({args.schedule}), kappa {args.kappa}, '
    f'nu {args.nu}, momentum {args.momentum}, weight decay {args.weight_decay}'
  )

  history = []
  start = time.perf_counter()
  bar = tqdm(range(1, args.epochs + 1), desc='epochs', disable=args.no_progress)
  for epoch in bar:
    model.train()
    losses = []
    for xb, yb in batches(x_train, y_train, args.batch_size, data_rng):
      xb, yb = jax.device_put((xb, yb))
      losses.append(train_step(model, optimizer, xb, yb))
    loss = float(jnp.mean(jnp.stack(losses)))

    model.eval()  # BatchNorm uses its running statistics
    acc = float(accuracy(model, x_test_dev, y_test_dev))
    gamma = get_gamma(optimizer)
    wstar_model = nnx.clone(model)
    nnx.update(
      wstar_model,
      sparse_params(nnx.as_pure(nnx.state(model, nnx.Param)), gamma),
    )
    wstar_acc = float(accuracy(wstar_model, x_test_dev, y_test_dev))
    counts = selected_counts(gamma)

    record = {
      'epoch': epoch,
      'loss': loss,
      'acc': acc,
      'wstar_acc': wstar_acc,
      'selected': counts,
      'time_s': time.perf_counter() - start,
    }
    history.append(record)
    bar.set_postfix(loss=f'{loss:.3f}', acc=f'{acc:.3f}')
    tqdm.write(
      f'epoch {epoch:3d}  loss {loss:.4f}  acc {acc:.4f}  '
      f'W* acc {wstar_acc:.4f}  {format_counts(counts)}'
    )
  bar.close()

  args.out.mkdir(parents=True, exist_ok=True)
  metrics_path = args.out / 'metrics.json'
  config = {
    k: str(v) if isinstance(v, pathlib.Path) else v
    for k, v in vars(args).items()
  }
  with open(metrics_path, 'w', encoding='utf-8') as f:
    json.dump({'config': config, 'epochs': history}, f, indent=2)

  final = history[-1]
  first = {
    layer: next(
      (r['epoch'] for r in history if r['selected'][layer]['selected']), None
    )
    for layer in final['selected']
  }
  print(
    f'trained in {final["time_s"]:.1f} s: test accuracy {final["acc"]:.4f} '
    f'(dense W), {final["wstar_acc"]:.4f} (sparse W*)'
  )
  for layer, c in final['selected'].items():
    print(
      f'  {layer}: {c["selected"]}/{c["total"]} {c["unit"]} selected '
      f'({c["selected"] / c["total"]:.0%}), first at epoch {first[layer]}'
    )
  print(f'metrics written to {metrics_path}')
  return {**final, 'metrics_path': str(metrics_path)}


if __name__ == '__main__':
  main()
