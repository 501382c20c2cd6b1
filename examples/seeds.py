"""The main job over several seeds: DessiLBI against SGD, mean ± std.

Runs ``examples/train.py`` (DessiLBI, then SGD with momentum from the same
initialisation and schedule) once per seed, without plots or checkpoints,
and writes ``<out>/summary.json`` with the per-seed numbers and their mean
and standard deviation: dense accuracy of both optimizers, W* accuracy, the
share of conv filters W* keeps, and the last conv layer pruned by selection
order (50/70/90 %, no fine-tuning). Every flag after ``--`` goes to the main
job.

Run::

  python examples/seeds.py --seeds 0-9 --out runs/seeds     # ~15 min, 2 CPUs
  python examples/seeds.py --seeds 0-2 -- --nu 20 --lam 1 --warmup 0
"""

import argparse
import json
import pathlib
import sys
from collections.abc import Sequence
from typing import Any, Optional

if __package__ in (None, ''):
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np

from examples import train

CHANCE = 0.15  # a run at or below this test accuracy "never left chance"


def parse_seeds(text: str) -> list[int]:
  """``0-9`` or ``0,3,5`` (or both: ``0-2,7``) as a list of seeds."""
  out: list[int] = []
  for part in text.split(','):
    a, _, b = part.partition('-')
    if not a.isdigit() or not (b or a).isdigit() or int(b or a) < int(a):
      raise ValueError(f'expected e.g. 0-9 or 0,3,5, got {text!r}')
    out.extend(range(int(a), int(b or a) + 1))
  return out


def summarise(per_seed: list[dict[str, Any]]) -> dict[str, Any]:
  """Mean, std and min of every number (a run without SGD, ``--no-sgd``,
  has no ``sgd_acc``: left out, not NaN)."""
  keys = per_seed[0].keys() - {'seed'}
  out = {}
  for k in sorted(keys):
    if any(r[k] is None for r in per_seed):
      continue
    v = np.asarray([r[k] for r in per_seed], float)
    out[k] = {
      'mean': float(v.mean()),
      'std': float(v.std()),
      'min': float(v.min()),
    }
  return out


def main(argv: Optional[Sequence[str]] = None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  rest = []
  if '--' in argv:
    i = argv.index('--')
    argv, rest = argv[:i], argv[i + 1 :]
  p = argparse.ArgumentParser(
    description=__doc__.split('\n\n')[0],
    epilog='Flags after -- go to the main job (examples/train.py), e.g. '
    'seeds.py --seeds 0-2 -- --nu 20 --lam 1.',
  )
  p.add_argument('--seeds', default='0-9', help='e.g. 0-9 or 0,3,5')
  p.add_argument('--out', type=pathlib.Path, default=pathlib.Path('runs/seeds'))
  args = p.parse_args(argv)
  try:
    seeds = parse_seeds(args.seeds)
  except ValueError as e:
    p.error(f'--seeds: {e}')
  per_seed = []
  for seed in seeds:
    m = train.main(
      [
        *rest,
        '--seed',
        str(seed),
        '--out',
        str(args.out / f'seed{seed}'),
        '--no-plots',
        '--no-checkpoint',
        '--no-progress',
      ]
    )
    f = m['final']
    row = dict(
      seed=seed,
      dessilbi_acc=f['acc'],
      sgd_acc=f['sgd_acc'],
      wstar_acc=f['wstar_acc'],
      wstar_gap=f['acc'] - f['wstar_acc'],
      conv_filter_share=f['conv_filter_share'],
    )
    for k, v in m['prune_by_selection_order']['acc'].items():
      row[f'prune_{k.rstrip("%")}'] = v
    per_seed.append(row)
    print(json.dumps(row), flush=True)
  summary = dict(
    config=m['config'],
    extra_args=rest,
    per_seed=per_seed,
    summary=summarise(per_seed),
    failed_dessilbi=[
      r['seed'] for r in per_seed if r['dessilbi_acc'] <= CHANCE
    ],
    failed_sgd=[
      r['seed']
      for r in per_seed
      if r['sgd_acc'] is not None and r['sgd_acc'] <= CHANCE
    ],
  )
  args.out.mkdir(parents=True, exist_ok=True)
  with open(args.out / 'summary.json', 'w', encoding='utf-8') as fh:
    json.dump(summary, fh, indent=1)
  print('mean ± std over seeds', args.seeds)
  for k, v in summary['summary'].items():
    print(f'  {k:20s} {v["mean"]:.4f} ± {v["std"]:.4f} (min {v["min"]:.4f})')
  print(
    f'  runs at chance: DessiLBI {summary["failed_dessilbi"]}, SGD '
    f'{summary["failed_sgd"]}'
  )
  return summary


if __name__ == '__main__':
  main()
