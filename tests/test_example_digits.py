"""The digits example (examples/train_digits.py) runs and reports real numbers."""

import importlib.util
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import dessilbi_jax as dl

EXAMPLE = (
  pathlib.Path(__file__).resolve().parents[1] / 'examples' / 'train_digits.py'
)
TOTALS = {'conv1': 16, 'conv2': 32, 'fc': 2 * 2 * 32 * 10}


@pytest.fixture(scope='module')
def example():
  spec = importlib.util.spec_from_file_location('train_digits', EXAMPLE)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  try:
    spec.loader.exec_module(module)
    yield module
  finally:
    sys.modules.pop(spec.name, None)


def _run(example, out, *flags):
  final = example.main(['--out', str(out), '--no-progress', *flags])
  with open(out / 'metrics.json', encoding='utf-8') as f:
    metrics = json.load(f)
  return final, metrics


def _check_counts(record):
  assert set(record['selected']) == set(TOTALS)
  for layer, c in record['selected'].items():
    assert c['total'] == TOTALS[layer]
    assert 0 <= c['selected'] <= c['total']


def test_two_epochs_with_defaults(example, tmp_path):
  final, metrics = _run(example, tmp_path, '--epochs', '2')

  records = metrics['epochs']
  assert [r['epoch'] for r in records] == [1, 2]
  assert metrics['config']['epochs'] == 2
  assert final['metrics_path'] == str(tmp_path / 'metrics.json')
  assert {k: v for k, v in final.items() if k != 'metrics_path'} == records[-1]
  for r in records:
    assert np.isfinite(r['loss'])
    assert 0 <= r['wstar_acc'] <= 1
    _check_counts(r)
  assert records[1]['loss'] < records[0]['loss']
  assert final['acc'] > 0.5  # 10 classes: chance is 0.1
  if final['selected']['fc']['selected'] == 0:
    # No classifier weight in Γ's support: W* predicts from the fc bias alone,
    # one class for every image.
    assert final['wstar_acc'] < 0.2


def test_small_nu_selects_structure(example, tmp_path):
  # A strong coupling (small ν, constant step) starts the path within 2 epochs:
  # filters and classifier weights enter Γ and W* beats chance.
  final, metrics = _run(
    example, tmp_path, '--epochs', '2', '--nu', '0.5', '--schedule', 'constant'
  )
  assert len(metrics['epochs']) == 2
  _check_counts(final)
  assert final['selected']['conv1']['selected'] > 0
  assert final['selected']['conv2']['selected'] > 0
  assert final['selected']['fc']['selected'] > 0
  assert final['wstar_acc'] > 0.2


def test_sparse_params_and_counts(example):
  model = example.CNN(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, dl.dessilbi(0.1), wrt=nnx.Param)
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  gamma = example.get_gamma(optimizer)

  # Γ's support: the first half of the last axis of every coupled kernel.
  def half(g, w):
    if isinstance(g, optax.MaskedNode):
      return g
    keep = jnp.arange(w.shape[-1]) < w.shape[-1] // 2
    return jnp.where(keep, w + 1.0, 0.0)

  gamma = jax.tree.map(
    half, gamma, params, is_leaf=lambda x: isinstance(x, optax.MaskedNode)
  )
  wstar = example.sparse_params(params, gamma)

  for layer in ('conv1', 'conv2', 'fc'):
    w = np.asarray(params[layer]['kernel'])
    ws = np.asarray(wstar[layer]['kernel'])
    n = w.shape[-1] // 2
    np.testing.assert_array_equal(ws[..., :n], w[..., :n])
    assert not ws[..., n:].any()
  for layer in ('bn1', 'bn2'):
    for name in ('scale', 'bias'):
      np.testing.assert_array_equal(wstar[layer][name], params[layer][name])
  np.testing.assert_array_equal(wstar['fc']['bias'], params['fc']['bias'])

  counts = example.selected_counts(gamma)
  assert {k: (c['selected'], c['total']) for k, c in counts.items()} == {
    'conv1': (8, 16),
    'conv2': (16, 32),
    'fc': (640, 1280),
  }
  assert example.format_counts(counts) == (
    'conv1 8/16 conv2 16/32 filters, fc 640/1280 weights'
  )
