"""The benchmark scripts' plumbing: command lines, result fields (no timings
are asserted; those belong to the benchmarks themselves)."""

import functools
import importlib
import json
import os
import pathlib
import sys
import tempfile

import jax
import jax.numpy as jnp
import pytest

import dessilbi_jax as dl

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

from benchmarks import (
  compile_phases,
  gpu_check,
  harness,
  hlo_traffic,
  multitensor,
  probes,
  triton_compile,
)
from tests._small_model import small_params


def test_gpu_check_runs_parse():
  # A typo here would only show on a GPU machine, after minutes of others.
  for run in gpu_check.RUNS:
    entry, argv = gpu_check.entry_of(run.format(hlo='hlo'))
    if entry is probes.main:
      assert run.startswith('probes ')
    elif entry is multitensor.main:
      assert multitensor.parse_args(argv).model == 'resnet18'
    else:
      names = harness.parse_args(argv).optimizers
      assert names
      for name in names:  # the tilings are valid: built, not traced
        harness.make_optimizer(name)
  # The kernel is checked before it is timed.
  assert gpu_check.entry_of(gpu_check.RUNS[0])[0] is multitensor.main


def test_gpu_check_drops_the_fused_step_after_a_failed_agreement():
  run = 'step --model x --optimizers sgd dessilbi dessilbi_mt_apply:8x8 --k 2'
  assert gpu_check.without_fused(run) == (
    'step --model x --optimizers sgd dessilbi --k 2'
  )
  assert gpu_check.without_fused('update --optimizers sgd dessilbi_mt') is None
  assert gpu_check.without_fused('probes --k 2') == 'probes --k 2'
  ok = {'results': {'a': {'ok': True}, 'b': {'ok': True}}}
  assert gpu_check.agreed(ok)
  assert not gpu_check.agreed(
    {'results': {'a': {'ok': True}, 'b': {'ok': False}}}
  )
  assert not gpu_check.agreed({'error': 'Traceback ...'})


def test_gpu_check_runs_each_run_in_its_own_process(tmp_path, monkeypatch):
  # A failing agreement run (here: a refused argument, an argparse exit)
  # is recorded, the fused step leaves the later runs (one of which then
  # has nothing to compare), the others run in fresh processes, and the
  # output folder holds four files at most: the JSON, its tables, the HLO
  # archive and (on a GPU) the target config.
  monkeypatch.setattr(
    gpu_check,
    'RUNS',
    [
      'multitensor --model no_such_model',
      'update --model mlp --optimizers sgd dessilbi_mt_apply',
      'update --model mlp --k 1 --repeats 1 --hlo-dir {hlo}'
      ' --optimizers sgd dessilbi dessilbi_mt_apply',
      'step --model mlp --batch 8 --steps 1 --repeats 1 --optimizers sgd'
      ' dessilbi',
    ],
  )
  gpu_check.main(['--out', str(tmp_path)])
  data = json.loads((tmp_path / 'gpu_check.json').read_text())
  first, second, third, fourth = data['runs']
  assert 'invalid choice' in first['error'] or 'SystemExit' in first['error']
  assert second['error'].startswith('skipped: the fused kernels failed')
  assert second['argv'] == gpu_check.RUNS[1]
  assert 'error' not in third
  assert set(third['results']) == {'sgd', 'dessilbi'}
  # XLA's timers give each train step's compile phases: two compiles each
  # (the harness's default rounds), none of the throwaway step's.
  phases = fourth['xla_phases']
  assert set(phases) == {'jit_step_sgd', 'jit_step_dessilbi'}
  for compiles in phases.values():
    assert len(compiles) == 2
    assert all(c['hlo_passes'] > 0 and c['backend'] > 0 for c in compiles)
  assert '| jit_step_dessilbi | ' in (tmp_path / 'tables.md').read_text()
  assert data['devices']  # from the runs' processes
  assert 'target_config_error' in data  # no GPU here
  assert sorted(p.name for p in tmp_path.iterdir()) == [
    'gpu_check.json',
    'hlo.tar.gz',
    'tables.md',
  ]
  # A run still going at the budget is stopped and recorded.
  out = gpu_check.run_in_child('probes --k 1', str(tmp_path), timeout=0.5)
  assert out == {'error': 'cut off at the budget, after 0.5 s'}


def test_gpu_check_records_a_skipped_run_without_its_placeholder(
  tmp_path, monkeypatch
):
  # Recorded as the runs it ran are: the HLO folder shown as <hlo>.
  runs = ['update --hlo-dir {hlo} --optimizers sgd dessilbi']
  monkeypatch.setattr(gpu_check, 'RUNS', runs)
  gpu_check.main(['--out', str(tmp_path), '--budget', '0'])
  (run,) = json.loads((tmp_path / 'gpu_check.json').read_text())['runs']
  assert run == {
    'argv': 'update --hlo-dir <hlo> --optimizers sgd dessilbi',
    'error': 'skipped: no budget left',
  }


def test_compile_phases_are_summed_per_module_and_compile():
  log = """\
I1127 21:46:44.480845 29047 gpu_compiler.cc:2152] GpuCompiler::RunHloPasses \
for jit_step_sgd time: 72.5 ms (72483 us) (cumulative: 72.5 ms)
I1127 21:46:44.656852 29072 nvptx_compiler.cc:520] NVPTXCompiler::Compile\
TargetBinary - CompileToPtx for jit_step_sgd time: 70.3 ms (70310 us) (c
I1127 21:46:44.658369 29071 nvptx_compiler.cc:520] NVPTXCompiler::Compile\
TargetBinary - CompileToPtx for jit_step_sgd time: 68.2 ms (68250 us) (c
I1127 21:46:44.710959 29072 nvptx_compiler.cc:571] NVPTXCompiler::Compile\
TargetBinary - PtxToCubin for jit_step_sgd time: 37.2 ms (37219 us) (c
I1127 21:46:44.965824 29047 compile_module_to_llvm_ir.cc:256] GpuCompiler::\
RunBackend - IR emission for jit_step_sgd time: 395 ms (395386 us) (c
I1127 21:46:44.991119 29047 gpu_compiler.cc:2817] GpuCompiler::RunBackend \
for jit_step_sgd time: 1.11 s (1106922 us) (cumulative: 510 ms)
I1127 21:46:45.000000 29047 gpu_compiler.cc:2152] GpuCompiler::RunHloPasses \
for jit_step_sgd time: 21 us (21 us) (cumulative: 72.5 ms)
I1127 21:46:45.100000 29047 gpu_compiler.cc:2152] GpuCompiler::RunHloPasses \
for jit_other time: 9 ms (9000 us) (cumulative: 81.5 ms)
W1127 21:46:45.200000 29047 something.cc:1] not a timer
I1127 23:19:23.135784 8982 cpu_compiler.cc:1269] Running HLO passes on \
[jit_step_cpu] for CPU time: 2.06 ms (2062 us) (cumulative: 2.06 ms)
I1127 23:19:23.144764 8982 cpu_compiler.cc:1215] CpuCompiler - Running LLVM \
verifier time: 21 us (21 us) (cumulative: 21 us, max: 21 us, #called: 1)
I1127 23:19:23.146631 8982 cpu_compiler.cc:2094] Compiling [jit_step_cpu] \
for CPU using JIT time: 1.5 min (90000000 us) (cumulative: 10.8 ms)
"""
  assert compile_phases.parse(log, prefix='jit_step_') == {
    'jit_step_sgd': [
      {
        'hlo_passes': 0.072,  # 72.5 ms, rounded to the millisecond
        'llvm_to_ptx': 0.139,  # summed over two threads
        'ptxas': 0.037,
        'ir_emission': 0.395,
        'backend': 1.11,
      },
      {'hlo_passes': 0.0},  # a second compile starts at its HLO passes
    ],
    'jit_step_cpu': [{'hlo_passes': 0.002, 'backend': 90.0}],
  }
  assert set(compile_phases.parse(log)) == {
    'jit_step_sgd',
    'jit_other',
    'jit_step_cpu',
  }
  slow, fast = {'hlo_passes': 1.0, 'backend': 2.0}, {'backend': 2.5}
  assert compile_phases.fastest([slow, fast]) is fast
  # A crashed run's error keeps what is not XLA's info output.
  crash = 'I1127 21:46:44.4 1 x.cc:1] info\nFatal Python error: Aborted\n'
  assert gpu_check.error_tail(crash + 'ImportError: x') == (
    'Fatal Python error: Aborted\nImportError: x'
  )
  assert gpu_check.error_tail('x' * 50, chars=10) == 'x' * 10


def test_unknown_optimizer_is_refused_before_running(capsys):
  with pytest.raises(SystemExit):
    harness.parse_args(['update', '--optimizers', 'sgd', 'dessilbi_mt:4x4'])
  assert '--optimizers' in capsys.readouterr().err


def test_update_mode_reports_floor_and_kernels(tmp_path):
  out = harness.main(
    [
      'update',
      '--model',
      'lenet5',
      '--k',
      '1',
      '--repeats',
      '1',
      '--optimizers',
      'sgd',
      'dessilbi',
      'dessilbi_mt:8x16x4',
      '--hlo-dir',
      str(tmp_path),
    ]
  )
  rows = out['results']
  assert set(rows) == {'sgd', 'dessilbi', 'dessilbi_mt:8x16x4'}
  # Same state for the fused kernels as for dessilbi: m + z + Γ.
  assert (
    rows['dessilbi_mt:8x16x4']['state_bytes']
    == (rows['dessilbi']['state_bytes'])
  )
  assert rows['dessilbi']['bytes_moved'] > rows['sgd']['bytes_moved']
  for row in rows.values():
    # The floor is the row's bytes at the measured bandwidth.
    want = row['bytes_moved'] / (out['copy_bandwidth_GBps'] * 1e9) * 1e3
    assert row['floor_ms'] == pytest.approx(want)
    assert row['device_vs_floor'] == pytest.approx(
      row['device_ms'] / row['floor_ms']
    )
  assert len(list(tmp_path.glob('update_lenet5_*.hlo.gz'))) == 3


def test_step_mode_reports_the_fastest_of_its_compile_rounds():
  out = harness.main(
    [
      'step',
      '--model',
      'mlp',
      '--steps',
      '1',
      '--repeats',
      '1',
      '--compile-rounds',
      '2',
      '--optimizers',
      'sgd',
      'dessilbi',
    ]
  )
  for row in out['results'].values():
    samples = row['compile_s_samples']
    assert len(samples) == 2 and all(t > 0 for t in samples)
    assert row['compile_s'] == min(samples)
  # DessiLBI's step also reads and writes z and Γ.
  moved = {name: r['hlo']['traffic_mb'] for name, r in out['results'].items()}
  assert moved['dessilbi'] > moved['sgd'] > 0


def test_xla_options_are_parsed_and_checked(capsys):
  args = harness.parse_args(
    ['update', '--xla-option', 'a_flag=true', '--xla-option', 'a_count=3']
  )
  assert args.xla_options == {'a_flag': True, 'a_count': 3}
  assert harness.parse_args(['update']).xla_options is None
  with pytest.raises(SystemExit):
    harness.parse_args(['update', '--xla-option', 'no_value'])
  assert 'KEY=VALUE' in capsys.readouterr().err


def test_memory_mode_runs_the_steps_asked_for(monkeypatch, capsys):
  runs = []

  def fresh_process(fn, model, batch, name, steps, options):
    runs.append((name, steps))
    mem = {'argument': 4, 'output': 4, 'temp': 0, 'alias': 4}
    return {
      'peak_bytes': 8,
      'source': 'peak RSS',
      'state_bytes': 0,
      'memory': mem,
    }

  monkeypatch.setattr(harness, '_in_fresh_process', fresh_process)
  argv = ['memory', '--model', 'mlp', '--optimizers', 'sgd', '--steps', '7']
  out = harness.main(argv)
  assert runs == [('gd', 7), ('sgd', 7)] and out['steps'] == 7
  # Not given: a few train steps for a peak, more for a timing.
  assert harness.parse_args(['memory']).steps == harness.MEMORY_STEPS == 3
  assert harness.parse_args(['step']).steps == harness.STEPS == 50


def test_gpu_offline_counts_launches_by_kind(tmp_path):
  from benchmarks import gpu_offline

  thunks = (
    '000: kCommandBuffer [source | sink]\n'
    '    001: kCustomKernel [source | sink] loop_add_fusion grid: [1, 1, 1]\n'
    '    002: kCustomKernel [source | next=003] input_reduce_fusion\n'
    '003: kCopy [prev=002 | sink]\n'
  )
  name = 'offline_dessilbi'
  (tmp_path / f'module_0001.jit_{name}.thunk_sequence.txt').write_text(thunks)
  # Another module whose name starts the same is not counted.
  (tmp_path / f'module_0002.jit_{name}_z.thunk_sequence.txt').write_text(
    thunks * 2
  )
  assert gpu_offline._launches(str(tmp_path), name) == {
    'kCommandBuffer': 1,
    'kCustomKernel': 2,
    'kCopy': 1,
  }
  assert gpu_offline._launches(str(tmp_path), 'offline_sgd') == {}


def test_gpu_offline_keeps_what_xla_logs_while_it_compiles():
  from benchmarks import gpu_offline

  with tempfile.TemporaryFile(mode='w+b') as log:
    with gpu_offline._stderr_to(log):
      os.write(2, b'I1127 21:46:44 1 x.cc:1] timer\n')  # as XLA writes
    os.write(2, b'after\n')  # file descriptor 2 is itself again
    log.seek(0)
    assert log.read() == b'I1127 21:46:44 1 x.cc:1] timer\n'


def test_gpu_offline_splits_what_divides_and_counts_collectives():
  from jax.sharding import PartitionSpec as P

  from benchmarks import gpu_offline

  assert gpu_offline.split_spec((3, 3, 64, 128), 8, -1) == P(
    None, None, None, 'data'
  )
  assert gpu_offline.split_spec((10,), 8, -1) == P()  # 10 filters: replicated
  assert gpu_offline.split_spec((256, 32, 32, 3), 8, 0) == P(
    'data', None, None, None
  )
  assert gpu_offline.split_spec((64,), 1, -1) == P()  # one device
  assert gpu_offline.split_spec((), 8, -1) == P()  # a scalar
  hlo = (
    '  %all-gather-start = (f32[4,64]{0,1}, f32[4,512]{0,1})'
    ' all-gather-start(%p), dimensions={1}\n'
    '  %all-gather-done = f32[4,512]{0,1} all-gather-done(%all-gather-start)\n'
    '  %all-gather-start.6 = ((f32[4]{0}, f32[4]{0}), (f32[8]{0}, f32[8]{0}))'
    ' all-gather-start(%a, %b)\n'
    '  %reduce-scatter.1 = f32[8]{0} reduce-scatter(%g), dimensions={0}\n'
    '  %ar = f32[] all-reduce(%x), to_apply=%add\n'
    '  %fusion = f32[8]{0} fusion(%all-gather-done), kind=kLoop\n'
  )
  assert gpu_offline.collectives(hlo) == {
    'all-gather': 2,
    'reduce-scatter': 1,
    'all-reduce': 1,
  }


def test_multitensor_names_set_tiles_and_chunks():
  assert harness.multitensor_args('dessilbi_mt_apply:64x16x4x256') == {
    'store_gamma': True,
    'apply': True,
    'tile_cols': 64,
    'tile_rows': 16,
    'num_warps': 4,
    'chunk_rows': 256,
  }
  assert 'chunk_rows' not in harness.multitensor_args('dessilbi_mt:8x16x4')
  five = harness.multitensor_args('dessilbi_mt:8x16x4x32x1024')
  assert (five['chunk_rows'], five['block']) == (32, 1024)
  assert 'block' not in harness.multitensor_args('dessilbi_mt:8x16x4x32')
  six = harness.multitensor_args('dessilbi_mt:8x16x4x32x1024x16')
  assert (six['block'], six['leaves_per_kernel']) == (1024, 16)
  assert 'leaves_per_kernel' not in five
  with pytest.raises(ValueError, match=r'xCHUNK\[xBLOCK\[xLEAVES\]\]\]'):
    harness.multitensor_args('dessilbi_mt:8x16x4x2x2x2x2')
  with pytest.raises(ValueError, match='COLSxROWSxWARPS'):
    harness.multitensor_args('dessilbi_mt:8x16')


def test_resident_programs_follow_register_allocation():
  # Registers are allocated per warp in units of 256 (8 per thread): 82
  # costs as much as 88, one program fewer than 80 at 4 warps.
  assert triton_compile.blocks_per_sm(80, 4) == 6
  assert triton_compile.blocks_per_sm(82, 4) == 5
  assert triton_compile.blocks_per_sm(88, 4) == 5
  assert triton_compile.blocks_per_sm(72, 4) == 7
  assert triton_compile.blocks_per_sm(62, 8) == 4
  # Few registers: the SM's 64 warps, then its 32 programs, are the limit.
  assert triton_compile.blocks_per_sm(32, 4) == 16
  assert triton_compile.blocks_per_sm(16, 1) == 32
  # An sm_86 holds 48 warps and 16 programs.
  assert triton_compile.blocks_per_sm(32, 4, arch=86) == 12
  assert triton_compile.blocks_per_sm(16, 1, arch=86) == 16


def test_agreement_check_reports_matches_and_mismatches():
  # The check a GPU run makes before timing the kernel, here in interpret
  # mode: it finds the kernel equal to dessilbi with Γ partly selected.
  params = small_params()
  out = multitensor.agreement(params, steps=3)
  assert set(out['results']) == set(multitensor.VARIANTS)
  for row in out['results'].values():
    assert row['ok']
    assert row['params_max_rel'] < 1e-5 and row['state_max_rel'] < 1e-5
    for unit, count in (('filters', 60), ('weights', 700)):
      assert row[unit]['count'] == count
      assert row[unit]['support_mismatches'] == 0
      assert 0.1 < row[unit]['selected_share'] < 0.95
  # And it would see a kernel that got one filter wrong.
  penalties, treedef = dl.resolve_penalties(params, None)
  tx = dl.dessilbi(0.5, nu=2.0)
  state = tx.init(params)
  for _ in range(3):
    _, state = tx.update(params, state, params)
  gamma = state[3].gamma
  wrong = jax.tree.map(jnp.copy, gamma)
  wrong['conv2']['kernel'] = (
    wrong['conv2']['kernel']
    .at[..., 0]
    .set(1 - (gamma['conv2']['kernel'][..., 0] != 0))
  )
  row = multitensor._compare(
    (params, (*state[:3], state[3]._replace(gamma=wrong))),
    (params, state),
    penalties,
    treedef,
  )
  assert row['filters']['support_mismatches'] == 1 and not row['ok']
  assert row['state_max_abs'] > 0 and row['params_max_abs'] == 0


@pytest.mark.parametrize(
  'argv',
  [
    ['update', '--repeats', '0'],
    ['step', '--steps', '0'],
    ['step', '--compile-rounds', '0'],
    ['update', '--k', '-1'],
    ['update', '--optimizers', 'dessilbi_mt_apply:'],
    # Not the model's default batch, nor a traceback from jax.random.
    ['step', '--batch', '0'],
    ['memory', '--batch', '-2'],
    # Not a traceback from a complex square root, nor from round(nan).
    ['scaling', '--sizes', '1e5', '-5'],
    ['scaling', '--sizes', '0'],
    ['scaling', '--sizes', 'nan'],
    ['scaling', '--sizes', 'inf'],
    # Not silently float32.
    ['memory', '--dtype', 'bfloat16'],
    ['scaling', '--dtype', 'bfloat16'],
  ],
)
def test_counts_and_names_are_checked_before_compiling(argv, capsys):
  with pytest.raises(SystemExit):
    harness.parse_args(argv)
  assert 'error:' in capsys.readouterr().err


@pytest.mark.parametrize(
  'main, argv, flag',
  [
    # Zero steps would compare two untouched starts and report agreement.
    (multitensor.main, ['--steps', '0'], '--steps'),
    (multitensor.main, ['--steps', '-1'], '--steps'),
    (
      'gpu_offline',
      ['--target-config', 'x', 'step', '--batch', '0'],
      '--batch',
    ),
    ('torch_reference', ['--reference', '.', '--repeats', '0'], '--repeats'),
    ('torch_reference', ['--reference', '.', '--steps', '0'], '--steps'),
    ('torch_reference', ['--reference', '.', '--batch', '-1'], '--batch'),
  ],
)
def test_other_scripts_check_their_counts(main, argv, flag, capsys):
  if isinstance(main, str):
    main = importlib.import_module(f'benchmarks.{main}').main
  with pytest.raises(SystemExit):
    main(argv)
  err = capsys.readouterr().err
  assert f'argument {flag}: expected' in err


def test_hlo_counts_see_long_tuple_shapes():
  # XLA prints `/*index=5*/` in a tuple shape of six or more elements: a
  # multi-output fusion, a Pallas call writing many leaves, a collective
  # gathering many arrays.
  from benchmarks import gpu_offline

  six = ', '.join(['f32[2]{0}'] * 5) + ', /*index=5*/f32[2]{0}'
  hlo = (
    'ENTRY %main (p: f32[2]) -> f32[2] {\n'
    '  %p = f32[2]{0} parameter(0)\n'
    f'  %f = ({six}) fusion(%p), kind=kLoop, calls=%c\n'
    f'  %k = ({six}) custom-call(%p), custom_call_target="triton"\n'
    f'  %ag = (({six}), ({six})) all-gather-start(%p), dimensions={{0}}\n'
    '  %c = f32[2]{0} copy(%p)\n'
    '  ROOT %g = f32[2]{0} get-tuple-element(%f), index=0\n'
    '}\n'
  )

  class Compiled:
    def as_text(self):
      return hlo

  assert harness.hlo_counts(Compiled()) == {
    'fusions': 1,
    'copies': 1,
    'custom_calls': 1,
  }
  assert gpu_offline.collectives(hlo) == {'all-gather': 1}
  # hlo_traffic reads the same shape: 6 × 8 bytes written, 8 read.
  assert hlo_traffic.traffic(hlo)['fusion'] == {'count': 1, 'bytes': 56}


def test_default_choice_records_the_path_taken_and_failures(monkeypatch):
  # As on a machine with a GPU: arrays on the CPU step with XLA.
  monkeypatch.setattr(dl.fused, '_gpu_backend', lambda: True)
  assert multitensor.default_choice() == {
    'cpu': {'kernels': False, 'ran': True}
  }
  # A step that cannot lower here (Triton kernels for the CPU) is recorded
  # with its error, not raised.
  monkeypatch.setattr(
    multitensor.dl,
    'fused_dessilbi',
    functools.partial(
      dl.fused_dessilbi, implementation='pallas', interpret=False
    ),
  )
  (row,) = multitensor.default_choice().values()
  assert row['kernels'] is None and row['ran'].startswith('ValueError')


def test_agreement_sees_a_nan_in_any_leaf():
  params = small_params()
  tx = dl.dessilbi(0.5, nu=2.0)
  state = tx.init(params)
  _, state = tx.update(params, state, params)
  penalties, treedef = dl.resolve_penalties(params, None)
  leaves = jax.tree.leaves(params)
  # A NaN in the last leaf: Python's max would pass over it.
  bad = [*leaves[:-1], leaves[-1].at[0].set(jnp.nan)]
  row = multitensor._compare(
    (jax.tree.unflatten(jax.tree.structure(params), bad), state),
    (params, state),
    penalties,
    treedef,
  )
  assert not row['ok']
  assert row['params_max_abs'] == row['params_max_rel'] == float('inf')
  assert row['state_max_abs'] == 0


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--optimizer', 'sgd'], 'makes no Triton kernel'),
    (['--model', 'conv:3x3xAx64'], 'conv:HxWxINxOUT'),
    (['--model', 'foo'], "got 'foo'"),
  ],
)
def test_triton_compile_names_a_bad_argument(argv, message, capsys):
  with pytest.raises(SystemExit):
    triton_compile.main(argv)
  assert message in capsys.readouterr().err


def test_gpu_offline_names_a_missing_target_config(tmp_path, capsys):
  from benchmarks import gpu_offline

  with pytest.raises(SystemExit):
    gpu_offline.main(['--target-config', str(tmp_path / 'no'), 'update'])
  assert '--target-config: no file' in capsys.readouterr().err


def test_gpu_offline_refused_leaves_no_dump_folder(
  tmp_path, monkeypatch, capsys
):
  from benchmarks import gpu_offline

  config = tmp_path / 'gpu_target_config.pbtxt'
  config.write_text('')
  temp = tmp_path / 'temp'
  temp.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(temp))
  # main sets these for the JAX it would start; this process's is started.
  for key in ('XLA_FLAGS', 'JAX_PLATFORMS'):
    if key in os.environ:
      monkeypatch.setenv(key, os.environ[key])
    else:
      monkeypatch.delenv(key, raising=False)
  argv = ['--target-config', str(config), 'update', '--optimizers', 'nope']
  with pytest.raises(SystemExit):
    gpu_offline.main(argv)
  assert '--optimizers' in capsys.readouterr().err
  assert list(temp.iterdir()) == []


def test_hlo_traffic_adds_operands_and_results_of_kernels():
  from benchmarks import hlo_traffic

  hlo = (
    'HloModule m\n\n%fused (p: f32[4]) -> f32[4] {\n'
    '  %p = f32[4]{0} parameter(0)\n'
    '  ROOT %n = f32[4]{0} negate(%p)\n}\n\n'
    'ENTRY %main (w: f32[2,8], g: bf16[2,8]) -> (f32[2,8], f32[8,2]) {\n'
    '  %w.1 = f32[2,8]{1,0} parameter(0)\n'
    '  %g.1 = bf16[2,8]{1,0} parameter(1)\n'
    '  %f = (f32[2,8]{1,0}, f32[8,2]{1,0}) fusion(%w.1, %g.1), kind=kInput\n'
    '  %gte.0 = f32[2,8]{1,0} get-tuple-element(%f), index=0\n'
    '  %gte.1 = f32[8,2]{1,0} get-tuple-element(%f), index=1\n'
    '  %c = f32[8,2]{1,0} copy(%gte.1)\n'
    '  %cc = f32[2,8]{1,0} custom-call(%gte.0), custom_call_target="x"\n'
    '  ROOT %t = (f32[2,8]{1,0}, f32[8,2]{1,0}) tuple(%cc, %c)\n}\n'
  )
  # The fusion reads 64 + 32 bytes and writes 2 × 64; the copy 64 and 64.
  # The fusion computation above the entry, and the custom call, do not count.
  assert hlo_traffic.traffic(hlo) == {
    'fusion': {'count': 1, 'bytes': 224},
    'copy': {'count': 1, 'bytes': 128},
  }
  assert hlo_traffic.shape_bytes('(f32[3,5]{1,0}, (pred[7], s64[]))') == 75
  with pytest.raises(ValueError, match='no ENTRY computation'):
    hlo_traffic.traffic('%p = f32[4]{0} parameter(0)')


def test_hlo_traffic_knows_every_element_type():
  from jaxlib import xla_client

  from benchmarks import hlo_traffic

  size = hlo_traffic.shape_bytes
  assert size('c64[3]{0}') == 24 and size('c128[2,2]{1,0}') == 64
  for f8 in ('f8e4m3', 'f8e4m3b11fnuz', 'f8e4m3fnuz', 'f8e5m2fnuz', 'f8e3m4'):
    assert size(f'{f8}[5]{{0}}') == 5
  assert size('f8e8m0fnu[5]{0}') == 5
  # Sub-byte types as compiled HLO prints them (jaxlib 0.10.2, the CPU):
  # packed, `E(bits)` in the layout, rounded up to a whole byte per array.
  assert size('s4[3,5]{1,0:E(4)}') == 8 and size('u4[15]{0:E(4)}') == 8
  assert size('s2[3,5]{1,0:E(2)}') == 4 and size('u2[4]{0:E(2)}') == 1
  assert size('f4e2m1fn[3]{0:E(4)}') == 2
  assert size('s4[4]{0:T(2)E(4)S(1)}') == 2
  # Unpacked (no `E`), XLA stores one a byte.
  assert size('s4[3]{0}') == 3 and size('s4[3]') == 3
  assert size('(s64[2]{0}, token[], (u64[], f64[<=4]{0}))') == 56
  hlo = (
    'ENTRY %main.1 (x.1: s4[3,5], y.1: c64[2]) -> (s4[3,5], c64[2]) {\n'
    '  %x.1 = s4[3,5]{1,0:E(4)} parameter(0)\n'
    '  %y.1 = c64[2]{0} parameter(1)\n'
    '  %copy = s4[3,5]{1,0:E(4)} copy(%x.1)\n'
    '  %copy.1 = c64[2]{0} copy(%y.1)\n'
    '  ROOT %tuple = (s4[3,5]{1,0:E(4)}, c64[2]{0}) tuple(%copy, %copy.1)\n'
    '}\n'
  )
  assert hlo_traffic.traffic(hlo)['copy'] == {'count': 2, 'bytes': 48}
  # Every type this jaxlib names (TUPLE prints as parentheses).
  names = set(xla_client.PrimitiveType.__members__) - {
    'PRIMITIVE_TYPE_INVALID',
    'TUPLE',
  }
  names = {'opaque' if n == 'OPAQUE_TYPE' else n.lower() for n in names}
  assert names <= set(hlo_traffic._BYTES)
  # A shape it cannot size is an error, not 0 bytes.
  with pytest.raises(ValueError, match="unknown element type 'f7'"):
    size('(f32[2]{0}, f7[3]{0})')
  with pytest.raises(ValueError, match="dimension '\\?'"):
    size('f32[?,3]{1,0}')


def test_hlo_traffic_reads_a_compiled_module():
  from benchmarks import hlo_traffic

  compiled = (
    jax.jit(lambda x, y: (jnp.sin(x) + y, jnp.cos(x)))
    .lower(jnp.ones((64, 32)), jnp.ones((64, 32)))
    .compile()
  )
  moved = hlo_traffic.traffic(compiled.as_text())
  assert moved['fusion']['count'] == harness.hlo_counts(compiled)['fusions']
  # At least x and y read and both results written, 8 KiB each.
  assert moved['fusion']['bytes'] + moved['copy']['bytes'] >= 4 * 8192
