"""Where XLA's compile time goes, from XLA's own timers.

XLA times its compile phases and logs them at verbose level 1 of its compiler
sources. A process started with :data:`ENV` in its environment (it must be
set before JAX starts) writes lines such as::

  I1127 21:46:44.480845 29047 gpu_compiler.cc:2152] GpuCompiler::RunHloPasses
  for jit_step_sgd time: 72.5 ms (72483 us) (cumulative: ...)

to its standard error, and :func:`parse` sums them per compiled module and
phase: the HLO passes, the backend (on a GPU: LLVM IR emission, LLVM to PTX
and ptxas, the last two summed over the threads that run them), one entry
per compile.
"""

import re

ENV = {
  'TF_CPP_MIN_LOG_LEVEL': '0',
  'TF_CPP_VMODULE': (
    'gpu_compiler=1,nvptx_compiler=1,compile_module_to_llvm_ir=1,cpu_compiler=1'
  ),
}
"""Environment that turns XLA's compile timers on (GPU and CPU compilers)."""

# "<label> time: 72.5 ms (72483 us)": the label, then the duration.
_TIMER = re.compile(
  r'\] (?P<label>.+?) time: (?P<value>[\d.]+) (?P<unit>us|ms|s|min) \('
)
# The module's name in a label: "... for jit_step_sgd" or "[jit_step_sgd]".
_MODULE = re.compile(r' for (?P<a>\S+)$|\[(?P<b>[^\]]+)\]')
_SECONDS = {'us': 1e-6, 'ms': 1e-3, 's': 1.0, 'min': 60.0}
# Phase of a label (first match wins); other timers are left out.
PHASES = (
  ('RunHloPasses', 'hlo_passes'),
  ('Running HLO passes', 'hlo_passes'),
  ('IR emission', 'ir_emission'),
  ('CompileToPtx', 'llvm_to_ptx'),
  ('PtxToCubin', 'ptxas'),
  ('RunBackend for', 'backend'),
  ('for CPU using JIT', 'backend'),
)


def parse(text: str, prefix: str = '') -> dict[str, list[dict[str, float]]]:
  """XLA's compile timers in ``text``: module -> one dict per compile,
  phase -> seconds (rounded to the millisecond).

  A compile starts at its module's HLO-passes line; phases that run on
  several threads (LLVM to PTX, ptxas) are summed. Only modules whose names
  start with ``prefix`` are kept.
  """
  out: dict[str, list[dict[str, float]]] = {}
  for line in text.splitlines():
    timer = _TIMER.search(line)
    if timer is None:
      continue
    label = timer['label']
    module = _MODULE.search(label)
    phase = next((p for key, p in PHASES if key in label), None)
    if module is None or phase is None:
      continue
    name = module['a'] or module['b']
    if not name.startswith(prefix):
      continue
    compiles = out.setdefault(name, [])
    if phase == 'hlo_passes' or not compiles:
      compiles.append({})
    seconds = float(timer['value']) * _SECONDS[timer['unit']]
    compiles[-1][phase] = compiles[-1].get(phase, 0.0) + seconds
  return {
    name: [{k: round(v, 3) for k, v in c.items()} for c in compiles]
    for name, compiles in out.items()
  }


def fastest(compiles: list[dict[str, float]]) -> dict[str, float]:
  """The compile of ``compiles`` (one module's, from :func:`parse`) whose
  HLO passes and backend took the least time together."""
  return min(
    compiles, key=lambda c: c.get('hlo_passes', 0) + c.get('backend', 0)
  )
