"""Compiles the fused step's kernels for a GPU, without a GPU.

Lowers ``dl.fused_dessilbi`` (through ``dessilbi_multitensor``) for CUDA on
the current machine, captures the Triton IR Pallas makes for each of its two
kernels, compiles it with the ``triton`` package for an NVIDIA architecture
(sm_90 = H100 by default) and prints what the GPU would run: the grid, the
kernel's parameter bytes (CUDA's classic limit is 4 KB), its registers,
spills and shared memory from ``cuobjdump``, and how many of its programs
those registers let an SM hold at once (``--dump DIR`` writes the PTX and
SASS). A quick check of a kernel change before a GPU is available; it does
not time anything.

Needs ``pip install triton`` (its wheel ships ``ptxas`` and ``cuobjdump``).
It reaches into one JAX internal, the Pallas Triton lowering entry point
(``jax._src.pallas.triton.lowering.lower_jaxpr_to_triton_module``), to
capture the IR; checked with JAX 0.10.2 and 0.11.2 and triton 3.9.

Usage::

  python benchmarks/triton_compile.py --model resnet18 --optimizer dessilbi_mt
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

import dessilbi_jax as dl

try:
  from benchmarks import harness
except ImportError:  # run as a script from the repository root
  sys.path.insert(0, __file__.rsplit('/', 2)[0])
  from benchmarks import harness


def capture_triton_ir(model: str, optimizer: str) -> list[tuple[str, tuple]]:
  """The Triton IR (text) and grid of each of the optimizer's kernels for a
  model's params (two with ``chunk_rows``, else one). ``model`` is a name in
  ``harness.MODELS``, or ``conv:3x3x512x512``: one conv kernel of that
  shape (the default rule groups it by filter)."""
  # A JAX internal: the entry point of the Pallas Triton lowering.
  from jax._src.pallas.triton import lowering

  captured = []
  original = lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    module = original(*args, **kwargs)
    captured.append((module.module.operation.get_asm(), module.grid))
    return module

  if model.startswith('conv:'):
    shape = tuple(int(n) for n in model.removeprefix('conv:').split('x'))
    params = {'conv': {'kernel': jnp.zeros(shape)}}
  else:
    _, params, _, _, _ = harness.build(model, 2)
  tx = harness.make_optimizer(optimizer, interpret=False)
  state = tx.init(params)
  fn = tx.step if isinstance(tx, dl.FusedDessilbi) else tx.update
  gpu = jax.sharding.AbstractDevice(
    device_kind='NVIDIA H100 80GB HBM3', num_cores=None, platform='gpu'
  )
  lowering.lower_jaxpr_to_triton_module = capture
  try:
    with jax.sharding.use_abstract_mesh(
      jax.sharding.AbstractMesh((), (), abstract_device=gpu)
    ):
      jax.jit(fn).trace(params, state, params).lower(
        lowering_platforms=('cuda',)
      )
  finally:
    lowering.lower_jaxpr_to_triton_module = original
  if not captured:
    raise RuntimeError('the optimizer lowered to no Triton kernel.')
  return captured


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--model',
    default='resnet18',
    help="a model's name, or conv:HxWxINxOUT for one conv kernel",
  )
  parser.add_argument('--optimizer', default='dessilbi_mt')
  parser.add_argument('--arch', type=int, default=90, help='e.g. 90 = H100')
  parser.add_argument('--num-stages', type=int, default=3)
  parser.add_argument(
    '--dump',
    metavar='DIR',
    help="write each kernel's PTX and SASS (cuobjdump -sass) to DIR",
  )
  args = parser.parse_args(argv)
  if args.optimizer.partition(':')[0] not in harness.MULTITENSOR:
    parser.error(
      f'--optimizer: {args.optimizer!r} makes no Triton kernel; this script '
      f'takes {", ".join(harness.MULTITENSOR)} (with a tiling after a colon).'
    )
  try:
    warps = harness.multitensor_args(args.optimizer).get('num_warps', 4)
  except ValueError as e:
    parser.error(f'--optimizer: {e}')
  conv = args.model.removeprefix('conv:')
  if args.model not in harness.MODELS and not (
    args.model.startswith('conv:')
    and all(v.isdigit() and int(v) > 0 for v in conv.split('x'))
  ):
    parser.error(
      f'--model: expected one of {", ".join(harness.MODELS)} or '
      f'conv:HxWxINxOUT (e.g. conv:3x3x512x512); got {args.model!r}.'
    )
  # Optional, so imported here; XLA's own Triton fuses multiply-adds too.
  os.environ.setdefault('TRITON_DEFAULT_FP_FUSION', '1')
  try:
    import triton
    from triton.backends.compiler import GPUTarget
  except ImportError:
    parser.error('needs the triton package: pip install triton')
  for n, (ir, grid) in enumerate(capture_triton_ir(args.model, args.optimizer)):
    _compile_and_report(n, ir, grid, args, warps, triton, GPUTarget)


def _compile_and_report(n, ir, grid, args, warps, triton, GPUTarget):
  """Compiles the ``n``-th launch's Triton IR and prints its grid and
  resources."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, 'kernel.ttir')
    with open(path, 'w', encoding='utf-8') as f:
      f.write(ir)
    kernel = triton.compile(
      path,
      target=GPUTarget('cuda', args.arch, 32),
      options={'num_warps': warps, 'num_stages': args.num_stages},
    )
    cubin = os.path.join(tmp, 'kernel.cubin')
    with open(cubin, 'wb') as f:
      f.write(kernel.asm['cubin'])
    tools = os.path.join(os.path.dirname(triton.__file__), 'backends')
    cuobjdump = glob.glob(f'{tools}/nvidia/bin/cuobjdump')

    def objdump(flag):
      return subprocess.run(
        [cuobjdump[0], flag, cubin], capture_output=True, text=True, check=True
      ).stdout

    usage = objdump('--dump-resource-usage') if cuobjdump else ''
    entry = re.search(r'\.entry\s+(\w+)\((.*?)\)', kernel.asm['ptx'], re.S)
    if args.dump:
      os.makedirs(args.dump, exist_ok=True)
      stem = os.path.join(args.dump, f'{n}_{entry.group(1)}')
      with open(f'{stem}.ptx', 'w', encoding='utf-8') as f:
        f.write(kernel.asm['ptx'])
      if cuobjdump:
        with open(f'{stem}.sass', 'w', encoding='utf-8') as f:
          f.write(objdump('-sass'))
  param_bytes = sum(
    int(bits) // 8
    for bits in re.findall(r'\.param\s+\.[a-z](\d+)', entry.group(2))
  )
  print(
    f'{args.optimizer} on {args.model}, launch {n}, kernel'
    f' {entry.group(1)}: grid {tuple(grid)}, sm_{args.arch}'
  )
  print(f'kernel parameters: {param_bytes} bytes')
  resources = re.search(r'REG:(\d+).*', usage)
  if not resources:
    print('cuobjdump not found')
    return
  print(resources.group(0))
  if args.arch in SM_LIMITS:
    blocks = blocks_per_sm(int(resources.group(1)), warps, args.arch)
    print(
      f'resident programs per SM, as registers allow: {blocks}'
      f' ({blocks * warps} warps)'
    )


# Per SM: at most (warps, programs), by compute capability; each has 65,536
# registers, allocated per warp in units of 256 (CUDA's occupancy tables).
SM_LIMITS = {80: (64, 32), 86: (48, 16), 89: (48, 24), 90: (64, 32)}


def blocks_per_sm(registers: int, warps: int, arch: int = 90) -> int:
  """How many programs of ``warps`` warps at ``registers`` registers per
  thread an SM of compute capability ``arch`` holds at once."""
  max_warps, max_programs = SM_LIMITS[arch]
  per_warp = -(-registers * 32 // 256) * 256
  by_registers = 65536 // per_warp // warps
  return min(by_registers, max_warps // warps, max_programs)


if __name__ == '__main__':
  main()
