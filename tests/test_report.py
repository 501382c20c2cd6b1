"""benchmarks/report.py turns what the benchmark scripts record into tables
(the runs here are real, tiny CPU runs; no timing is asserted)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

from benchmarks import harness, multitensor, probes, report
from tests._small_model import small_params


def test_every_kind_of_run_becomes_a_table():
  quick = ['--model', 'lenet5', '--repeats', '1', '--optimizers']
  scaling = ['scaling', '--sizes', '1e4', '--k', '1', '--repeats', '1']
  # The agreement check as multitensor.main records it, on a small model:
  # its interpret-mode kernels cost seconds per leaf.
  agreement = multitensor.agreement(small_params(), ['dessilbi_mt'], steps=1)
  agreement.update(model='small', steps=1, backend='cpu')
  agreement['default_choice'] = multitensor.default_choice()
  runs = [
    agreement,
    harness.main(['update', '--k', '1', *quick, 'sgd', 'dessilbi']),
    harness.main(['step', '--steps', '1', *quick, 'sgd', 'dessilbi']),
    harness.main([*scaling, '--optimizers', 'sgd', 'dessilbi']),
    probes.main(['--k', '1', '--repeats', '1', '--model', 'lenet5']),
    {
      'argv': 'step --model vgg16',
      'error': 'Traceback ...\nRuntimeError: out of memory\n',
    },
  ]
  for run, argv in zip(
    runs, ['multitensor', 'update', 'step', 'scaling', 'probes'], strict=False
  ):
    run['argv'] = argv
  text = report.report({'devices': ['cpu:0'], 'runs': runs})
  blocks = text.split('**')
  # One titled block per run, in order, each with a table or its error.
  titles = [b for b in blocks[1::2]]
  assert titles == [
    'multitensor',
    'update',
    'step',
    'scaling',
    'probes',
    'step --model vgg16',
  ]
  tables = blocks[2::2]
  update = runs[1]['results']
  assert f'| dessilbi | {update["dessilbi"]["device_ms"]:.3f} (' in tables[1]
  assert f'{update["dessilbi"]["device_vs_floor"]:.2f}' in tables[1]
  assert '| dessilbi_mt | yes |' in tables[0] and '0 of 700' in tables[0]
  assert 'arrays on the cpu, XLA (ran: True)' in tables[0]
  assert '| sgd |' in tables[2] and '| dessilbi |' in tables[2]
  assert f'{runs[3]["rows"][0]["params"]:,}' in tables[3]
  assert '| apply/leaves |' in tables[4] and '| tiny/flat |' in tables[4]
  assert 'failed: `RuntimeError: out of memory`' in tables[5]
  step = runs[2]['results']['dessilbi']
  assert f'| {step["state_bytes"] / 2**20:.1f} |' in tables[2]
  assert f'| {step["hlo"]["traffic_mb"]:.1f} |' in tables[2]
  for table in tables[:5]:
    rows = [line for line in table.splitlines() if line.startswith('|')]
    assert len({line.count('|') for line in rows}) == 1  # no ragged rows
  # A single run's file, without the argv gpu_check adds: titled by what it
  # holds.
  for run, title in zip(
    [*runs[:3], runs[4]],
    ['agreement', 'update / lenet5', 'step / lenet5', 'probes / lenet5'],
    strict=True,
  ):
    del run['argv']
    assert report.report(run).startswith(f'**{title}**')


def test_memory_deltas_below_the_baseline_keep_their_sign():
  # On the CPU the resident-set peak varies by tens of MiB between
  # processes: an optimizer's may come out below the stateless baseline's.
  mib = 2**20
  row = {
    'source': 'peak RSS',
    'state_bytes': 3 * mib,
    'compiled_peak_bytes': 20 * mib,
    'compiled_peak_over_baseline_bytes': 5 * mib,
    'peak_bytes': 340 * mib,
    'peak_over_baseline_bytes': -10 * mib,
  }
  run = {'mode': 'memory', 'model': 'mlp', 'results': {'sgd': row}}
  text = report.report(run)
  assert '| sgd | 3.0 | 20.0 (+5.0) | 340.0 (-10.0) |' in text
  assert '| optimizer | state MiB | compiled peak MiB | peak RSS MiB |' in text
