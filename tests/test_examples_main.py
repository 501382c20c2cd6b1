"""The main job and the workflows run end to end on the bundled digits."""

import io
import json
import pathlib
import re
import sys

import numpy as np
import pytest
from flax import nnx

sys.path.insert(0, str(pathlib.Path(__file__).parents[1]))

from examples import common, seeds, train
from examples import data as data_lib
from examples import models as models_lib
from examples.search import search
from examples.workflows import grow, prune, tickets

# Small batches, a strong coupling and a low threshold: the path starts
# within an epoch on the 1,347 training digits.
FAST = [
  '--dataset',
  'digits',
  '--batch-size',
  '32',
  '--nu',
  '2',
  '--lam',
  '1',
  '--warmup',
  '0',
  '--no-progress',
]


def _find(tree, key):
  """The first value under ``key`` in nested dicts and lists."""
  if isinstance(tree, dict):
    if key in tree:
      return tree[key]
    tree = list(tree.values())
  if isinstance(tree, (list, tuple)):
    for t in tree:
      found = _find(t, key)
      if found is not None:
        return found
  return None


def test_main_job_writes_everything(tmp_path):
  m = train.main(
    [*FAST, '--epochs', '2', '--lr-step', '1', '--out', str(tmp_path)]
  )
  files = m['files']
  for name in ('selected_filters', 'norm_paths', 'accuracy'):
    path = pathlib.Path(files[name])
    assert path.suffix == '.png' and path.stat().st_size > 10_000
  with open(tmp_path / 'metrics.json', encoding='utf-8') as f:
    saved = json.load(f)
  assert [r['epoch'] for r in saved['epochs']] == [1, 2]
  assert [r['epoch'] for r in saved['sgd_epochs']] == [1, 2]
  for r in saved['epochs']:
    assert np.isfinite(r['loss']) and 0 <= r['wstar_acc'] <= 1
    assert set(r['selected']) == {'conv1', 'conv2', 'conv3'}
    assert 0 <= r['conv_filter_share'] <= 1
  final = saved['final']
  assert final['acc'] > 0.6 and final['sgd_acc'] > 0.6  # chance is 0.1
  assert final['wstar_acc'] > 0.5
  sel = final['selected']
  assert sel['conv1'][1] == 6 and sel['conv3'][1] == 120
  assert 0 < sum(v[0] for v in sel.values()) < 142
  # The slimmed W* is the W* network: same accuracy, fewer params and FLOPs.
  slim, dense = saved['slim'], saved['dense']
  assert slim['acc'] == pytest.approx(final['wstar_acc'], abs=0.003)
  assert slim['params'] < dense['params'] and slim['flops'] < dense['flops']
  assert slim['widths']['conv3'] == max(sel['conv3'][0], 1)
  assert set(saved['prune_by_selection_order']['acc']) == {'50%', '70%', '90%'}

  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(pathlib.Path(files['checkpoint']))
  assert restored['params']['conv3']['kernel'].shape == (2, 2, 16, 120)
  gamma = _find(restored['opt_state'], 'gamma')
  selected = np.any(gamma['conv3']['kernel'] != 0, axis=(0, 1, 2)).sum()
  assert selected == sel['conv3'][0]


def test_missing_dataset_is_a_clear_error(tmp_path):
  with pytest.raises(SystemExit, match='train-images-idx3-ubyte'):
    train.main(
      ['--dataset', 'mnist', '--data-dir', str(tmp_path), '--no-progress']
    )


@pytest.mark.parametrize(
  'script, argv, message',
  [
    (train, ['--nu', '0'], '--nu must be finite and > 0'),
    (train, ['--width', '0'], '--width must be finite and > 0'),
    (train, ['--momentum', '1.5'], r'--momentum must lie in \[0, 1\)'),
    (train, ['--couple', 'none'], "invalid choice: 'none'"),
    (train, ['--seed', '-1'], '--seed must be finite and >= 0'),
    (train, ['--dataset', 'foo'], "--dataset: unknown dataset 'foo'"),
    (train, ['--model', 'vgg11'], r'at least 32×32, got 8×8'),
    (train, ['--norm-layer', 'conv9'], "'conv9' is not a conv layer"),
    (train, ['--prune-layer', 'fc9'], "'fc9' is not a conv layer"),
    (prune, ['--fractions', '0.5,1.5'], r'--fractions: each in \[0, 1\]'),
    (prune, ['--fractions', 'x'], '--fractions: numbers'),
    (prune, ['--layers', 'conv9'], "--layers: 'conv9' is not"),
    (grow, ['--round-epochs', '0'], '--round-epochs must be >= 1'),
    (tickets, ['--at', 'x'], '--at: epochs'),
    (prune, ['--model', 'mlp'], '--model: mlp has no conv layers'),
    (
      tickets,
      ['--model', 'mlp', '--epochs', '1', '--at', '1'],
      '--model: mlp has no conv layers',
    ),
    (seeds, ['--seeds', '3-1'], '--seeds: expected'),
  ],
)
def test_bad_flags_are_rejected_before_training(script, argv, message, capsys):
  # Before any training: each of these used to fail after it, or not at all.
  digits = [] if script is seeds else ['--dataset', 'digits', '--no-progress']
  with pytest.raises(SystemExit) as info:
    script.main([*digits, *argv])
  text = str(info.value.code) + capsys.readouterr().err
  assert re.search(message, text), text


@pytest.mark.parametrize(
  'script, argv, message',
  [
    (prune, ['--finetune-lr', '0'], '--finetune-lr must be finite and > 0'),
    (prune, ['--finetune-lr', '-0.1'], '--finetune-lr must be finite'),
    (prune, ['--finetune-lr', 'nan'], '--finetune-lr must be finite'),
    (prune, ['--finetune-lr', 'inf'], '--finetune-lr must be finite'),
    (grow, ['--threshold', '-0.5'], r'--threshold must lie in \[0, 1\)'),
    (grow, ['--threshold', '1'], r'--threshold must lie in \[0, 1\)'),
    (grow, ['--threshold', 'nan'], r'--threshold must lie in \[0, 1\)'),
    (grow, ['--factor', 'nan'], '--factor must be finite and > 1'),
    (grow, ['--factor', 'inf'], '--factor must be finite and > 1'),
    (train, ['--lr', 'nan'], '--lr must be finite and > 0'),
    (train, ['--kappa', 'inf'], '--kappa must be finite and > 0'),
    (train, ['--weight-decay', 'nan'], '--weight-decay must be finite'),
    (train, ['--warmup', 'inf'], '--warmup must be finite and >= 0'),
  ],
)
def test_workflow_flags_are_range_checked(script, argv, message, capsys):
  # Were taken as given: a zero, negative or NaN fine-tune step size, a
  # threshold no share of filters can pass (or every share passes), and a
  # NaN or infinite step size, coupling or growth factor.
  with pytest.raises(SystemExit):
    script.parse_args(['--dataset', 'digits', *argv])
  err = capsys.readouterr().err
  assert re.search(message, err), err


def test_slim_resnet_keeps_its_width():
  # ResNet's stem and stages follow the width multiplier, not ``widths``:
  # the slimmed model was built at width 1, its layers' stored features
  # those of width 1 (the arrays, loaded into it, were right).
  x, y = np.zeros((1, 8, 8, 3), np.float32), np.zeros(1, np.int32)
  ds = data_lib.Dataset('tiny', x, y, x, y)
  model = models_lib.build('resnet8', ds.image_shape, 10, width=0.25)
  spec = model.spec()
  # Stage 3's inner conv halved, 16 -> 8 (shapes of stage 2: a fast build).
  keep = {k: np.arange(model.widths[k]) < 8 for k in spec}
  small, widths = common.slim_model('resnet8', ds, model, keep, spec)
  assert list(widths.values()) == [4, 8, 8]
  checked = 0
  for path, m in nnx.iter_graph(small):
    if isinstance(m, (nnx.Conv, nnx.Linear)):
      features = (m.in_features, m.out_features)
      assert features == m.kernel[...].shape[-2:], path
      checked += 1
    elif isinstance(m, nnx.BatchNorm):
      assert m.num_features == m.scale[...].shape[-1], path
      checked += 1
  assert checked == 19  # stem conv and bn, 3 blocks (2 with shortcuts), fc


def test_pruning_workflow(tmp_path):
  out = prune.main(
    [
      *FAST,
      '--epochs',
      '1',
      '--fractions',
      '0.5,0.9',
      '--finetune-epochs',
      '1',
      '--out',
      str(tmp_path),
    ]
  )
  assert out['layers'] == ['conv3']
  for name, r in out['results'].items():
    for key in ('no fine-tune', 'fine-tuned'):
      assert len(r[key]) == 2 and all(0 <= a <= 1 for a in r[key]), name
  assert pathlib.Path(out['files']['plot']).stat().st_size > 10_000


def test_tickets_workflow(tmp_path):
  out = tickets.main(
    [*FAST, '--epochs', '1', '--at', '1', '--out', str(tmp_path)]
  )
  names = [(r['name'], r['epoch']) for r in out['results']]
  assert names == [('dense', None), ('ticket', 1), ('random', 1)]
  ticket, random = out['results'][1], out['results'][2]
  assert ticket['selected'] == random['selected']  # same sparsity per layer
  assert 0 < ticket['conv_filter_share'] < 1
  assert all(0 <= r['acc'] <= 1 for r in out['results'])


def test_growing_workflow(tmp_path):
  out = grow.main(
    [
      *FAST,
      '--start',
      '2,4,8',
      '--round-epochs',
      '1',
      '--max-rounds',
      '1',
      '--final-epochs',
      '1',
      '--threshold',
      '0.3',
      '--baselines',
      'sgd',
      '--out',
      str(tmp_path),
    ]
  )
  first = out['grown']['rounds'][0]
  assert first['widths'] == {'conv1': 2, 'conv2': 4, 'conv3': 8}
  assert first['grown']  # everything selected in a narrow net: it widens
  widths = out['grown']['widths']
  assert all(widths[k] == 2 * first['widths'][k] for k in first['grown'])
  assert set(out['fixed']) == {'sgd'}
  assert (
    out['grown']['dense_cost']['params']
    < out['fixed']['sgd']['dense_cost']['params']
  )
  assert out['epochs'] == out['growth_epochs'] + 1


def test_conv_layers_in_forward_order():
  # NNX sorts names as text (conv10 before conv2): the defaults "second conv"
  # (--norm-layer) and "last conv" (--prune-layer, --layers) were conv10 and
  # conv9 on VGG-16.
  model = models_lib.build('vgg16', (32, 32, 3), 10, width=1 / 16)
  assert models_lib.kernel_layers(model) == [f'conv{i}' for i in range(1, 14)]


def test_checkpoint_keeps_batchnorm_statistics(tmp_path):
  m = train.main(
    [
      *FAST,
      *('--norm', '--epochs', '1', '--no-sgd', '--no-plots'),
      *('--out', str(tmp_path)),
    ]
  )
  import orbax.checkpoint as ocp
  from flax import nnx

  with ocp.StandardCheckpointer() as ckpt:
    restored = ckpt.restore(pathlib.Path(m['files']['checkpoint']))
  ds = data_lib.load('digits')
  model = models_lib.build('lenet5', ds.image_shape, 10, norm=True, seed=1)
  for kind, key in ((nnx.Param, 'params'), (nnx.BatchStat, 'batch_stats')):
    state = nnx.state(model, kind)
    nnx.replace_by_pure_dict(state, restored[key])
    nnx.update(model, state)
  # The restored network is the one evaluated: same test accuracy.
  acc = common.accuracy(model, ds.x_test, ds.y_test)
  assert acc == pytest.approx(m['final']['acc'])


def test_growing_workflow_with_batchnorm(tmp_path):
  out = grow.main(
    [
      *FAST,
      *('--norm', '--start', '2,4,8', '--round-epochs', '1'),
      *('--max-rounds', '1', '--final-epochs', '1', '--baselines', ''),
      *('--out', str(tmp_path)),
    ]
  )
  grown = out['grown']
  assert 0 <= grown['wstar_acc'] <= 1 and out['fixed'] == {}
  assert grown['wstar_cost']['params'] <= grown['dense_cost']['params']


def test_fixed_width_baseline_decays_once():
  args = grow.parse_args(['--dataset', 'digits', '--warmup', '0'])
  fixed = grow.fixed_width_args(args, 5, 15)  # final phase of 10 epochs
  lr = common.schedule(fixed, 10)
  assert float(lr(49)) == pytest.approx(0.1)
  for step in (50, 99, 100, 149):  # the grown run's final step size
    assert float(lr(step)) == pytest.approx(0.01), step


def test_seeds_without_sgd(tmp_path, monkeypatch):
  def fake_main(argv):
    seed = int(argv[argv.index('--seed') + 1])
    final = dict(
      acc=0.9 + seed / 100, sgd_acc=None, wstar_acc=0.8, conv_filter_share=0.3
    )
    prune = dict(acc={'50%': 0.9})
    return dict(config={}, final=final, prune_by_selection_order=prune)

  monkeypatch.setattr(seeds.train, 'main', fake_main)
  out = seeds.main(['--seeds', '0-1', '--out', str(tmp_path), '--', '--no-sgd'])
  assert out['failed_sgd'] == []  # no SGD run is not a run at chance
  assert 'sgd_acc' not in out['summary']
  assert out['summary']['dessilbi_acc']['mean'] == pytest.approx(0.905)
  text = (tmp_path / 'summary.json').read_text(encoding='utf-8')
  json.loads(text, parse_constant=lambda c: pytest.fail(f'{c} in the JSON'))


def test_search_harness_uses_the_lines_dataset(monkeypatch, capsys):
  loaded = []
  load = search.data.load

  def spy(name, *a, **kw):
    loaded.append(name)
    return load(name, *a, **kw)

  monkeypatch.setattr(search.data, 'load', spy)
  line = '--dataset digits --epochs 1 --batch-size 64 --nu 2 --lam 1 --warmup 0'
  monkeypatch.setattr(sys, 'stdin', io.StringIO(line + '\n'))
  search.main([])
  out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert loaded == ['digits']
  assert {'acc', 'wstar', 'conv_share', 'p50', 'p70', 'p90'} <= set(out)
