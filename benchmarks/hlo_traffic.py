"""Bytes the kernels of a compiled computation read and write, from its HLO.

A train step's optimizer work is memory-bound, so the bytes its kernels move
predict its time on a GPU. ``traffic`` reads them off the optimized HLO text
(``compiled.as_text()``, also what ``gpu_offline.py`` compiles for a GPU it
does not have): for each fusion and copy of the entry computation, the sizes
of its operands and of its result. That counts a whole operand where a kernel
reads part of it (a slice, a broadcast), so it is a measure for comparing two
versions of one computation, not a count of DRAM traffic.
"""

import re

_BYTES = {
  'pred': 1,
  's8': 1,
  'u8': 1,
  'f8e4m3fn': 1,
  'f8e5m2': 1,
  'bf16': 2,
  'f16': 2,
  's16': 2,
  'u16': 2,
  'f32': 4,
  's32': 4,
  'u32': 4,
  'f64': 8,
  's64': 8,
  'u64': 8,
}
_ARRAY = re.compile(r'\b(' + '|'.join(_BYTES) + r')\[([0-9,]*)\]')
_INSTRUCTION = re.compile(
  r'^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\(([^)]*)\)', re.MULTILINE
)
_OPERAND = re.compile(r'%([\w.-]+)')
_ENTRY = re.compile(r'^ENTRY .*?^}', re.MULTILINE | re.DOTALL)


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape (an array, or a tuple of arrays)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = _BYTES[dtype]
    for d in filter(None, dims.split(',')):
      size *= int(d)
    total += size
  return total


def traffic(hlo: str, ops: tuple[str, ...] = ('fusion', 'copy')) -> dict:
  """Bytes read and written by the entry computation's kernels.

  Args:
    hlo: optimized HLO text of one module.
    ops: the instructions that run as kernels and are counted.

  Returns:
    ``{op: {'count': n, 'bytes': b}}`` for each of ``ops``.

  Raises:
    ValueError: the text has no entry computation.
  """
  entry = _ENTRY.search(hlo)
  if entry is None:
    raise ValueError(
      'hlo: no ENTRY computation; expected the HLO text of a compiled '
      'module (compiled.as_text()).'
    )
  sizes: dict[str, int] = {}
  out = {op: {'count': 0, 'bytes': 0} for op in ops}
  for name, shape, op, operands in _INSTRUCTION.findall(entry.group()):
    sizes[name] = shape_bytes(shape)
    if op in out:
      read = sum(sizes.get(o, 0) for o in _OPERAND.findall(operands))
      out[op]['count'] += 1
      out[op]['bytes'] += read + sizes[name]
  return out
