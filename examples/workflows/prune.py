"""Workflow 1: pruning by the order of selection against weight magnitude.

Trains LeNet-5 with DessiLBI (the main job's settings) and with SGD with
momentum from the same initialisation, then prunes a share of the filters
of ``--layers`` (conv3 by default, as in the reference's LeNet example)
three ways:

* the DessiLBI network, filters ranked by the order in which they entered
  Γ's support (``dl.rank_groups``: earliest first, ties and never-selected
  filters by norm);
* the same DessiLBI network, filters ranked by their weight norm alone;
* the SGD network, filters ranked by their weight norm.

Each pruned network is evaluated as it is, and after a short fine-tune
(``--finetune-epochs`` of SGD with momentum at ``--finetune-lr``, pruned
filters held at zero). Writes ``pruning.png`` and ``pruning.json``.

Run::

  python examples/workflows/prune.py --out runs/prune          # ~3 min
"""

import json
import math
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Optional

if __package__ in (None, ''):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm.auto import tqdm

import dessilbi_jax as dl
from examples import common, plots, train


def parse_args(argv):
  p = train.base_parser(__doc__.split('\n\n')[0])
  g = p.add_argument_group('pruning')
  g.add_argument(
    '--layers', default=None, help='comma-separated layers (the last conv)'
  )
  g.add_argument('--fractions', default='0.3,0.5,0.7,0.8,0.9')
  g.add_argument('--finetune-epochs', type=int, default=2)
  g.add_argument('--finetune-lr', type=float, default=0.01)
  g.add_argument('--out', type=pathlib.Path, default=pathlib.Path('runs/prune'))
  g.add_argument('--no-progress', action='store_true')
  args = p.parse_args(argv)
  train.check_args(p, args)
  try:
    args.fractions = [float(f) for f in args.fractions.split(',')]
  except ValueError:
    p.error(f'--fractions: numbers separated by commas, got {args.fractions!r}')
  if not all(0 <= f <= 1 for f in args.fractions):
    p.error(f'--fractions: each in [0, 1], got {args.fractions}')
  if args.finetune_epochs < 0:
    p.error('--finetune-epochs must be >= 0')
  if not 0 < args.finetune_lr < math.inf:
    p.error(f'--finetune-lr must be finite and > 0, got {args.finetune_lr}')
  return args


def prune_and_eval(model, record, fraction, layers, rule, args, ds, seed):
  """Accuracy of ``model`` pruned, before and after the fine-tune."""
  state = nnx.state(model, nnx.Param)
  pruned, masks = dl.prune(state, record, fraction, layers=layers, penalty=rule)
  m = nnx.clone(model)
  nnx.update(m, pruned)
  before = common.accuracy(m, ds.x_test, ds.y_test)
  after = before
  if args.finetune_epochs > 0:
    mask_state = nnx.clone(state)
    nnx.replace_by_pure_dict(
      mask_state, jax.tree.map(lambda b: jnp.asarray(b, jnp.float32), masks)
    )
    tx = optax.sgd(args.finetune_lr, momentum=args.momentum)

    def step(model, optimizer, x, y):
      return common.masked_train_step(model, optimizer, mask_state, x, y)

    common.train(
      m, tx, ds, args.finetune_epochs, args.batch_size, seed, step=step
    )
    after = common.accuracy(m, ds.x_test, ds.y_test)
  return before, after


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  args = parse_args(argv)
  ds = train.load_data(args)
  model = train.build_model(args, ds)
  sgd_model = nnx.clone(model)
  convs = common.models_lib.kernel_layers(model)
  if not convs:
    raise SystemExit(
      f'error: --model: {args.model} has no conv layers; this workflow '
      'prunes conv filters'
    )
  layers = args.layers.split(',') if args.layers else [convs[-1]]
  train.check_layers(model, args, [('--layers', name) for name in layers])
  steps = len(ds.x_train) // args.batch_size
  tx, rule, _ = common.setup_dessilbi(args, model, steps)
  bar = tqdm(total=2 * args.epochs, desc='training', disable=args.no_progress)
  optimizer = common.train(
    model, tx, ds, args.epochs, args.batch_size, args.seed, bar=bar
  )
  common.train(
    sgd_model,
    common.sgd_tx(args, steps),
    ds,
    args.epochs,
    args.batch_size,
    args.seed,
    bar=bar,
  )
  bar.close()
  st = common.opt_state(optimizer)
  dense = {
    'dessilbi': common.accuracy(model, ds.x_test, ds.y_test),
    'sgd': common.accuracy(sgd_model, ds.x_test, ds.y_test),
  }
  selected = common.counts(common.selected_filters(st))
  methods = {
    'DessiLBI, selection order': (model, optax.tree.get(st, 'first_step')),
    'DessiLBI, magnitude': (
      model,
      dl.magnitude_record(nnx.state(model, nnx.Param), rule),
    ),
    'SGD, magnitude': (
      sgd_model,
      dl.magnitude_record(nnx.state(sgd_model, nnx.Param), rule),
    ),
  }
  results: dict[str, dict[str, list[float]]] = {
    name: {'no fine-tune': [], 'fine-tuned': []} for name in methods
  }
  for fraction in tqdm(
    args.fractions, desc='pruning', disable=args.no_progress
  ):
    for name, (m, record) in methods.items():
      before, after = prune_and_eval(
        m, record, fraction, layers, rule, args, ds, args.seed
      )
      results[name]['no fine-tune'].append(before)
      results[name]['fine-tuned'].append(after)
      tqdm.write(
        f'{", ".join(layers)} {fraction:.0%} pruned, {name}: {before:.4f} '
        f'(fine-tuned {after:.4f})'
      )
  curves = {}
  for name, r in results.items():
    curves[f'{name}, no fine-tune'] = r['no fine-tune']
    if args.finetune_epochs > 0:
      curves[f'{name}, {args.finetune_epochs}-epoch fine-tune'] = r[
        'fine-tuned'
      ]
  args.out.mkdir(parents=True, exist_ok=True)
  png = plots.pruning(
    args.fractions,
    curves,
    args.out / 'pruning.png',
    dense=dense['dessilbi'],
    title=f'{args.model} on {ds.name}: pruning {", ".join(layers)}',
  )
  out = dict(
    config={
      k: str(v) if isinstance(v, pathlib.Path) else v
      for k, v in vars(args).items()
    },
    layers=layers,
    dense=dense,
    selected=selected,
    fractions=args.fractions,
    results=results,
    files={'plot': png},
  )
  with open(args.out / 'pruning.json', 'w', encoding='utf-8') as f:
    json.dump(out, f, indent=1)
  print(
    f'dense: DessiLBI {dense["dessilbi"]:.4f}, SGD {dense["sgd"]:.4f}; '
    f'selected {selected}'
  )
  print(f'written: {args.out / "pruning.json"}, {png}')
  return out


if __name__ == '__main__':
  main()
