"""Markdown tables from benchmark JSON: ``gpu_check.json``, or the ``--json``
output of ``harness.py``, ``probes.py`` or ``multitensor.py``.

A GPU session has minutes; turning its results into the tables of
``benchmarks/README.md`` should not take them. Every run becomes one table
(a failed run, one line with its error); nothing is computed here that the
runs did not record, apart from MiB and percentages.

Usage::

  python benchmarks/report.py results/gpu_check.json > results/tables.md
"""

import argparse
import json
import sys

try:
  from benchmarks import compile_phases
except ImportError:  # run as a script from the repository root
  sys.path.insert(0, __file__.rsplit('/', 2)[0])
  from benchmarks import compile_phases

MIB = 2**20
# What multitensor.default_choice found a step lowered to ('kernels').
TAKEN = {True: 'the kernels', False: 'XLA', None: 'not lowered'}


def _ratio(row: dict, key: str) -> str:
  ratio = row.get(f'{key}_vs_sgd')
  return f'{row[key]:.3f}' + (f' ({ratio:.2f}×)' if ratio else '')


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  return lines + ['| ' + ' | '.join(row) + ' |' for row in rows]


def _update(run: dict) -> list[str]:
  rows = []
  for name, r in run['results'].items():
    hlo = r['hlo']
    rows.append(
      [
        name,
        _ratio(r, 'device_ms'),
        f'{r["floor_ms"]:.3f}',
        f'{r["device_vs_floor"]:.2f}',
        _ratio(r, 'call_ms'),
        f'{r["state_bytes"] / MIB:.1f}',
        f'{hlo["fusions"]} / {hlo["copies"]} / {hlo.get("custom_calls", 0)}',
      ]
    )
  header = [
    'optimizer',
    'device ms',
    'floor ms',
    'vs floor',
    'call ms',
    'state MiB',
    'fusions / copies / custom calls',
  ]
  bandwidth = run.get('copy_bandwidth_GBps')
  note = [f'copy bandwidth {bandwidth:.0f} GB/s (read + write)', '']
  return note + _table(header, rows)


def _step(run: dict) -> list[str]:
  rows = []
  for name, r in run['results'].items():
    hlo = r['hlo']
    rows.append(
      [
        name,
        _ratio(r, 'loop_ms'),
        _ratio(r, 'call_ms'),
        f'{r.get("compile_s", float("nan")):.1f}',
        f'{hlo["fusions"]} / {hlo["copies"]}',
        f'{hlo["traffic_mb"]:.1f}' if 'traffic_mb' in hlo else '—',
        f'{r["state_bytes"] / MIB:.1f}' if 'state_bytes' in r else '—',
        f'{r["memory"].get("temp", 0) / MIB:.1f}' if r.get('memory') else '—',
      ]
    )
  header = [
    'optimizer',
    'loop ms',
    'call ms',
    'compile s',
    'fusions / copies',
    'MB moved',
    'state MiB',
    'temp MiB',
  ]
  return _table(header, rows)


def _memory(run: dict) -> list[str]:
  rows = [
    [
      name,
      f'{r["state_bytes"] / MIB:.1f}',
      f'{r["compiled_peak_bytes"] / MIB:.1f}'
      f' ({r["compiled_peak_over_baseline_bytes"] / MIB:+.1f})',
      f'{r["peak_bytes"] / MIB:.1f} ({r["peak_over_baseline_bytes"] / MIB:+.1f})',
    ]
    for name, r in run['results'].items()
  ]
  source = next(iter(run['results'].values()))['source']
  header = ['optimizer', 'state MiB', 'compiled peak MiB', f'{source} MiB']
  return _table(header, rows)


def _scaling(run: dict) -> list[str]:
  names = [k for k in run['rows'][0] if k != 'params'] if run['rows'] else []
  rows = [
    [f'{row["params"]:,}']
    + [
      f'{row[n]["device_ms"]:.3f} ms, {row[n]["state_bytes"] / MIB:.1f} MiB'
      for n in names
    ]
    for row in run['rows']
  ]
  return _table(['params', *names], rows)


def _probes(run: dict) -> list[str]:
  rows = []
  for case, r in run['results'].items():
    if case.endswith('/per_extra_kernel_us'):
      continue
    per_kernel = run['results'].get(f'{case.split("/")[0]}/per_extra_kernel_us')
    rows.append(
      [
        case,
        f'{r["ms"]:.4f}',
        str(r['fusions']),
        f'{per_kernel:.2f}' if per_kernel and case.endswith('/leaves') else '',
      ]
    )
  return _table(['pass', 'ms', 'fusions', 'µs per extra kernel'], rows)


def _agreement(run: dict) -> list[str]:
  rows = []
  for name, r in run['results'].items():
    supports = [
      f'{r[unit]["support_mismatches"]} of {r[unit]["count"]}'
      f' ({r[unit]["selected_share"]:.0%} selected)'
      if unit in r
      else '—'
      for unit in ('filters', 'weights')
    ]
    rows.append(
      [
        name,
        'yes' if r.get('ok') else 'NO',
        f'{r["params_max_abs"]:.1e} ({r["params_max_rel"]:.1e})',
        f'{r["state_max_abs"]:.1e} ({r["state_max_rel"]:.1e})',
        *supports,
      ]
    )
  header = [
    'kernel',
    'agrees',
    'params: max diff (rel)',
    'state: max diff (rel)',
    'filters in one support only',
    'weights in one support only',
  ]
  lines = _table(header, rows)
  if 'default_choice' in run:  # implementation=None, by the arrays' device
    lines += [
      '',
      'Default (`implementation=None`): '
      + '; '.join(
        f'arrays on the {platform}, {TAKEN[r["kernels"]]} (ran: {r["ran"]})'
        for platform, r in run['default_choice'].items()
      )
      + '.',
    ]
  return lines


def _phases(run: dict) -> list[str]:
  """XLA's compile phases of each train step (gpu_check's runs): the
  fastest of its compiles, by HLO passes and backend together."""
  columns = [
    ('hlo_passes', 'HLO passes s'),
    ('backend', 'backend s'),
    ('llvm_to_ptx', 'LLVM to PTX s, all threads'),
    ('ptxas', 'ptxas s, all threads'),
  ]
  rows = []
  for module, compiles in run['xla_phases'].items():
    best = compile_phases.fastest(compiles)
    rows.append(
      [module, *(f'{best[k]:.2f}' if k in best else '' for k, _ in columns)]
    )
  return _table(['compile', *(title for _, title in columns)], rows)


def run_table(run: dict) -> list[str]:
  """The lines (title, blank, table) of one run's results."""
  if 'argv' in run:
    name = run['argv']
  elif 'mode' in run:
    name = ' / '.join(str(run[k]) for k in ('mode', 'model') if k in run)
  elif 'lams' in run:
    name = 'agreement'
  else:
    name = f'probes / {run["model"]}' if 'model' in run else 'probes'
  title = f'**{name}**'
  if 'wall_s' in run:
    title += f' ({run["wall_s"]:.0f} s)'
  if 'error' in run:
    last = run['error'].strip().splitlines()[-1]
    return [title, '', f'failed: `{last}`']
  if 'lams' in run:
    body = _agreement(run)
  elif 'leaves' in run:
    body = _probes(run)
  else:
    body = {
      'update': _update,
      'step': _step,
      'memory': _memory,
      'scaling': _scaling,
    }[run['mode']](run)
  if 'xla_phases' in run:
    body = [*body, '', *_phases(run)]
  return [title, '', *body]


def report(data: dict) -> str:
  """Markdown for a ``gpu_check.json`` (all its runs) or a single run."""
  lines = []
  if 'runs' in data:
    lines += [f'devices: {", ".join(data.get("devices") or [])}', '']
    if 'target_config_error' in data:
      last = data['target_config_error'].strip().splitlines()[-1]
      lines += [f'target config not saved: `{last}`', '']
    runs = data['runs']
  else:
    runs = [data]
  for run in runs:
    lines += [*run_table(run), '']
  return '\n'.join(lines)


def main(argv=None) -> str:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('json_file')
  args = parser.parse_args(argv)
  with open(args.json_file, encoding='utf-8') as f:
    text = report(json.load(f))
  print(text)
  return text


if __name__ == '__main__':
  main()
