"""Workflow 2: winning tickets from the early path.

Trains LeNet-5 with DessiLBI (the main job's settings) up to the latest
epoch of ``--at`` and takes, at each of those epochs, the conv filters in
Γ's support as a mask. Each mask (a "ticket") is retrained from the
original initialisation with SGD with momentum for the main job's epochs and
schedule, pruned filters held at zero; so is a random mask keeping the same
number of filters in every layer, and the dense network. Writes
``tickets.png`` and ``tickets.json``.

Run::

  python examples/workflows/tickets.py --out runs/tickets      # ~4 min
"""

import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Optional

if __package__ in (None, ''):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from examples import common, plots, train


def parse_args(argv):
  p = train.base_parser(__doc__.split('\n\n')[0])
  g = p.add_argument_group('tickets')
  g.add_argument(
    '--at', default='15,20', help='epochs of the DessiLBI path to take masks at'
  )
  g.add_argument(
    '--out', type=pathlib.Path, default=pathlib.Path('runs/tickets')
  )
  g.add_argument('--no-progress', action='store_true')
  args = p.parse_args(argv)
  train.check_args(p, args)
  try:
    args.at = sorted({int(e) for e in args.at.split(',')})
  except ValueError:
    p.error(f'--at: epochs separated by commas, got {args.at!r}')
  if args.at[0] < 1:
    p.error('--at: epochs start at 1')
  return args


def random_like(keep: dict[str, np.ndarray], rng) -> dict[str, np.ndarray]:
  """The same number of filters per layer, chosen at random."""
  out = {}
  for layer, k in keep.items():
    r = np.zeros_like(k)
    r[rng.choice(k.size, int(k.sum()), replace=False)] = True
    out[layer] = r
  return out


def retrain(args, ds, init_model, keep, spec) -> tuple[float, nnx.Module]:
  """SGD from ``init_model``'s weights with the filters outside ``keep`` held
  at zero (no mask: the dense network)."""
  model = nnx.clone(init_model)
  steps = len(ds.x_train) // args.batch_size
  step = None
  if keep is not None:
    masks = common.masks_like(model, keep, spec)
    common.apply_masks(model, masks)

    def step(model, optimizer, x, y):
      return common.masked_train_step(model, optimizer, masks, x, y)

  common.train(
    model,
    common.sgd_tx(args, steps),
    ds,
    args.epochs,
    args.batch_size,
    args.seed,
    step=step,
  )
  return common.accuracy(model, ds.x_test, ds.y_test), model


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  ds = train.load_data(args)
  model = train.build_model(args, ds)
  init_model = nnx.clone(model)
  convs = common.models_lib.kernel_layers(model)
  if not convs:
    raise SystemExit(
      f'error: --model: {args.model} has no conv layers; tickets are masks '
      'of conv filters'
    )
  steps = len(ds.x_train) // args.batch_size
  tx, _, spec = common.setup_dessilbi(args, model, steps)
  keeps: dict[int, dict[str, np.ndarray]] = {}
  path_acc: dict[int, dict[str, float]] = {}

  def on_epoch(epoch, loss, model, optimizer):
    if epoch in args.at:
      sel = common.selected_filters(common.opt_state(optimizer))
      keeps[epoch] = {k: v for k, v in sel.items() if k in convs}
      path_acc[epoch] = {
        'dense': common.accuracy(model, ds.x_test, ds.y_test),
        'wstar': common.accuracy(
          common.wstar_model(model, optimizer, spec), ds.x_test, ds.y_test
        ),
      }

  n_runs = 1 + 2 * len(args.at)
  bar = tqdm(
    total=args.at[-1] + n_runs,
    desc='path + retraining',
    disable=args.no_progress,
  )
  common.train(
    model, tx, ds, args.at[-1], args.batch_size, args.seed, on_epoch, bar=bar
  )
  rng = np.random.default_rng(args.seed + 1000)
  dense_acc, _ = retrain(args, ds, init_model, None, spec)
  bar.update(1)
  total_filters = sum(int(v.size) for v in keeps[args.at[0]].values())
  rows: list[dict[str, Any]] = [
    dict(name='dense', epoch=None, acc=dense_acc, conv_filter_share=1.0)
  ]
  tqdm.write(f'dense (SGD): {dense_acc:.4f}')
  for epoch in args.at:
    keep = keeps[epoch]
    kept = sum(int(v.sum()) for v in keep.values())
    share = kept / total_filters
    c = {k: [int(v.sum()), int(v.size)] for k, v in keep.items()}
    for name, mask in (('ticket', keep), ('random', random_like(keep, rng))):
      acc, _ = retrain(args, ds, init_model, mask, spec)
      bar.update(1)
      rows.append(
        dict(
          name=name,
          epoch=epoch,
          acc=acc,
          conv_filter_share=share,
          selected=c,
          **({'path': path_acc[epoch]} if name == 'ticket' else {}),
        )
      )
      tqdm.write(
        f'epoch {epoch} {name:6s}: {acc:.4f} with {kept}/{total_filters} '
        f'conv filters ({common.format_counts(c)})'
      )
  bar.close()
  args.out.mkdir(parents=True, exist_ok=True)
  label = {
    r['name'] if r['epoch'] is None else f'{r["name"]}\n@ epoch {r["epoch"]}': r
    for r in rows
  }
  png = plots.bars(
    {k: 100 * r['acc'] for k, r in label.items()},
    args.out / 'tickets.png',
    ylabel='test accuracy after retraining (%)',
    title=f"{args.model} on {ds.name}: tickets from Γ's support, retrained "
    'with SGD',
    notes={
      k: f'{r["conv_filter_share"]:.0%} filters' for k, r in label.items()
    },
  )
  out = dict(
    config={
      k: str(v) if isinstance(v, pathlib.Path) else v
      for k, v in vars(args).items()
    },
    results=rows,
    files={'plot': png},
  )
  with open(args.out / 'tickets.json', 'w', encoding='utf-8') as f:
    json.dump(out, f, indent=1)
  print(f'written: {args.out / "tickets.json"}, {png}')
  return out


if __name__ == '__main__':
  main()
