"""Workflow 3: growing a network along the DessiLBI path.

Starts LeNet-5 narrow (``--start`` filters in conv1, conv2, conv3) and
trains it with DessiLBI in rounds of ``--round-epochs`` at a constant step
size. After each round, every conv layer whose share of selected filters
(Γ ≠ 0) exceeds ``--threshold`` is widened by ``--factor`` with
``dl.widen`` (new filters orthogonal to the old ones, zero outgoing
weights, so the function is unchanged; params, z, Γ, momentum and the
selection record carried over). Growth stops after a round in which no
layer grew and the support did not change either (the path has settled at
these widths), or after ``--max-rounds``; a final phase of
``--final-epochs`` runs at a tenth of the step size.

The fixed-width LeNet-5 (6/16/120) is trained for the same epochs with the
same step sizes, with DessiLBI and with SGD with momentum; the script
compares accuracy, parameters and FLOPs (of the dense networks, and of the
DessiLBI networks' W* slimmed to their selected filters). Writes
``grow.json`` and ``grow.png``.

Run::

  python examples/workflows/grow.py --out runs/grow            # ~3 min
"""

import copy
import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Optional

if __package__ in (None, ''):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
from flax import nnx
from tqdm.auto import tqdm

import dessilbi_jax as dl
from examples import common, plots, train


def parse_args(argv):
  p = train.base_parser(__doc__.split('\n\n')[0])
  g = p.add_argument_group('growing')
  g.add_argument('--start', default='4,8,16', help='conv widths to start from')
  g.add_argument('--round-epochs', type=int, default=5)
  g.add_argument('--max-rounds', type=int, default=8)
  g.add_argument('--final-epochs', type=int, default=10)
  g.add_argument(
    '--threshold',
    type=float,
    default=0.5,
    help='widen a layer when more than this share of its filters is selected',
  )
  g.add_argument('--factor', type=float, default=2.0, help='width × factor')
  g.add_argument(
    '--baselines',
    default='dessilbi,sgd',
    help='optimizers of the fixed-width networks (comma-separated)',
  )
  g.add_argument('--out', type=pathlib.Path, default=pathlib.Path('runs/grow'))
  g.add_argument('--no-progress', action='store_true')
  args = p.parse_args(argv)
  train.check_args(p, args)
  for name in ('round_epochs', 'max_rounds', 'final_epochs'):
    if getattr(args, name) < 1:
      p.error(f'--{name.replace("_", "-")} must be >= 1')
  if args.model != 'lenet5':
    p.error('the growing workflow is written for --model lenet5')
  args.baselines = [b for b in args.baselines.split(',') if b]
  if not set(args.baselines) <= {'dessilbi', 'sgd'}:
    p.error('--baselines: dessilbi and/or sgd')
  try:
    args.start = [int(w) for w in args.start.split(',')]
  except ValueError:
    args.start = []
  if len(args.start) != 3 or min(args.start) < 1:
    p.error('--start: three positive widths (conv1,conv2,conv3)')
  if not 1 < args.factor < math.inf:
    p.error(f'--factor must be finite and > 1, got {args.factor}')
  if not 0 <= args.threshold < 1:
    p.error(f'--threshold must lie in [0, 1), got {args.threshold}')
  return args


def with_lr(args, lr, **kw):
  a = copy.copy(args)
  a.lr = lr
  for k, v in kw.items():
    setattr(a, k, v)
  return a


def fixed_width_args(args, growth_epochs: int, total: int):
  """The fixed-width runs' settings: ``total`` epochs at the growth's step
  sizes, ×``--lr-decay`` once, after ``growth_epochs`` (a step schedule with
  ``--lr-step`` = growth epochs would decay again every ``growth_epochs``
  when the final phase is longer)."""
  a = with_lr(
    args, args.lr, schedule='step', epochs=total, lr_step=growth_epochs
  )
  a.lr_boundaries = [growth_epochs]
  return a


def rebuild(args, ds, widths, state, opt_state, tx):
  """A model at ``widths`` holding ``state``, with an optimizer holding
  ``opt_state``."""
  model = train.build_model(args, ds, widths=widths)
  nnx.update(model, state)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  dl.set_nnx_opt_state(optimizer, opt_state)
  return model, optimizer


def evaluate(args, ds, model, optimizer, spec) -> dict[str, Any]:
  """Dense and W* accuracy, cost of the dense and of the slimmed W*."""
  out = {
    'acc': common.accuracy(model, ds.x_test, ds.y_test),
    'widths': dict(model.widths),
    'dense_cost': common.cost(model, ds.image_shape),
  }
  if optimizer is not None:
    sel = common.selected_filters(common.opt_state(optimizer))
    wstar = common.wstar_model(model, optimizer, spec)
    out['wstar_acc'] = common.accuracy(wstar, ds.x_test, ds.y_test)
    small, widths = common.slim_model(
      args.model, ds, wstar, sel, spec, **({'norm': True} if args.norm else {})
    )
    out['wstar_widths'] = widths
    out['wstar_cost'] = common.cost(small, ds.image_shape)
  return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  ds = train.load_data(args)
  widths = dict(zip(('conv1', 'conv2', 'conv3'), args.start, strict=True))
  model = train.build_model(args, ds, widths=widths)
  convs = list(widths)
  steps = len(ds.x_train) // args.batch_size
  grow_args = with_lr(args, args.lr, schedule='constant')
  tx, _, spec = common.setup_dessilbi(grow_args, model, steps)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  key = jax.random.key(args.seed)
  bar = tqdm(desc='growing', disable=args.no_progress, total=None)
  rounds, epoch, previous = [], 1, None
  for rnd in range(1, args.max_rounds + 1):
    common.train(
      model,
      None,
      ds,
      args.round_epochs,
      args.batch_size,
      args.seed,
      optimizer=optimizer,
      first_epoch=epoch,
      bar=bar,
    )
    epoch += args.round_epochs
    sel = common.selected_filters(common.opt_state(optimizer))
    shares = {k: float(sel[k].mean()) for k in convs}
    grow = [k for k in convs if shares[k] > args.threshold]
    counts = {k: int(sel[k].sum()) for k in convs}
    settled = counts == previous and any(counts.values())
    previous = counts
    acc = common.accuracy(model, ds.x_test, ds.y_test)
    rounds.append(
      dict(
        round=rnd,
        epochs=epoch - 1,
        widths={k: int(model.widths[k]) for k in convs},
        selected=counts,
        acc=acc,
        grown=grow,
      )
    )
    tqdm.write(
      f'round {rnd} (epoch {epoch - 1}): widths {rounds[-1]["widths"]}, '
      f'selected {rounds[-1]["selected"]}, acc {acc:.4f}, widen {grow or "-"}'
    )
    if not grow:
      if settled:
        break
      continue
    previous = None  # new filters: the path has to settle again
    state = nnx.state(model)
    ost = common.opt_state(optimizer)
    for layer in grow:
      key, sub = jax.random.split(key)
      w = int(model.widths[layer])
      surgery = dl.widen(
        sub, state, spec, layer, math.ceil(w * (args.factor - 1)), opt_state=ost
      )
      state, ost = surgery.params, surgery.opt_state
      widths[layer] = surgery.widths[layer]
    model, optimizer = rebuild(args, ds, widths, state, ost, tx)
  growth_epochs = epoch - 1
  # Final phase at a tenth of the step size, state carried over.
  final_tx, _, _ = common.setup_dessilbi(
    with_lr(grow_args, args.lr * args.lr_decay, warmup=0.0), model, steps
  )
  model, optimizer = rebuild(
    args, ds, widths, nnx.state(model), common.opt_state(optimizer), final_tx
  )
  common.train(
    model,
    None,
    ds,
    args.final_epochs,
    args.batch_size,
    args.seed,
    optimizer=optimizer,
    first_epoch=epoch,
    bar=bar,
  )
  grown = evaluate(args, ds, model, optimizer, spec)
  grown['rounds'] = rounds
  total = growth_epochs + args.final_epochs

  # Fixed width, same epochs and step sizes (×decay after the growth epochs).
  fixed_args = fixed_width_args(args, growth_epochs, total)
  fixed = {}
  for name in args.baselines:
    m = train.build_model(args, ds)
    if name == 'dessilbi':
      ftx, _, fspec = common.setup_dessilbi(fixed_args, m, steps)
    else:
      ftx, fspec = common.sgd_tx(fixed_args, steps), m.spec()
    opt = common.train(m, ftx, ds, total, args.batch_size, args.seed, bar=bar)
    fixed[name] = evaluate(
      args, ds, m, opt if name == 'dessilbi' else None, fspec
    )
  bar.close()

  def line(name, r):
    c = r['dense_cost']
    s = (
      f'{name:24s} acc {r["acc"]:.4f}  widths {r["widths"]}  '
      f'{c["params"]:,} params  {c["flops"] / 1e6:.3f} MFLOPs'
    )
    if 'wstar_acc' in r:
      w = r['wstar_cost']
      s += (
        f'\n{"":24s} W* acc {r["wstar_acc"]:.4f}  widths {r["wstar_widths"]}  '
        f'{w["params"]:,} params  {w["flops"] / 1e6:.3f} MFLOPs'
      )
    return s

  print(f'{total} epochs ({growth_epochs} growing + {args.final_epochs} final)')
  print(line('grown (DessiLBI)', grown))
  names = {'dessilbi': 'DessiLBI', 'sgd': 'SGD'}
  for name, r in fixed.items():
    print(line(f'fixed width ({names[name]})', r))
  args.out.mkdir(parents=True, exist_ok=True)
  bars = {'grown\n(DessiLBI)': grown}
  for name, r in fixed.items():
    bars[f'fixed\n({names[name]})'] = r
  png = plots.bars(
    {k: 100 * r['acc'] for k, r in bars.items()},
    args.out / 'grow.png',
    ylabel='test accuracy (%)',
    title=f'{args.model} on {ds.name}: grown vs fixed width, {total} epochs',
    notes={
      k: f'{r["dense_cost"]["params"] / 1e3:.1f}k params\n'
      f'{r["dense_cost"]["flops"] / 1e6:.2f} MFLOPs'
      for k, r in bars.items()
    },
  )
  out = dict(
    config={
      k: str(v) if isinstance(v, pathlib.Path) else v
      for k, v in vars(args).items()
    },
    epochs=total,
    growth_epochs=growth_epochs,
    grown=grown,
    fixed=fixed,
    files={'plot': png},
  )
  with open(args.out / 'grow.json', 'w', encoding='utf-8') as f:
    json.dump(out, f, indent=1)
  print(f'written: {args.out / "grow.json"}, {png}')
  return out


if __name__ == '__main__':
  main()
