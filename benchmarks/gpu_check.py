"""The key GPU measurements in one run (about 5 minutes on an H100).

Runs, side by side in one process, the update alone on CIFAR ResNet-18 params
(device time with 20 updates per jit, and per call) and whole train steps
(ResNet-18 batch 256, LeNet-5 batch 128) for ``dessilbi`` against
``optax.sgd(momentum=0.9)`` (and ``optax.adam`` for the update), and writes
everything to one JSON file.

Usage::

  python benchmarks/gpu_check.py --out results/       # writes gpu_check.json
"""

import argparse
import json
import os
import sys
import time

import jax

try:
  from benchmarks import harness
except ImportError:  # run as a script from the repository root
  sys.path.insert(0, __file__.rsplit('/', 2)[0])
  from benchmarks import harness

RUNS = [
  ['update', '--model', 'resnet18', '--repeats', '15'],
  [
    'step',
    '--model',
    'resnet18',
    '--optimizers',
    'sgd',
    'dessilbi',
    '--steps',
    '50',
    '--repeats',
    '9',
  ],
  [
    'step',
    '--model',
    'lenet5',
    '--optimizers',
    'sgd',
    'dessilbi',
    '--steps',
    '100',
    '--repeats',
    '9',
  ],
  [
    'step',
    '--model',
    'vgg16',
    '--optimizers',
    'sgd',
    'dessilbi',
    '--steps',
    '30',
    '--repeats',
    '5',
  ],
]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='.', help='folder for gpu_check.json')
  args = parser.parse_args(argv)
  results = {'devices': [str(d) for d in jax.devices()], 'runs': []}
  path = os.path.join(args.out, 'gpu_check.json')
  for run in RUNS:
    t0 = time.perf_counter()
    out = harness.main(run)
    out['wall_s'] = time.perf_counter() - t0
    out['argv'] = run
    results['runs'].append(out)
    with open(path, 'w', encoding='utf-8') as f:  # keep partial results
      json.dump(results, f, indent=2)
    print(f'  ({out["wall_s"]:.0f} s)', flush=True)


if __name__ == '__main__':
  main()
