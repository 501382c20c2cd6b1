"""The key GPU measurements in one run (about 5 minutes on an H100).

Runs, side by side in one process, the update alone on CIFAR ResNet-18 params
(device time with 20 updates per jit, per call, and the bandwidth floor), the
update's scaling from 1e5 to 1e8 parameters, and whole train steps (ResNet-18
and VGG-16 batch 256, LeNet-5 batch 128) for ``dessilbi`` (Γ stored or rebuilt
from z) against ``optax.sgd(momentum=0.9)`` (and ``optax.adam`` for the
update), and writes everything to one JSON file.

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
  'update --model resnet18 --repeats 15',
  'scaling --sizes 1e5 1e6 1e7 1e8 --k 10 --repeats 7'
  ' --optimizers sgd dessilbi dessilbi_z',
  'step --model resnet18 --steps 50 --repeats 9'
  ' --optimizers sgd dessilbi dessilbi_z',
  'step --model lenet5 --steps 100 --repeats 9'
  ' --optimizers sgd dessilbi dessilbi_z',
  'step --model vgg16 --steps 30 --repeats 5 --optimizers sgd dessilbi',
]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='.', help='folder for gpu_check.json')
  args = parser.parse_args(argv)
  results = {'devices': [str(d) for d in jax.devices()], 'runs': []}
  path = os.path.join(args.out, 'gpu_check.json')
  for run in RUNS:
    t0 = time.perf_counter()
    out = harness.main(run.split())
    out['wall_s'] = time.perf_counter() - t0
    out['argv'] = run
    results['runs'].append(out)
    with open(path, 'w', encoding='utf-8') as f:  # keep partial results
      json.dump(results, f, indent=2)
    print(f'  ({out["wall_s"]:.0f} s)', flush=True)


if __name__ == '__main__':
  main()
