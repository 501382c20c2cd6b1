"""The key GPU measurements in one run, in under 6 minutes.

The most telling runs come first, each in a fresh process killed at the
budget (``--budget``, 340 s by default), and the JSON is rewritten after each
run: a kernel that crashes its process or the GPU context costs its run
alone, and a command cut short still leaves the first results. If the fused
kernels fail the agreement check, the later runs time the other optimizers
only.

First, the multi-tensor Pallas step (``dl.fused_dessilbi`` through
``multitensor.py``) compiled for the GPU is checked against ``dessilbi`` on
ResNet-18's params (largest differences after 3 steps, and whether Γ's
supports agree), and its default is checked to take the kernels for the
GPU's arrays and XLA for the CPU's (``default_choice``). Then, side by side in one process: the update alone on CIFAR
ResNet-18 params (device time with 20 updates per jit, per call, and the
bandwidth floor) for ``dessilbi`` (Γ stored or rebuilt from z), the fused
kernels (writing updates, without Γ, or writing the new params: the fused
``step``), ``optax.sgd(momentum=0.9)`` and ``optax.adam``; whole train steps
(ResNet-18 batch 256, each compiled twice in turn, the faster kept); tilings
of the fused step; VGG-16's train step (batch 256); then, as far as the
budget goes (all measured on an H100 before), the per-kernel probes
(``probes.py``), LeNet-5's train step (batch 128), the update with bfloat16
params and the update's scaling from 1e5 to 1e8 parameters (the peak memory
of a train step, ``harness.py memory``, is left out for time). It
writes everything to one JSON file (a failing run is recorded with its error
and the others go on) and the same as Markdown tables (``tables.md``, by
``report.py``), the compiled HLO of the ResNet-18 update and step to
``hlo.tar.gz``, for reading the kernels XLA made after the machine is gone
(up to four files in all, archived after each run), and the
GPU's XLA target config (``gpu_target_config.pbtxt``), with which
``gpu_offline.py`` compiles for this GPU on machines without one. The
runs' processes have XLA's compile timers on: each train step run records
its compiles' phases (``xla_phases``, from ``compile_phases.py``).

Usage::

  python benchmarks/gpu_check.py --out results/       # writes gpu_check.json

On the lent device machine: ``PYTHONPATH=$PWD python3 benchmarks/gpu_check.py
--out $OUT`` with a 370 s timeout, which leaves part of a 15-minute budget
for the machine's start and a rerun (the runs stop at 340 s, so the files
are complete when the command ends).
"""

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import jax

try:
  from benchmarks import compile_phases, harness, multitensor, probes, report
except ImportError:  # run as a script from the repository root
  sys.path.insert(0, __file__.rsplit('/', 2)[0])
  from benchmarks import compile_phases, harness, multitensor, probes, report

# The runs' command lines; {hlo} is replaced by the HLO folder. The first
# word names the run: the harness's mode, or another script (entry_of).
RUNS = [
  # Timings of a kernel only mean something if it computes the right thing:
  # the compiled Triton kernels against dessilbi, first.
  'multitensor --model resnet18 --steps 3',
  (
    'update --model resnet18 --repeats 9 --hlo-dir {hlo} --optimizers'
    ' sgd dessilbi dessilbi_z adam dessilbi_mt dessilbi_mt_z dessilbi_mt_apply'
  ),
  (
    'step --model resnet18 --steps 50 --repeats 5 --hlo-dir {hlo}'
    ' --optimizers sgd dessilbi dessilbi_z dessilbi_mt_apply'
  ),
  # Tilings of the fused step around the default (64x16x4x256, flat block
  # 2048, 16 leaves per launch: 7 launches on ResNet-18; triton_compile.py):
  # 32 leaves (4 launches, 2 % faster and 25-40 % slower to compile on an
  # H100, 2026-11-27), and 8 warps, 5 % faster at 32 leaves in one sample
  # (benchmarks/README.md).
  (
    'update --model resnet18 --repeats 9 --optimizers sgd dessilbi_mt_apply'
    ' dessilbi_mt_apply:64x16x4x256x2048x32'
    ' dessilbi_mt_apply:64x16x8x256'
    ' dessilbi_mt_apply:64x16x8x256x2048x32'
  ),
  (
    'step --model vgg16 --steps 30 --repeats 5 --compile-rounds 1'
    ' --optimizers sgd dessilbi dessilbi_mt_apply'
  ),
  # Measured on an H100 before (all on 2026-11-26, the next two again on
  # 2026-11-27); run as far as the budget allows.
  'probes --k 20 --repeats 15',
  (
    'step --model lenet5 --steps 100 --repeats 9 --compile-rounds 1'
    ' --optimizers sgd dessilbi dessilbi_z dessilbi_mt_apply'
  ),
  (
    'update --model resnet18 --dtype bfloat16 --repeats 9'
    ' --optimizers sgd dessilbi dessilbi_f32 dessilbi_mt_apply'
  ),
  (
    'scaling --sizes 1e5 1e6 1e7 1e8 --k 10 --repeats 7'
    ' --optimizers sgd dessilbi dessilbi_z'
  ),
]


def save_target_config(out: str, timeout: float = 120) -> str:
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
    subprocess.run(
      [sys.executable, '-c', code], env=env, check=True, timeout=timeout
    )
    found = glob.glob(os.path.join(dump, '*gpu_target_config.pbtxt'))
    if not found:
      raise RuntimeError('XLA wrote no gpu_target_config.pbtxt')
    path = os.path.join(out, 'gpu_target_config.pbtxt')
    shutil.copy(found[0], path)
  return path


FUSED = 'dessilbi_mt'  # the fused step's names in the harness


def without_fused(run: str):
  """``run`` without the fused step's optimizers, or None when fewer than
  two optimizers would be left to compare."""
  words = run.split()
  if '--optimizers' not in words:
    return run
  start = words.index('--optimizers') + 1
  end = next(
    (k for k in range(start, len(words)) if words[k].startswith('--')),
    len(words),
  )
  kept = [w for w in words[start:end] if not w.startswith(FUSED)]
  if len(kept) < 2:
    return None
  return ' '.join(words[:start] + kept + words[end:])


def agreed(out: dict) -> bool:
  """Whether the agreement run found the fused kernels computing
  ``dessilbi``'s update."""
  runs = out.get('results', {})
  return (
    'error' not in out and bool(runs) and all(r['ok'] for r in runs.values())
  )


def entry_of(run: str):
  """The function a run's command line is for, and its arguments."""
  argv = run.split()
  scripts = {'multitensor': multitensor.main, 'probes': probes.main}
  if argv[0] in scripts:
    return scripts[argv[0]], argv[1:]
  return harness.main, argv


def run_here(run: str, hlo: str) -> dict:
  """One run in this process; an error (an exception or an argparse exit)
  is recorded in its result."""
  entry, argv = entry_of(run.format(hlo=hlo))
  try:
    out = entry(argv)
  except (Exception, SystemExit):  # record it: the other runs go on
    out = {'error': traceback.format_exc()}
    print(out['error'], flush=True)
  out['devices'] = [str(d) for d in jax.devices()]
  return out


def run_in_child(run: str, hlo: str, timeout: float) -> dict:
  """One run in a fresh process, killed at ``timeout`` seconds: a kernel
  that crashes the process or the GPU context, or a run that overstays the
  budget, costs that run alone.

  The process runs with XLA's compile timers on, its standard error kept in
  a file: a train step's compile phases (``compile_phases.parse``) go into
  the result as ``xla_phases``, and the end of that error output into the
  error of a run that left no result.
  """
  with tempfile.TemporaryDirectory() as tmp:
    result = os.path.join(tmp, 'run.json')
    log = os.path.join(tmp, 'stderr.txt')
    command = [
      sys.executable,
      os.path.abspath(__file__),
      '--child',
      '--hlo-dir',
      hlo,
      '--result',
      result,
      '--run-argv',
      run,
    ]
    env = {**os.environ, **compile_phases.ENV}
    try:
      with open(log, 'w', encoding='utf-8') as err:
        code = subprocess.run(
          command, timeout=timeout, env=env, stderr=err
        ).returncode
    except subprocess.TimeoutExpired:
      return {'error': f'cut off at the budget, after {timeout:.1f} s'}
    with open(log, encoding='utf-8', errors='replace') as f:
      text = f.read()
    if not os.path.exists(result):
      return {
        'error': f'the run exited with code {code} and no result\n'
        + error_tail(text)
      }
    with open(result, encoding='utf-8') as f:
      out = json.load(f)
    phases = compile_phases.parse(text, prefix='jit_step_')
    if phases:
      out['xla_phases'] = phases
    return out


def error_tail(stderr: str, chars: int = 3000) -> str:
  """The end of a run's standard error without XLA's info lines (``I1127
  ...``, the compile timers among them): where a crash says what it was."""
  lines = [
    line for line in stderr.splitlines() if not re.match(r'I\d{4} ', line)
  ]
  return '\n'.join(lines)[-chars:]


def _write(results: dict, out: str) -> None:
  """gpu_check.json and tables.md, each replaced whole (a kill leaves the
  previous complete file)."""
  try:  # the same as Markdown tables, for benchmarks/README.md
    tables = report.report(results)
  except Exception:  # the JSON is what counts
    tables = traceback.format_exc()
  for name, text in (
    ('gpu_check.json', json.dumps(results, indent=2)),
    ('tables.md', tables),
  ):
    tmp = os.path.join(out, name + '.tmp')
    with open(tmp, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp, os.path.join(out, name))


def _archive(hlo: str, out: str) -> None:
  """The HLO texts so far as one file, ``hlo.tar.gz``: a command cut off
  leaves few files in ``out`` (the device tool brings back a handful)."""
  if not os.listdir(hlo):
    return
  tmp = shutil.make_archive(os.path.join(out, 'hlo-partial'), 'gztar', hlo)
  os.replace(tmp, os.path.join(out, 'hlo.tar.gz'))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--out', default='.', help='folder for gpu_check.json')
  parser.add_argument(
    '--budget',
    type=float,
    default=340.0,
    help='seconds for all the runs: a run still going then is stopped and '
    'recorded as cut off, and the runs after it as skipped (default 340, '
    'for a command of under 6 minutes)',
  )
  # One run in this process, for run_in_child.
  parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
  parser.add_argument('--hlo-dir', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--result', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--run-argv', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    out = run_here(args.run_argv, args.hlo_dir)
    with open(args.result, 'w', encoding='utf-8') as f:
      json.dump(out, f)
    return

  start = time.perf_counter()
  os.makedirs(args.out, exist_ok=True)
  # This process leaves the GPU to the runs (JAX would reserve most of its
  # memory here): the devices come from the first run.
  results = {'devices': None, 'budget_s': args.budget, 'runs': []}
  _write(results, args.out)
  hlo = tempfile.mkdtemp(prefix='gpu_check_hlo_')
  fused_ok = True
  for index, run in enumerate(RUNS):
    if not fused_ok:
      run = without_fused(run)
      if run is None:
        results['runs'].append(
          {
            'argv': RUNS[index].format(hlo='<hlo>'),
            'error': 'skipped: the fused kernels '
            'failed the agreement check, and no other optimizer is timed',
          }
        )
        continue
    left = args.budget - (time.perf_counter() - start)
    if left < 15:
      results['runs'].append(
        {'argv': run.format(hlo='<hlo>'), 'error': 'skipped: no budget left'}
      )
      _write(results, args.out)
      continue
    t0 = time.perf_counter()
    out = run_in_child(run, hlo, left)
    out['wall_s'] = time.perf_counter() - t0
    out['argv'] = run.format(hlo='<hlo>')
    devices = out.pop('devices', None)
    results['devices'] = results['devices'] or devices
    results['runs'].append(out)
    if index == 0:
      fused_ok = agreed(out)
      left = args.budget - (time.perf_counter() - start)
      try:  # after the most telling run, not before it
        results['target_config'] = save_target_config(
          args.out, timeout=max(1.0, min(120.0, left))
        )
      except Exception:  # record it and run the rest
        results['target_config_error'] = traceback.format_exc()
    _write(results, args.out)
    _archive(hlo, args.out)
    print(f'  ({out["wall_s"]:.0f} s)', flush=True)
  shutil.rmtree(hlo, ignore_errors=True)


if __name__ == '__main__':
  main()
