"""The key GPU measurements in one run (an estimated 6 minutes on an H100).

The most telling runs come first, and the JSON is rewritten after each run,
so a run cut short by the device budget still leaves the first results.

First, the multi-tensor Pallas step (``dl.fused_dessilbi`` through
``multitensor.py``) compiled for the GPU is checked against ``dessilbi`` on
ResNet-18's params (largest differences after 3 steps, and whether Γ's
supports agree). Then, side by side in one process: the update alone on CIFAR
ResNet-18 params (device time with 20 updates per jit, per call, and the
bandwidth floor) for ``dessilbi`` (Γ stored or rebuilt from z), the fused
kernels (writing updates, without Γ, or writing the new params: the fused
``step``), ``optax.sgd(momentum=0.9)`` and ``optax.adam``; whole train steps
(ResNet-18 batch 256); tilings of the fused step; the per-kernel probes
(``probes.py``); train steps of LeNet-5 (batch 128) and VGG-16 (batch 256);
the update with bfloat16 params; and the update's scaling from 1e5 to 1e8
parameters (the peak memory of a train step, ``harness.py memory``, was
measured on an H100 and is left out for time). It
writes everything to one JSON file (a failing run is recorded with its error
and the others go on) and the same as Markdown tables (``tables.md``, by
``report.py``), the compiled HLO of the ResNet-18 update and step to
``hlo/``, for reading the kernels XLA made after the machine is gone, and the
GPU's XLA target config (``gpu_target_config.pbtxt``), with which
``gpu_offline.py`` compiles for this GPU on machines without one.

Usage::

  python benchmarks/gpu_check.py --out results/       # writes gpu_check.json

On the lent device machine: ``PYTHONPATH=$PWD python3 benchmarks/gpu_check.py
--out $OUT`` with a 500 s timeout, which leaves part of a 15-minute budget
for the machine's start.
"""

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import jax

try:
  from benchmarks import harness, multitensor, probes, report
except ImportError:  # run as a script from the repository root
  sys.path.insert(0, __file__.rsplit('/', 2)[0])
  from benchmarks import harness, multitensor, probes, report

# (entry point, arguments); {hlo} is replaced by the HLO folder. The first
# word names the run: the harness's mode, or the script of another entry.
RUNS = [
  # Timings of a kernel only mean something if it computes the right thing:
  # the compiled Triton kernels against dessilbi, first.
  (multitensor.main, 'multitensor --model resnet18 --steps 3'),
  (
    harness.main,
    'update --model resnet18 --repeats 15 --hlo-dir {hlo} --optimizers'
    ' sgd dessilbi dessilbi_z adam dessilbi_mt dessilbi_mt_z dessilbi_mt_apply',
  ),
  (
    harness.main,
    'step --model resnet18 --steps 50 --repeats 9 --hlo-dir {hlo}'
    ' --optimizers sgd dessilbi dessilbi_z dessilbi_mt_apply',
  ),
  # Tilings of the fused step around the default (64x16x4x256, flat block
  # 2048, 32 leaves per launch: the conv kernels in one launch at 72
  # registers, 7 programs per SM, the other leaves in two; triton_compile.py)
  # and launches of at most 1000 leaves (3 launches), or of 16 (7) or 8 (12),
  # which compile faster (benchmarks/README.md).
  (
    harness.main,
    'update --model resnet18 --repeats 9 --optimizers sgd dessilbi_mt_apply'
    ' dessilbi_mt_apply:64x16x4x256x2048x1000'
    ' dessilbi_mt_apply:64x16x4x256x2048x16'
    ' dessilbi_mt_apply:64x16x4x256x2048x8 dessilbi_mt_apply:32x32x4x256'
    ' dessilbi_mt_apply:64x32x4x512 dessilbi_mt_apply:128x8x4x256'
    ' dessilbi_mt_apply:64x16x8x256',
  ),
  (probes.main, 'probes --k 20 --repeats 15'),
  (
    harness.main,
    'step --model lenet5 --steps 100 --repeats 9'
    ' --optimizers sgd dessilbi dessilbi_z dessilbi_mt_apply',
  ),
  (
    harness.main,
    'step --model vgg16 --steps 30 --repeats 5'
    ' --optimizers sgd dessilbi dessilbi_mt_apply',
  ),
  (
    harness.main,
    'update --model resnet18 --dtype bfloat16 --repeats 9'
    ' --optimizers sgd dessilbi dessilbi_f32 dessilbi_mt_apply',
  ),
  (
    harness.main,
    'scaling --sizes 1e5 1e6 1e7 1e8 --k 10 --repeats 7'
    ' --optimizers sgd dessilbi dessilbi_z',
  ),
]


def save_target_config(out: str) -> str:
  """Copies the GPU's XLA target config to ``out`` (for gpu_offline.py).

  XLA writes it beside the dumps of a compiled module; a throwaway process
  compiles one tiny function with dumps on, for that module alone.
  """
  with tempfile.TemporaryDirectory() as dump:
    env = dict(os.environ)
    env['XLA_FLAGS'] = (
      env.get('XLA_FLAGS', '')
      + f' --xla_dump_to={dump} --xla_dump_hlo_module_re=.*target_config_probe.*'
    ).strip()
    code = (
      'import jax, jax.numpy as jnp\n'
      'def target_config_probe(x):\n  return x + 1\n'
      'jax.block_until_ready(jax.jit(target_config_probe)(jnp.ones(8)))\n'
    )
    subprocess.run([sys.executable, '-c', code], env=env, check=True)
    found = glob.glob(os.path.join(dump, '*gpu_target_config.pbtxt'))
    if not found:
      raise RuntimeError('XLA wrote no gpu_target_config.pbtxt')
    path = os.path.join(out, 'gpu_target_config.pbtxt')
    shutil.copy(found[0], path)
  return path


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='.', help='folder for gpu_check.json')
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  results = {'devices': [str(d) for d in jax.devices()], 'runs': []}
  path = os.path.join(args.out, 'gpu_check.json')
  hlo = os.path.join(args.out, 'hlo')
  try:
    results['target_config'] = save_target_config(args.out)
  except Exception:  # record it and run the rest
    results['target_config_error'] = traceback.format_exc()
  for entry, run in RUNS:
    run = run.format(hlo=hlo)
    argv = run.split()
    if entry is not harness.main:
      argv = argv[1:]
    t0 = time.perf_counter()
    try:
      out = entry(argv)
    except Exception:  # record it and run the rest
      out = {'error': traceback.format_exc()}
      print(out['error'], flush=True)
    out['wall_s'] = time.perf_counter() - t0
    out['argv'] = run
    results['runs'].append(out)
    with open(path, 'w', encoding='utf-8') as f:  # keep partial results
      json.dump(results, f, indent=2)
    try:  # the same as Markdown tables, for benchmarks/README.md
      tables = report.report(results)
    except Exception:  # the JSON is what counts
      tables = traceback.format_exc()
    with open(os.path.join(args.out, 'tables.md'), 'w', encoding='utf-8') as f:
      f.write(tables)
    print(f'  ({out["wall_s"]:.0f} s)', flush=True)


if __name__ == '__main__':
  main()
