"""The hyper-parameter search harness behind examples/README.md.

Reads one configuration per line on stdin (the main job's flags, plus
``--opt sgd`` for the baseline), trains LeNet-5 on the bundled MNIST subset
(or the line's ``--model`` on its ``--dataset``) and prints one JSON line
per run: dense accuracy, and for DessiLBI the W* accuracy, the share of conv
filters selected, the counts per layer and the last conv layer (conv3)
pruned by selection order at 50/70/90 % (``p50``, ``p70``, ``p90``). The
``grid*.jsonl`` files here are its output (run on one H100, several
processes in parallel; ``grid2`` to ``grid4`` ran before the ``--warmup`` flag
existed, so without warm-up: add ``--warmup 0`` to re-run their lines).

A line's flags default to the shared ones of ``examples/common.py`` (ν 20,
λ 1, warm-up 1 epoch), not to the main job's (``train.DEFAULTS``: ν 5,
λ 4.5, warm-up 2): the grids name what they change from those.

  echo "--nu 5 --lam 4.5 --warmup 2 --seed 0" | python examples/search/search.py
"""

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

import optax
from flax import nnx

import dessilbi_jax as dl
from examples import common, data, models


def run(datasets, argv):
  """One line's run (``datasets``: the datasets loaded so far, by name)."""
  p = argparse.ArgumentParser()
  common.add_data_args(p)
  common.add_optim_args(p)
  p.add_argument('--opt', default='dessilbi')
  a = p.parse_args(argv)
  if a.dataset not in datasets:
    datasets[a.dataset] = data.load(a.dataset, a.data_dir)
  ds = datasets[a.dataset]
  model = models.build(
    a.model,
    ds.image_shape,
    ds.num_classes,
    seed=a.seed,
    width=a.width,
    **({'norm': True} if a.norm else {}),
  )
  steps = len(ds.x_train) // a.batch_size
  rule = common.penalty(a.couple, a.lam, common.classifier_name(model))
  if a.opt == 'dessilbi':
    tx = common.dessilbi_tx(a, steps, rule)
  else:
    tx = common.sgd_tx(a, steps)
  t = time.time()
  opt = common.train(model, tx, ds, a.epochs, a.batch_size, a.seed)
  acc = common.accuracy(model, ds.x_test, ds.y_test)
  out = dict(argv=' '.join(argv), acc=acc, t=round(time.time() - t, 1))
  if a.opt == 'dessilbi':
    spec = model.spec()
    st = common.opt_state(opt)
    c = common.counts(common.selected_filters(st))
    wstar = common.wstar_model(model, opt, spec)
    out['wstar'] = common.accuracy(wstar, ds.x_test, ds.y_test)
    convs = models.kernel_layers(model)
    out['conv_share'] = round(common.conv_share(c, convs), 3)
    out['counts'] = common.format_counts(c)
    record = optax.tree.get(st, 'first_step')
    params = nnx.state(model, nnx.Param)
    for f in (0.5, 0.7, 0.9) if convs else ():
      pruned, _ = dl.prune(params, record, f, layers=convs[-1:], penalty=rule)
      m = nnx.clone(model)
      nnx.update(m, pruned)
      out[f'p{int(f * 100)}'] = common.accuracy(m, ds.x_test, ds.y_test)
  print(json.dumps(out), flush=True)


def main(argv=None):
  argparse.ArgumentParser(
    description=__doc__.split('\n\n')[0],
    epilog='Each line on stdin: the flags of one run, e.g. --nu 5 --lam 4.5.',
  ).parse_args(argv)
  datasets: dict[str, data.Dataset] = {}
  for line in sys.stdin:
    line = line.strip()
    if line and not line.startswith('#'):
      run(datasets, line.split())


if __name__ == '__main__':
  main()
