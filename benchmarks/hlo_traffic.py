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

# Bytes per element of each element type XLA prints (xla_data.proto's
# PrimitiveType, lowercased; OPAQUE_TYPE prints as opaque). A sub-byte type
# takes a byte per element unless the array's layout packs it: compiled HLO
# prints `s4[3,5]{1,0:E(4)}`, 4 bits an element (see shape_bytes).
_BYTES = {
  'pred': 1,
  's1': 1,
  's2': 1,
  's4': 1,
  's8': 1,
  's16': 2,
  's32': 4,
  's64': 8,
  'u1': 1,
  'u2': 1,
  'u4': 1,
  'u8': 1,
  'u16': 2,
  'u32': 4,
  'u64': 8,
  'f4e2m1fn': 1,
  'f8e3m4': 1,
  'f8e4m3': 1,
  'f8e4m3b11fnuz': 1,
  'f8e4m3fn': 1,
  'f8e4m3fnuz': 1,
  'f8e5m2': 1,
  'f8e5m2fnuz': 1,
  'f8e8m0fnu': 1,
  'bf16': 2,
  'f16': 2,
  'f32': 4,
  'f64': 8,
  'c64': 8,
  'c128': 16,
  # Not arrays: no data (a tuple prints as its elements in parentheses).
  'token': 0,
  'opaque': 0,
}
# Any `name[dims]` and its layout, so that a type missing above is an error,
# not 0 bytes.
_ARRAY = re.compile(r'\b([a-z]\w*)\[([^\]]*)\](\{[^}]*\})?')
_DIM = re.compile(r'(?:<=)?([0-9]+)')
_PACKED = re.compile(r'[:)]E\(([0-9]+)\)')
_INSTRUCTION = re.compile(
  r'^\s*(?:ROOT )?%(\S+) = (\(.*?\)|\S+) ([\w-]+)\(([^)]*)\)', re.MULTILINE
)
_OPERAND = re.compile(r'%([\w.-]+)')
_ENTRY = re.compile(r'^ENTRY .*?^}', re.MULTILINE | re.DOTALL)


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape (an array, or a tuple of arrays), as XLA counts
  them: elements × bytes per element, or, where the layout packs the
  elements (`{0:E(4)}`), elements × bits / 8 rounded up to a whole byte. A
  bounded dynamic dimension (`<=8`) counts its bound.

  Raises:
    ValueError: an element type missing from the table, or an unbounded
      dynamic dimension (`?`): its size cannot be read off the text.
  """
  total = 0
  for dtype, dims, layout in _ARRAY.findall(shape):
    if dtype not in _BYTES:
      raise ValueError(
        f'hlo_traffic: unknown element type {dtype!r} in {shape!r}; add its '
        'bytes per element to hlo_traffic._BYTES.'
      )
    elements = 1
    for d in filter(None, dims.split(',')):
      size = _DIM.fullmatch(d)
      if size is None:
        raise ValueError(
          f'hlo_traffic: no size for dimension {d!r} in {shape!r} (an '
          'unbounded dynamic dimension).'
        )
      elements *= int(size.group(1))
    packed = _PACKED.search(layout)
    if packed:
      total += -(-elements * int(packed.group(1)) // 8)
    else:
      total += elements * _BYTES[dtype]
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
