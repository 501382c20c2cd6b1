"""Flax NNX models for the examples, with readable layer names.

Every model is built from a dict of layer widths (``widths``), so that a model
slimmed or widened by :func:`dessilbi_jax.slim` / :func:`dessilbi_jax.widen`
can be rebuilt at its new widths (``Surgery.widths`` updates the dict, and
``width``, the multiplier it was built at, sizes the layers the dict leaves
out: ResNet's stem and stages), and has a ``spec()`` giving the channel links
those functions need.

* :class:`LeNet5` — the reference's MNIST example: conv1 (5×5, 6) - pool -
  conv2 (5×5, 16) - pool - conv3 (5×5, 120) - fc1 (84) - fc2, ReLU.
* :class:`MLP` — fc1, fc2, ... fc<n> (the last one is the classifier).
* :class:`VGG` — conv<i> + bn<i> + ReLU, max-pools between stages, then fc.
* :class:`ResNet` — CIFAR ResNet-20/56 (depth 6n + 2, widths 16/32/64 × a
  multiplier); blocks named ``stage<s>_block<b>`` with ``conv1, bn1, conv2,
  bn2`` (and ``shortcut, shortcut_bn`` where the shape changes).
"""

import re
from collections.abc import Mapping
from typing import Any, ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import nnx

import dessilbi_jax as dl


def _scaled(widths: Mapping[str, int], width: float) -> dict[str, int]:
  return {k: max(1, round(v * width)) for k, v in widths.items()}


def _pool(x):
  return nnx.max_pool(x, (2, 2), strides=(2, 2))


class LeNet5(nnx.Module):
  """LeNet-5 as in the reference's MNIST example (ReLU, max-pool).

  conv1 keeps the image size ('SAME'); conv2 is 'VALID' on images of 28×28
  and larger, 'SAME' on smaller ones (8×8 digits); conv3's kernel covers the
  whole remaining feature map (5×5 on MNIST), so it acts as a fully
  connected layer of filters. ``norm=True`` adds BatchNorm after each conv
  (bn1..bn3), an option for experiments.
  """

  BASE: ClassVar[dict[str, int]] = {
    'conv1': 6,
    'conv2': 16,
    'conv3': 120,
    'fc1': 84,
  }
  LAYERS = ('conv1', 'conv2', 'conv3', 'fc1', 'fc2')
  CONVS = ('conv1', 'conv2', 'conv3')

  def __init__(
    self,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    width: float = 1.0,
    widths: Optional[Mapping[str, int]] = None,
    norm: bool = False,
    rngs: nnx.Rngs,
  ):
    w = {**_scaled(self.BASE, width), **(widths or {})}
    self.widths, self.width = w, width
    self.norm = norm
    s = image_size // 2
    self.pad2 = 'VALID' if s >= 14 else 'SAME'
    s = (s - 4 if self.pad2 == 'VALID' else s) // 2
    self.conv1 = nnx.Conv(in_channels, w['conv1'], (5, 5), rngs=rngs)
    self.conv2 = nnx.Conv(
      w['conv1'], w['conv2'], (5, 5), padding=self.pad2, rngs=rngs
    )
    self.conv3 = nnx.Conv(
      w['conv2'], w['conv3'], (s, s), padding='VALID', rngs=rngs
    )
    if norm:
      self.bn1 = nnx.BatchNorm(w['conv1'], rngs=rngs)
      self.bn2 = nnx.BatchNorm(w['conv2'], rngs=rngs)
      self.bn3 = nnx.BatchNorm(w['conv3'], rngs=rngs)
    self.fc1 = nnx.Linear(w['conv3'], w['fc1'], rngs=rngs)
    self.fc2 = nnx.Linear(w['fc1'], num_classes, rngs=rngs)

  def _bn(self, i, x):
    return getattr(self, f'bn{i}')(x) if self.norm else x

  def __call__(self, x: jax.Array) -> jax.Array:
    x = _pool(nnx.relu(self._bn(1, self.conv1(x))))
    x = _pool(nnx.relu(self._bn(2, self.conv2(x))))
    x = nnx.relu(self._bn(3, self.conv3(x)))
    x = nnx.relu(self.fc1(x.reshape(x.shape[0], -1)))
    return self.fc2(x)

  def spec(self) -> dict[str, dl.Link]:
    # The norms are known here: naming cannot tell bn1 from a fc1 that has
    # conv1's width.
    norms = {
      layer: (
        f'bn{layer[-1]}' if self.norm and layer.startswith('conv') else None
      )
      for layer in self.LAYERS
    }
    return dl.chain_spec(nnx.state(self, nnx.Param), self.LAYERS, norms=norms)


class MLP(nnx.Module):
  """Flatten, then fc1 .. fc<n> with ReLU; the last layer is the classifier."""

  BASE: ClassVar[dict[str, int]] = {'fc1': 300, 'fc2': 100}

  def __init__(
    self,
    *,
    in_features: int = 784,
    num_classes: int = 10,
    width: float = 1.0,
    widths: Optional[Mapping[str, int]] = None,
    rngs: nnx.Rngs,
  ):
    w = {**_scaled(self.BASE, width), **(widths or {})}
    self.widths, self.width = w, width
    hidden = [w[k] for k in sorted(w, key=lambda k: int(k[2:]))]
    sizes = [in_features, *hidden, num_classes]
    self.layer_names = tuple(f'fc{i + 1}' for i in range(len(sizes) - 1))
    for name, a, b in zip(self.layer_names, sizes[:-1], sizes[1:], strict=True):
      setattr(self, name, nnx.Linear(a, b, rngs=rngs))

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x.reshape(x.shape[0], -1)
    for name in self.layer_names[:-1]:
      x = nnx.relu(getattr(self, name)(x))
    return getattr(self, self.layer_names[-1])(x)

  def spec(self) -> dict[str, dl.Link]:
    return dl.chain_spec(nnx.state(self, nnx.Param), self.layer_names)


VGG_CONFIGS = {
  # widths of the convs, 'M' for a 2×2 max-pool (CIFAR-sized VGG-11 / 16).
  'vgg11': (64, 'M', 128, 'M', 256, 256, 'M', 512, 512, 'M', 512, 512, 'M'),
  'vgg16': (
    *(64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M'),
    *(512, 512, 512, 'M', 512, 512, 512, 'M'),
  ),
}


class VGG(nnx.Module):
  """VGG-style: conv<i> (3×3) - bn<i> - ReLU, pools, global max, fc."""

  def __init__(
    self,
    config: str = 'vgg11',
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    width: float = 1.0,
    widths: Optional[Mapping[str, int]] = None,
    rngs: nnx.Rngs,
  ):
    plan: list[str] = []
    base: dict[str, int] = {}
    i = 0
    for v in VGG_CONFIGS[config]:
      if isinstance(v, int):
        i += 1
        base[f'conv{i}'] = v
        plan.append(f'conv{i}')
      else:  # 'M'
        plan.append('M')
    w = {**_scaled(base, width), **(widths or {})}
    self.widths, self.width, self.plan = w, width, tuple(plan)
    c = in_channels
    for name in self.plan:
      if name == 'M':
        continue
      setattr(
        self, name, nnx.Conv(c, w[name], (3, 3), use_bias=False, rngs=rngs)
      )
      setattr(self, 'bn' + name[4:], nnx.BatchNorm(w[name], rngs=rngs))
      c = w[name]
    self.fc = nnx.Linear(c, num_classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for name in self.plan:
      if name == 'M':
        x = _pool(x)
      else:
        x = getattr(self, name)(x)
        x = nnx.relu(getattr(self, 'bn' + name[4:])(x))
    return self.fc(jnp.max(x, axis=(1, 2)))

  def spec(self) -> dict[str, dl.Link]:
    convs = [n for n in self.plan if n != 'M']
    return dl.chain_spec(nnx.state(self, nnx.Param), [*convs, 'fc'])


class Block(nnx.Module):
  """conv1 - bn1 - ReLU - conv2 - bn2, plus the shortcut, ReLU."""

  def __init__(self, c_in, mid, c_out, stride, *, rngs):
    self.conv1 = nnx.Conv(
      c_in, mid, (3, 3), strides=stride, use_bias=False, rngs=rngs
    )
    self.bn1 = nnx.BatchNorm(mid, rngs=rngs)
    self.conv2 = nnx.Conv(mid, c_out, (3, 3), use_bias=False, rngs=rngs)
    self.bn2 = nnx.BatchNorm(c_out, rngs=rngs)
    self.project = stride != 1 or c_in != c_out
    if self.project:
      self.shortcut = nnx.Conv(
        c_in, c_out, (1, 1), strides=stride, use_bias=False, rngs=rngs
      )
      self.shortcut_bn = nnx.BatchNorm(c_out, rngs=rngs)

  def __call__(self, x):
    y = nnx.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    s = self.shortcut_bn(self.shortcut(x)) if self.project else x
    return nnx.relu(y + s)


class ResNet(nnx.Module):
  """CIFAR ResNet (He et al. 2016): depth 6n + 2 (20, 56), stem ``conv`` +
  ``bn``, three stages of n blocks, global average pool, ``fc``.

  Only the blocks' inner convs (``stage<s>_block<b>/conv1``) can be slimmed
  or widened on their own; the others feed residual additions.
  """

  def __init__(
    self,
    depth: int = 20,
    *,
    in_channels: int = 3,
    num_classes: int = 10,
    width: float = 1.0,
    widths: Optional[Mapping[str, int]] = None,
    rngs: nnx.Rngs,
  ):
    if (depth - 2) % 6:
      raise ValueError(f'depth must be 6n + 2 (20, 32, 56...), got {depth}.')
    n = (depth - 2) // 6
    stage = [max(1, round(c * width)) for c in (16, 32, 64)]
    self.block_names = []
    base = {}
    for s in range(3):
      for b in range(n):
        base[f'stage{s + 1}_block{b + 1}/conv1'] = stage[s]
    w = {**base, **(widths or {})}
    self.widths, self.width = w, width
    self.conv = nnx.Conv(
      in_channels, stage[0], (3, 3), use_bias=False, rngs=rngs
    )
    self.bn = nnx.BatchNorm(stage[0], rngs=rngs)
    c = stage[0]
    for s in range(3):
      for b in range(n):
        name = f'stage{s + 1}_block{b + 1}'
        stride = 2 if s > 0 and b == 0 else 1
        block = Block(c, w[name + '/conv1'], stage[s], stride, rngs=rngs)
        setattr(self, name, block)
        self.block_names.append(name)
        c = stage[s]
    self.fc = nnx.Linear(c, num_classes, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.bn(self.conv(x)))
    for name in self.block_names:
      x = getattr(self, name)(x)
    return self.fc(jnp.mean(x, axis=(1, 2)))

  def spec(self) -> dict[str, dl.Link]:
    return {
      f'{b}/conv1': dl.Link(norm=f'{b}/bn1', consumers=(f'{b}/conv2',))
      for b in self.block_names
    }


MODELS = ('lenet5', 'mlp', 'vgg11', 'vgg16', 'resnet20', 'resnet56')


def build(
  name: str,
  image_shape: tuple[int, int, int],
  num_classes: int,
  *,
  width: float = 1.0,
  widths: Optional[Mapping[str, int]] = None,
  seed: int = 0,
  **kwargs: Any,
) -> nnx.Module:
  """A model by name for images of ``image_shape`` (h, w, c)."""
  h, w, c = image_shape
  rngs = nnx.Rngs(seed)
  common: dict[str, Any] = dict(
    num_classes=num_classes, width=width, widths=widths, rngs=rngs
  )
  if name == 'lenet5':
    return LeNet5(in_channels=c, image_size=h, **common, **kwargs)
  if name == 'mlp':
    return MLP(in_features=h * w * c, **common, **kwargs)
  if name.startswith('vgg'):
    side = 2 ** VGG_CONFIGS[name].count('M')
    if min(h, w) < side:
      raise ValueError(
        f'{name} pools {VGG_CONFIGS[name].count("M")} times: it needs images '
        f'of at least {side}×{side}, got {h}×{w} (CIFAR-10 is 32×32).'
      )
    return VGG(name, in_channels=c, **common, **kwargs)
  if name.startswith('resnet'):
    return ResNet(int(name[6:]), in_channels=c, **common, **kwargs)
  raise ValueError(f'unknown model {name!r}; choose from {MODELS}.')


def natural_key(path: str) -> tuple[Any, ...]:
  """Sorts layer paths with their numbers as numbers (conv2 before conv10):
  the forward order of the models here (NNX states sort names as text)."""
  return tuple(
    int(part) if i % 2 else part
    for i, part in enumerate(re.split(r'(\d+)', path))
  )


def kernel_layers(model: nnx.Module) -> list[str]:
  """Layer paths of the model's conv kernels, in forward order."""
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  out = []

  def visit(tree, prefix):
    for k, v in tree.items():
      path = f'{prefix}{k}'
      if isinstance(v, dict):
        visit(v, path + '/')
      elif k == 'kernel' and v.ndim == 4:
        out.append(prefix.rstrip('/'))

  visit(params, '')
  return sorted(out, key=natural_key)
