"""Side-by-side timing of optimizers: update alone and whole train steps.

Everything is timed in one process, interleaved (A B C A B C ...), and reported
as medians with the ratio to ``optax.sgd(momentum=0.9)``, because machines are
noisy. Params and optimizer state are donated, as a training loop would.

Usage::

  python benchmarks/harness.py step --model lenet5            # train step
  python benchmarks/harness.py update --model resnet18        # update alone
  python benchmarks/harness.py step --model resnet18 --json out.json
  python benchmarks/harness.py memory --model resnet18 --batch 32   # peaks
"""

import argparse
import collections
import gzip
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

import dessilbi_jax as dl

try:
  from benchmarks import hlo_traffic, multitensor
  from benchmarks.models import MODELS
except ImportError:  # run as a script from the repository root
  sys.path.insert(0, __file__.rsplit('/', 2)[0])
  from benchmarks import hlo_traffic, multitensor
  from benchmarks.models import MODELS

OPTIMIZERS: dict[str, Callable[[], optax.GradientTransformation]] = {
  'sgd': lambda: optax.sgd(0.1, momentum=0.9),
  'dessilbi': lambda: dl.dessilbi(0.1, nu=100.0),
  # Γ rebuilt from z and a per-filter scale: less state.
  'dessilbi_z': lambda: dl.dessilbi(0.1, nu=100.0, store_gamma=False),
  'adam': lambda: optax.adam(1e-3),
  # With --dtype bfloat16: momentum, z and Γ in float32 beside the params.
  'dessilbi_f32': lambda: dl.dessilbi(0.1, nu=100.0, state_dtype=jnp.float32),
}
DEFAULT_OPTIMIZERS = ['sgd', 'dessilbi', 'dessilbi_z', 'adam']
# The multi-tensor Pallas step (dl.fused_dessilbi, via benchmarks/multitensor.py
# on its kernels): Triton on a GPU, interpret mode (slow) elsewhere; `_z`
# without Γ in the state, `_apply` writing the new params itself.
# `dessilbi_mt:64x16x4` sets the filters per program, rows per loop iteration
# and warps; `dessilbi_mt:64x16x4x256` also the rows per program.
MULTITENSOR = (
  'dessilbi_mt',
  'dessilbi_mt_z',
  'dessilbi_mt_apply',
  'dessilbi_mt_f32',  # float32 state beside bfloat16 params (--dtype)
)


def multitensor_args(name: str) -> dict:
  """The keyword arguments of ``dessilbi_multitensor`` a name stands for."""
  base, colon, tiles = name.partition(':')
  if base not in MULTITENSOR:
    known = ', '.join([*OPTIMIZERS, *MULTITENSOR])
    raise ValueError(f'unknown optimizer {name!r}; known: {known}.')
  if colon and not tiles:
    tiles = 'x'  # refused below: a colon announces a tiling
  kwargs = {
    'store_gamma': base != 'dessilbi_mt_z',
    'apply': base == 'dessilbi_mt_apply',
  }
  if base == 'dessilbi_mt_f32':
    kwargs['state_dtype'] = jnp.float32
  if tiles:
    parts = tiles.split('x')
    if not 3 <= len(parts) <= 6 or not all(v.isdigit() for v in parts):
      raise ValueError(
        f'{name!r}: expected {base}:COLSxROWSxWARPS[xCHUNK[xBLOCK[xLEAVES]]],'
        f' e.g. {base}:16x64x4, {base}:32x32x4x256 or'
        f' {base}:64x16x4x256x1024x16.'
      )
    cols, rows, warps = (int(v) for v in parts[:3])
    kwargs.update(tile_cols=cols, tile_rows=rows, num_warps=warps)
    if len(parts) >= 4:
      kwargs['chunk_rows'] = int(parts[3])
    if len(parts) >= 5:
      kwargs['block'] = int(parts[4])
    if len(parts) == 6:
      kwargs['leaves_per_kernel'] = int(parts[5])
  return kwargs


def make_optimizer(name: str, interpret=None):
  """The optimizer a command-line name stands for: an Optax transformation,
  or a :class:`dessilbi_jax.FusedDessilbi` (run through its ``step``) for
  ``dessilbi_mt_apply``.

  ``interpret`` goes to the multi-tensor step (False compiles its Triton
  kernels even where the default backend is not a GPU)."""
  if name in OPTIMIZERS:
    return OPTIMIZERS[name]()
  return multitensor.dessilbi_multitensor(
    0.1, nu=100.0, interpret=interpret, **multitensor_args(name)
  )


def apply_step(tx, grads, opt_state, params):
  """One optimizer step: ``tx.update`` then ``optax.apply_updates``, or the
  step of an optimizer that applies its own updates."""
  if isinstance(tx, dl.FusedDessilbi):
    return tx.step(grads, opt_state, params)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


# An instruction line of HLO text: `%name = <shape or (tuple shape)> opcode(`.
_INSTRUCTION = re.compile(
  r'^\s*(?:ROOT )?%[\w.\-]+ = (?:\([^=]*?\)|\S+) ([\w-]+)\(', re.M
)
# XLA marks every fifth element of a long tuple shape: `/*index=5*/f32[8]`.
INDEX_COMMENT = re.compile(r'/\*index=\d+\*/')


def hlo_counts(compiled, entry_only: bool = True) -> dict[str, int]:
  """Fusions, copies and custom calls in a compiled computation's entry (or
  in all its computations)."""
  text = INDEX_COMMENT.sub('', compiled.as_text())
  if entry_only:
    text = text[text.index('ENTRY') :]
  ops = collections.Counter(_INSTRUCTION.findall(text))
  return {
    'fusions': ops.get('fusion', 0),
    'copies': ops.get('copy', 0),
    'custom_calls': ops.get('custom-call', 0),
  }


def traffic_mb(compiled) -> float:
  """Megabytes (to the kilobyte) that the compiled computation's kernels,
  its fusions and copies, read and write, by their operands and results
  (``hlo_traffic.py``)."""
  moved = hlo_traffic.traffic(compiled.as_text())
  return round(sum(m['bytes'] for m in moved.values()) / 1e6, 3)


def save_hlo(args, name: str, compiled) -> None:
  """Writes the compiled computation's text to --hlo-dir (gzipped)."""
  if not args.hlo_dir:
    return
  os.makedirs(args.hlo_dir, exist_ok=True)
  safe = re.sub(r'[^\w.-]', '_', name)
  path = os.path.join(args.hlo_dir, f'{args.mode}_{args.model}_{safe}.hlo.gz')
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    f.write(compiled.as_text())


def memory(compiled) -> dict[str, int]:
  """XLA's memory analysis of a compiled computation (bytes)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return {}
  return {
    key: int(getattr(stats, f'{key}_size_in_bytes'))
    for key in ('argument', 'output', 'temp', 'alias')
  }


def state_bytes(state) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))


def build(model_name: str, batch: int | None, dtype: str = 'float32'):
  """A model, its params (cast to dtype), BatchNorm statistics and a batch."""
  module, shape, default_batch = MODELS[model_name]
  batch = batch or default_batch
  x = jax.random.normal(jax.random.key(0), (batch, *shape))
  y = jax.random.randint(jax.random.key(1), (batch,), 0, 10)
  # One compile: Linen's init run eagerly compiles each op on its own (75
  # compiles); jitted, the harness starts about 2 s sooner for LeNet-5 on 2
  # cores.
  variables = jax.jit(module.init)(jax.random.key(2), x[:2])
  params = jax.tree.map(lambda p: p.astype(dtype), variables['params'])
  stats = variables.get('batch_stats', {})
  return module, params, stats, x.astype(dtype), y


def make_train_step(module, tx, options=None, name='step'):
  """The jitted train step (params, BatchNorm statistics and optimizer state
  donated), compiled with XLA ``options`` (``jax.jit``'s
  ``compiler_options``); ``name`` names the compiled module."""

  def loss_fn(params, stats, x, y):
    logits, new = module.apply(
      {'params': params, 'batch_stats': stats}, x, mutable=['batch_stats']
    )
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, new.get('batch_stats', {})

  def step(params, stats, opt_state, x, y):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      params, stats, x, y
    )
    params, opt_state = apply_step(tx, grads, opt_state, params)
    return params, stats, opt_state, loss

  step.__name__ = name
  return jax.jit(step, donate_argnums=(0, 1, 2), compiler_options=options)


def step_name(optimizer: str) -> str:
  """The train step's name for ``optimizer`` (its compiled module is
  ``jit_`` + this, as XLA's compile timers name it)."""
  return 'step_' + re.sub(r'\W', '_', optimizer)


def make_update(tx, k: int, options=None):
  """k optimizer updates inside one jit (dispatch amortised)."""

  def run(params, opt_state, grads):
    def body(carry, _):
      params, opt_state = carry
      return apply_step(tx, grads, opt_state, params), None

    (params, opt_state), _ = jax.lax.scan(body, (params, opt_state), length=k)
    return params, opt_state

  return jax.jit(run, donate_argnums=(0, 1), compiler_options=options)


def copy_tree(tree):
  return jax.tree.map(jnp.copy, tree)


def bytes_moved(params, opt_state) -> int:
  """Bytes an update moves at least: read g, W and the state; write W and
  the state."""
  param_bytes = state_bytes(params)
  return param_bytes + 2 * (param_bytes + state_bytes(opt_state))


def copy_bandwidth(n: int, k: int, repeats: int) -> float:
  """Device bandwidth (bytes/s, read + write) of a flat elementwise pass."""
  run = jax.jit(
    lambda x: jax.lax.fori_loop(0, k, lambda i, x: x + 1, x),
    donate_argnums=0,
  )
  x = run(jnp.zeros((n,), jnp.float32))
  jax.block_until_ready(x)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    x = run(x)
    jax.block_until_ready(x)
    times.append((time.perf_counter() - t0) / k)
  return 2 * 4 * n / statistics.median(times)


def bench_step(args) -> dict:
  module, params, stats, x, y = build(args.model, args.batch, args.dtype)
  # One throwaway compile first, so that the first optimizer's compile time
  # does not include the convolutions' autotuning.
  warm = make_train_step(module, optax.sgd(0.1), args.xla_options)
  warm.lower(params, stats, optax.sgd(0.1).init(params), x, y).compile()
  runners = {}
  for name in args.optimizers:
    tx = make_optimizer(name)
    step = make_train_step(module, tx, args.xla_options, step_name(name))
    p, s = copy_tree(params), copy_tree(stats)
    o = tx.init(p)
    t0 = time.perf_counter()
    compiled = step.lower(p, s, o, x, y).compile()
    compile_s = time.perf_counter() - t0
    save_hlo(args, name, compiled)
    p, s, o, loss = step(p, s, o, x, y)
    jax.block_until_ready(loss)
    runners[name] = {
      'step': step,
      'carry': (p, s, o),
      'compile_s': [compile_s],
      'hlo': {**hlo_counts(compiled), 'traffic_mb': traffic_mb(compiled)},
      'memory': memory(compiled),
      'state_bytes': state_bytes(o),
      'loop_ms': [],
      'call_ms': [],
    }
  # More compiles, each optimizer's in turn (A B A B ...): a process's
  # first compiles also pay for one-time work, so the fastest is reported.
  for _ in range(args.compile_rounds - 1):
    for name, r in runners.items():
      tx = make_optimizer(name)
      step = make_train_step(module, tx, args.xla_options, step_name(name))
      o = tx.init(params)
      t0 = time.perf_counter()
      step.lower(params, stats, o, x, y).compile()
      r['compile_s'].append(time.perf_counter() - t0)
  for _ in range(args.repeats):
    for r in runners.values():
      p, s, o = r['carry']
      t0 = time.perf_counter()
      for _ in range(args.steps):  # dispatched back to back, one block
        p, s, o, loss = r['step'](p, s, o, x, y)
      jax.block_until_ready(loss)
      r['loop_ms'].append((time.perf_counter() - t0) / args.steps * 1e3)
      t0 = time.perf_counter()
      for _ in range(min(args.steps, 10)):  # blocking on every call
        p, s, o, loss = r['step'](p, s, o, x, y)
        jax.block_until_ready(loss)
      r['call_ms'].append(
        (time.perf_counter() - t0) / min(args.steps, 10) * 1e3
      )
      r['carry'] = (p, s, o)
  return summarise(args, runners, ('loop_ms', 'call_ms'))


def bench_update(args) -> dict:
  _, params, _, _, _ = build(args.model, 2, args.dtype)
  grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
  runners = {}
  for name in args.optimizers:
    tx = make_optimizer(name)
    run_k = make_update(tx, args.k, args.xla_options)
    run_1 = jax.jit(
      lambda p, o, g, tx=tx: apply_step(tx, g, o, p),
      donate_argnums=(0, 1),
      compiler_options=args.xla_options,
    )
    p = copy_tree(params)
    o = tx.init(p)
    compiled = run_1.lower(p, o, grads).compile()
    save_hlo(args, name, compiled)
    p, o = run_k(p, o, grads)
    p, o = run_1(p, o, grads)
    jax.block_until_ready(p)
    runners[name] = {
      'run_k': run_k,
      'run_1': run_1,
      'carry': (p, o),
      'hlo': hlo_counts(compiled),
      'memory': memory(compiled),
      'state_bytes': state_bytes(o),
      'bytes_moved': bytes_moved(params, o),
      'device_ms': [],
      'call_ms': [],
    }
  for _ in range(args.repeats):
    for r in runners.values():
      p, o = r['carry']
      t0 = time.perf_counter()
      p, o = r['run_k'](p, o, grads)
      jax.block_until_ready(p)
      r['device_ms'].append((time.perf_counter() - t0) / args.k * 1e3)
      t0 = time.perf_counter()
      for _ in range(10):
        p, o = r['run_1'](p, o, grads)
        jax.block_until_ready(p)
      r['call_ms'].append((time.perf_counter() - t0) / 10 * 1e3)
      r['carry'] = (p, o)
  out = summarise(args, runners, ('device_ms', 'call_ms'))
  n = sum(p.size for p in jax.tree.leaves(params))
  bandwidth = copy_bandwidth(n, args.k, args.repeats)
  out['copy_bandwidth_GBps'] = bandwidth / 1e9
  for name, row in out['results'].items():
    row['bytes_moved'] = runners[name]['bytes_moved']
    row['floor_ms'] = row['bytes_moved'] / bandwidth * 1e3
    row['device_vs_floor'] = row['device_ms'] / row['floor_ms']
  return out


def bench_scaling(args) -> dict:
  """Update time (k updates per jit) and state bytes against model size.

  The params are 8 conv kernels 3x3xCxC (and 8 biases) with C chosen for
  each total size, so the leaf count stays fixed while the size grows.
  """
  out = {
    'mode': 'scaling',
    'device': str(jax.devices()[0].device_kind),
    'backend': jax.default_backend(),
    'jax': jax.__version__,
    'rows': [],
  }
  for size in args.sizes:
    c = max(4, round((size / (8 * 9)) ** 0.5))
    params = {
      f'conv{i}': {'kernel': jnp.zeros((3, 3, c, c)), 'bias': jnp.zeros(c)}
      for i in range(8)
    }
    grads = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    n = sum(p.size for p in jax.tree.leaves(params))
    row = {'params': n}
    for name in args.optimizers:
      tx = make_optimizer(name)
      run_k = make_update(tx, args.k, args.xla_options)
      p, o = copy_tree(params), tx.init(params)
      p, o = run_k(p, o, grads)
      jax.block_until_ready(p)
      times = []
      for _ in range(args.repeats):
        t0 = time.perf_counter()
        p, o = run_k(p, o, grads)
        jax.block_until_ready(p)
        times.append((time.perf_counter() - t0) / args.k * 1e3)
      row[name] = {
        'device_ms': statistics.median(times),
        'state_bytes': state_bytes(o),
      }
      del p, o
    out['rows'].append(row)
    print(
      f'{n:>11,d} params  '
      + '  '.join(
        f'{k} {v["device_ms"]:8.3f} ms {v["state_bytes"] / 2**20:8.1f} MiB'
        for k, v in row.items()
        if k != 'params'
      ),
      flush=True,
    )
  return out


# --steps when not given: steps per timing, and the memory mode's train steps
# before it reads the peak (a few: it reads a high-water mark, not a time).
STEPS = 50
MEMORY_STEPS = 3

# The baseline of the memory mode: a stateless optimizer, so that what the
# others add at peak (state, and temporaries of their update) shows as a delta.
BASELINE = 'gd'


def _peak_bytes() -> tuple[int, str]:
  """Peak memory of this process so far: the device's allocator where it
  reports one (GPU, TPU), else the process's peak resident set (CPU)."""
  stats = jax.devices()[0].memory_stats()
  if stats and 'peak_bytes_in_use' in stats:
    return int(stats['peak_bytes_in_use']), 'device peak_bytes_in_use'
  # VmHWM is this process image's own peak; ru_maxrss would also count the
  # parent's resident set at the time it forked this process (Linux).
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024, 'peak RSS'
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, 'peak RSS'


def _memory_one(
  model: str, batch: int | None, name: str, steps: int, options=None
) -> dict:
  """Runs a few train steps with one optimizer; meant for a fresh process."""
  module, params, stats, x, y = build(model, batch)
  tx = optax.sgd(0.1) if name == BASELINE else make_optimizer(name)
  step = make_train_step(module, tx, options)
  o = tx.init(params)
  compiled = step.lower(params, stats, o, x, y).compile()
  p, s = params, stats
  for _ in range(steps):
    p, s, o, loss = step(p, s, o, x, y)
  jax.block_until_ready(loss)
  peak, source = _peak_bytes()
  return {
    'peak_bytes': peak,
    'source': source,
    'state_bytes': state_bytes(o),
    'memory': memory(compiled),
  }


def _in_fresh_process(fn, *args):
  """``fn(*args)`` run by a new Python process (fn a function of this module
  returning JSON data), so that its memory peak is its own."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = (
    'import json, sys; from benchmarks import harness; '
    f'print(json.dumps(harness.{fn.__name__}(*json.loads(sys.argv[1]))))'
  )
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(
    p for p in (root, env.get('PYTHONPATH')) if p
  )
  done = subprocess.run(
    [sys.executable, '-c', code, json.dumps(args)],
    env=env,
    capture_output=True,
    text=True,
    check=False,
  )
  if done.returncode:
    raise RuntimeError(f'{fn.__name__}{args} failed:\n{done.stderr}')
  return json.loads(done.stdout.strip().splitlines()[-1])


def compiled_peak(mem: dict[str, int]) -> int:
  """The buffers a compiled step holds at once, by XLA's buffer assignment:
  arguments + outputs + temporaries, less the outputs aliased to (donated)
  arguments."""
  return mem['argument'] + mem['output'] + mem['temp'] - mem['alias']


def bench_memory(args) -> dict:
  """Peak memory of a train step per optimizer, each in a fresh process.

  Two figures per optimizer, each also as the difference from a stateless
  ``optax.sgd`` (no momentum) measured the same way: the measured peak (the
  device allocator's on GPU/TPU; on CPU the process's resident set, which
  also counts compilation and varies by tens of MiB between runs), and the
  compiled step's own peak by XLA's buffer assignment (exact, every backend).
  """
  out = {
    'mode': 'memory',
    'model': args.model,
    'steps': args.steps,
    'device': str(jax.devices()[0].device_kind),
    'backend': jax.default_backend(),
    'jax': jax.__version__,
    'results': {},
  }
  names = [BASELINE] + [n for n in args.optimizers if n != BASELINE]
  for name in names:
    row = _in_fresh_process(
      _memory_one, args.model, args.batch, name, args.steps, args.xla_options
    )
    row['compiled_peak_bytes'] = compiled_peak(row['memory'])
    out['results'][name] = row
  base = out['results'][BASELINE]
  mib = 2**20
  print(f'memory / {args.model} on {out["device"]} ({out["backend"]})')
  for name, row in out['results'].items():
    for key in ('peak_bytes', 'compiled_peak_bytes'):
      row[key.replace('_bytes', '_over_baseline_bytes')] = row[key] - base[key]
    print(
      f'{name:10s} state {row["state_bytes"] / mib:7.1f} MiB'
      f'  compiled peak {row["compiled_peak_bytes"] / mib:8.1f} MiB'
      f' ({row["compiled_peak_over_baseline_bytes"] / mib:+.1f})'
      f'  {row["source"]} {row["peak_bytes"] / mib:8.1f} MiB'
      f' ({row["peak_over_baseline_bytes"] / mib:+.1f})'
    )
  return out


def summarise(args, runners, keys) -> dict:
  out = {
    'mode': args.mode,
    'model': args.model,
    'device': str(jax.devices()[0].device_kind),
    'backend': jax.default_backend(),
    'jax': jax.__version__,
    'results': {},
  }
  base = runners.get('sgd')
  for name, r in runners.items():
    row = {key: statistics.median(r[key]) for key in keys}
    row.update(hlo=r['hlo'], memory=r['memory'], state_bytes=r['state_bytes'])
    if 'compile_s' in r:
      row['compile_s'] = min(r['compile_s'])
      row['compile_s_samples'] = r['compile_s']
    if base is not None:
      for key in keys:
        row[f'{key}_vs_sgd'] = row[key] / statistics.median(base[key])
    out['results'][name] = row
  return out


def print_table(out: dict) -> None:
  print(f'{out["mode"]} / {out["model"]} on {out["device"]} ({out["backend"]})')
  for name, row in out['results'].items():
    cols = [f'{name:9s}']
    for key, value in row.items():
      if key.endswith('_ms') and key != 'floor_ms':
        ratio = row.get(f'{key}_vs_sgd')
        cols.append(
          f'{key} {value:8.3f}' + (f' ({ratio:.2f}x)' if ratio else '')
        )
    hlo = row['hlo']
    cols.append(f'copies {hlo["copies"]} fusions {hlo["fusions"]}')
    if 'traffic_mb' in hlo:
      cols.append(f'moved {hlo["traffic_mb"]:.1f} MB')
    if hlo.get('custom_calls'):
      cols.append(f'custom calls {hlo["custom_calls"]}')
    if 'floor_ms' in row:
      ratio = row['device_vs_floor']
      cols.append(f'floor {row["floor_ms"]:.3f} ({ratio:.2f}x)')
    cols.append(f'state {row["state_bytes"] / 2**20:.1f} MiB')
    if row.get('memory'):
      cols.append(f'temp {row["memory"]["temp"] / 2**20:.1f} MiB')
    if 'compile_s' in row:
      cols.append(f'compile {row["compile_s"]:.1f} s')
    print('  '.join(cols))


def _option_value(text: str):
  """An XLA option's value from the command line: bool, int, float or str."""
  if text.lower() in ('true', 'false'):
    return text.lower() == 'true'
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text


def xla_options(pairs) -> dict | None:
  """``KEY=VALUE`` strings as ``jax.jit`` compiler options (None if none).

  Raises:
    ValueError: a string is not of that form.
  """
  options = {}
  for option in pairs:
    key, sep, value = option.partition('=')
    if not sep or not key:
      raise ValueError(f'expected KEY=VALUE, got {option!r}.')
    options[key] = _option_value(value)
  return options or None


def positive_int(text: str) -> int:
  """An argparse type: an int of at least 1 (a count of steps or repeats)."""
  try:
    value = int(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'expected an int, got {text!r}') from None
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected at least 1, got {value}')
  return value


def positive_size(text: str) -> float:
  """An argparse type: a finite number above 0 (a parameter count)."""
  try:
    value = float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
      f'expected a number, got {text!r}'
    ) from None
  if not 0 < value < float('inf'):
    raise argparse.ArgumentTypeError(f'expected a number above 0, got {text}')
  return value


def check_names(parser, model: str, optimizers, xla_option) -> dict:
  """Exits through ``parser`` with the reason where the model, an optimizer
  name or an XLA option is unknown or malformed; else the XLA options."""
  if model not in MODELS:
    parser.error(
      f'--model: unknown model {model!r}; known: {", ".join(MODELS)}'
    )
  try:
    options = xla_options(xla_option)
  except ValueError as e:
    parser.error(f'--xla-option: {e}')
  for name in optimizers:
    try:
      make_optimizer(name)
    except ValueError as e:
      parser.error(f'--optimizers: {e}')
  return options


def parse_args(argv=None) -> argparse.Namespace:
  """The harness's command line, with the optimizer names checked."""
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('mode', choices=('step', 'update', 'scaling', 'memory'))
  parser.add_argument('--model', choices=sorted(MODELS), default='lenet5')
  parser.add_argument(
    '--batch',
    type=positive_int,
    default=None,
    help="batch size (default: the model's, models.py)",
  )
  parser.add_argument(
    '--dtype',
    choices=('float32', 'bfloat16'),
    default='float32',
    help='dtype of the params and the batch (step and update modes)',
  )
  parser.add_argument('--optimizers', nargs='+', default=DEFAULT_OPTIMIZERS)
  parser.add_argument(
    '--steps',
    type=positive_int,
    default=None,
    help=f'steps per timing (default {STEPS}); memory mode: train steps run '
    f'before the peak is read (default {MEMORY_STEPS})',
  )
  parser.add_argument(
    '--k', type=positive_int, default=20, help='updates per jit'
  )
  parser.add_argument('--repeats', type=positive_int, default=9)
  parser.add_argument(
    '--compile-rounds',
    type=positive_int,
    default=2,
    help='step mode: compiles of each train step, in turn (A B A B ...); '
    'the fastest is reported, as the first compiles of a process also pay '
    'for one-time work (default 2)',
  )
  parser.add_argument(
    '--sizes',
    type=positive_size,
    nargs='+',
    default=[1e5, 1e6, 1e7],
    help='parameter counts for the scaling mode',
  )
  parser.add_argument(
    '--xla-option',
    action='append',
    default=[],
    metavar='KEY=VALUE',
    help='an XLA option for every compiled step, e.g. '
    'xla_cpu_copy_insertion_use_region_analysis=true (repeatable)',
  )
  parser.add_argument('--json', default=None, help='write results here')
  parser.add_argument(
    '--hlo-dir', default=None, help='write the compiled HLO texts here'
  )
  args = parser.parse_args(argv)
  if args.steps is None:
    args.steps = MEMORY_STEPS if args.mode == 'memory' else STEPS
  if args.dtype != 'float32' and args.mode in ('scaling', 'memory'):
    parser.error(
      f'--dtype: {args.mode} mode runs in float32; {args.dtype} is for the '
      'step and update modes'
    )
  args.xla_options = check_names(
    parser, args.model, args.optimizers, args.xla_option
  )
  return args


def main(argv=None):
  args = parse_args(argv)
  if args.mode == 'scaling':
    out = bench_scaling(args)
  elif args.mode == 'memory':
    out = bench_memory(args)
  else:
    out = bench_step(args) if args.mode == 'step' else bench_update(args)
    print_table(out)
  out['xla_options'] = args.xla_options
  if args.json:
    with open(args.json, 'w', encoding='utf-8') as f:
      json.dump(out, f, indent=2)
  return out


if __name__ == '__main__':
  main()
