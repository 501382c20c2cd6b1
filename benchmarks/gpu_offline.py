"""Compiles the update or train step for a GPU on a machine without one.

XLA can compile for a GPU it is only told about: a *target config* (the
``gpu_target_config.pbtxt`` that ``gpu_check.py`` saves from the lent GPU
machine, or any XLA GPU target config) describes the device, and JAX's
compile-only topology compiles against it. What comes out is what that GPU
would run, exactly: the fusions, the copies and the kernels launched (read from
XLA's thunk sequence), and the bytes those kernels read and write
(``hlo_traffic.py``), so the kernel structure of a change can be checked
before a GPU is available. The one thing timed is the compile: seconds to
trace, lower and compile each optimizer's function (``compile_s``; the trace
and lowering alone, ``lower_s``), the median of ``--repeats`` compiles run in
turn (A B A B ...), on this machine's CPU.

Needs the CUDA build of JAX (``pip install "jax[cuda12]"``, about 6 GB of
libraries; no GPU or driver is needed) in the environment that runs this.

Usage::

  python benchmarks/gpu_offline.py --target-config gpu_target_config.pbtxt \\
      update --model resnet18 --optimizers sgd dessilbi dessilbi_mt
  python benchmarks/gpu_offline.py --target-config gpu_target_config.pbtxt \\
      update --devices 8 --optimizers dessilbi dessilbi_mt_apply
"""

import argparse
import collections
import contextlib
import glob
import os
import re
import shutil
import statistics
import sys
import tempfile
import time


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--target-config', required=True, help='an XLA GPU target config (text)'
  )
  parser.add_argument('mode', choices=('update', 'step'))
  parser.add_argument('--model', default='resnet18')
  parser.add_argument('--batch', type=_count, default=None)
  parser.add_argument(
    '--optimizers', nargs='+', default=['sgd', 'dessilbi', 'dessilbi_z']
  )
  parser.add_argument(
    '--xla-option', action='append', default=[], metavar='KEY=VALUE'
  )
  parser.add_argument(
    '--dump', default=None, help='keep XLA dumps (HLO, thunks) in this folder'
  )
  parser.add_argument(
    '--repeats', type=_count, default=1, help='compiles per optimizer, in turn'
  )
  parser.add_argument(
    '--phases',
    action='store_true',
    help="XLA's compile timers: the seconds of each phase (HLO passes, "
    'backend, LLVM to PTX, ptxas), from the fastest compile',
  )
  parser.add_argument(
    '--devices',
    type=_count,
    default=1,
    help='compile for this many GPUs of the target: leaves split by their'
    ' last axis (and the batch by its first) where it divides, automatic'
    ' axes; the collectives are counted',
  )
  return parser


def _count(text: str) -> int:
  # harness.positive_int, which cannot be imported before JAX's flags are set.
  if not text.isdigit() or int(text) < 1:
    raise argparse.ArgumentTypeError(f'expected an int >= 1, got {text!r}')
  return int(text)


def main(argv=None) -> dict:
  parser = _parser()
  args = parser.parse_args(argv)
  if not os.path.isfile(args.target_config):
    parser.error(
      f'--target-config: no file {args.target_config!r} (gpu_check.py saves '
      "the lent GPU's as gpu_target_config.pbtxt)"
    )
  with open(args.target_config, encoding='utf-8') as f:
    target_config = f.read()
  dump = args.dump or tempfile.mkdtemp(prefix='gpu_offline_')
  # Both must be set before JAX starts: the CUDA plugin then registers its
  # compile-only topology without looking for a device, and XLA writes the
  # thunk sequence (the kernels launched) of every compiled module.
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ['XLA_FLAGS'] = (
    os.environ.get('XLA_FLAGS', '') + f' --xla_dump_to={dump}'
  ).strip()
  try:
    from benchmarks import compile_phases
  except ImportError:  # run as a script from the repository root
    sys.path.insert(0, __file__.rsplit('/', 2)[0])
    from benchmarks import compile_phases
  if args.phases:  # before JAX starts, which reads them once
    os.environ.update(compile_phases.ENV)

  import jax
  from jax.experimental import topologies

  from benchmarks import harness

  try:
    options = harness.check_names(
      parser, args.model, args.optimizers, args.xla_option
    )
    try:
      topology = topologies.get_topology_desc(
        '', 'cuda', target_config=target_config, topology=f'1x1x{args.devices}'
      )
    except NotImplementedError:
      parser.error(
        'this JAX cannot compile for CUDA: install its CUDA build in this '
        'environment (pip install "jax[cuda12]"; no GPU or driver is needed).'
      )
  except SystemExit:
    # Refused before compiling anything: no dump folder of ours left behind.
    if not args.dump:
      shutil.rmtree(dump, ignore_errors=True)
    raise
  mesh = jax.sharding.Mesh(
    topology.devices,
    ('data',),
    axis_types=(jax.sharding.AxisType.Auto,),
  )

  def abstract(tree, axis=-1):
    """Shapes placed on the mesh, split along ``axis`` where it divides."""

    def one(x):
      spec = split_spec(x.shape, args.devices, axis)
      sharding = jax.sharding.NamedSharding(mesh, spec)
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    return jax.tree.map(one, tree)

  module, params, stats, x, y = harness.build(args.model, args.batch)
  if args.mode == 'update':
    grads = jax.tree.map(jax.numpy.ones_like, params)

  def compile_one(name, tag):
    """The optimizer's update or train step compiled for the GPU, and the
    seconds its trace, lowering and compile took."""
    # The fused step's Triton kernels, not their CPU interpreter.
    tx = harness.make_optimizer(name, interpret=False)
    state = tx.init(params)
    if args.mode == 'update':

      def run(p, o, g):
        return harness.apply_step(tx, g, o, p)

      run.__name__ = tag
      jitted = jax.jit(run, donate_argnums=(0, 1), compiler_options=options)
      inputs = abstract((params, state, grads))
    else:
      jitted = harness.make_train_step(module, tx, options, tag)
      inputs = (*abstract((params, stats, state)), *abstract((x, y), 0))
    start = time.perf_counter()
    with _abstract_gpu(jax, topology.devices[0].device_kind):
      traced = jitted.trace(*inputs)
      lowered = traced.lower(lowering_platforms=('cuda',))
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    return compiled, lowered_at - start, time.perf_counter() - start

  seconds = collections.defaultdict(list)
  lower_seconds = collections.defaultdict(list)
  results = {}
  # Each optimizer's function name: its compiled module is 'jit_' + this.
  tags = {
    name: 'offline_' + re.sub(r'\W', '_', name) for name in args.optimizers
  }
  with tempfile.TemporaryFile(mode='w+b') as log:
    for _ in range(args.repeats):
      for name in args.optimizers:
        tag = tags[name]
        with _stderr_to(log) if args.phases else contextlib.nullcontext():
          compiled, lowering, took = compile_one(name, tag)
        seconds[name].append(took)
        lower_seconds[name].append(lowering)
        row = harness.hlo_counts(compiled)
        row['traffic_mb'] = harness.traffic_mb(compiled)
        row['kernels'] = _launches(dump, tag)
        if args.devices > 1:
          row['collectives'] = collectives(compiled.as_text())
        results[name] = row
    log.seek(0)
    phases = compile_phases.parse(log.read().decode(errors='replace'))
  for name, row in results.items():
    row['compile_s'] = round(statistics.median(seconds[name]), 2)
    row['lower_s'] = round(statistics.median(lower_seconds[name]), 2)
    compiles = phases.get('jit_' + tags[name])
    if compiles:
      row['phases'] = compile_phases.fastest(compiles)
    print(f'{name:22s} ' + '  '.join(f'{k} {v}' for k, v in row.items()))
  device = topology.devices[0].device_kind
  print(f'({args.mode} / {args.model}, compiled for {device}; dumps: {dump})')
  return results


@contextlib.contextmanager
def _stderr_to(file):
  """Standard error (file descriptor 2, where XLA logs) into ``file``."""
  sys.stderr.flush()
  saved = os.dup(2)
  os.dup2(file.fileno(), 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)


def split_spec(shape, devices: int, axis: int):
  """A PartitionSpec splitting ``axis`` over the mesh's ``'data'`` axis if
  its size divides by ``devices`` (> 1), else replicating."""
  from jax.sharding import PartitionSpec

  if devices == 1 or not shape or shape[axis] % devices:
    return PartitionSpec()
  spec = [None] * len(shape)
  spec[axis] = 'data'
  return PartitionSpec(*spec)


_COLLECTIVE = re.compile(
  r' = (?:\([^=]*?\)|\S+) (all-gather|all-reduce|reduce-scatter|'
  r'all-to-all|collective-permute)(?:-start)?\('
)


def collectives(hlo: str) -> dict[str, int]:
  """Collective operations in compiled HLO text, by kind (an asynchronous
  one counted once, at its start)."""
  from benchmarks import harness  # JAX has started by now

  # A long tuple shape has `/*index=5*/` marks.
  hlo = harness.INDEX_COMMENT.sub('', hlo)
  return dict(collections.Counter(_COLLECTIVE.findall(hlo)))


def _abstract_gpu(jax, device_kind: str):
  """A context naming the target GPU to Pallas's Triton lowering.

  Newer JAX versions read it from the abstract mesh when no GPU is attached
  (and refuse to lower a Triton kernel without it); older ones have no
  ``AbstractDevice`` and need nothing.
  """
  if not hasattr(jax.sharding, 'AbstractDevice'):
    return contextlib.nullcontext()
  gpu = jax.sharding.AbstractDevice(
    device_kind=device_kind, num_cores=None, platform='gpu'
  )
  return jax.sharding.use_abstract_mesh(
    jax.sharding.AbstractMesh((), (), abstract_device=gpu)
  )


def _launches(dump: str, name: str) -> dict[str, int]:
  """Thunks of a compiled module by kind (kernels, copies, command buffers).

  XLA writes the sequence after its thunk passes only when they changed it.
  """
  files = []
  for suffix in ('thunk_sequence_after_thunk_passes', 'thunk_sequence'):
    files = files or sorted(
      glob.glob(os.path.join(dump, f'*.jit_{name}.{suffix}.txt'))
    )
  if not files:
    return {}
  with open(files[-1], encoding='utf-8') as f:
    kinds = re.findall(r'^\s*\d+: (k\w+)', f.read(), re.M)
  return dict(collections.Counter(kinds))


if __name__ == '__main__':
  main()
