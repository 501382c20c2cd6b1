"""Benchmark models (Flax Linen, NHWC): MLP, LeNet-5, CIFAR ResNet-18, VGG-16.

Each entry gives a module, its input shape without the batch axis and its
default batch size (all have 10 classes). The models use BatchNorm where the
originals do, with batch statistics updated in the train step, as a real
training loop would.
"""

from collections.abc import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  widths: Sequence[int] = (1024, 1024, 1024)
  classes: int = 10

  @nn.compact
  def __call__(self, x, train=True):
    x = x.reshape(x.shape[0], -1)
    for i, w in enumerate(self.widths):
      x = nn.relu(nn.Dense(w, name=f'fc{i + 1}')(x))
    return nn.Dense(self.classes, name='head')(x)


class LeNet5(nn.Module):
  """LeNet-5 as in the reference's MNIST example (conv 6-16-120, fc 84-10)."""

  classes: int = 10

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.relu(nn.Conv(6, (5, 5), padding='SAME', name='conv1')(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(16, (5, 5), padding='VALID', name='conv2')(x))
    x = nn.max_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(120, (5, 5), padding='VALID', name='conv3')(x))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(84, name='fc1')(x))
    return nn.Dense(self.classes, name='fc2')(x)


class BasicBlock(nn.Module):
  width: int
  stride: int = 1

  @nn.compact
  def __call__(self, x, train=True):
    norm = lambda name: nn.BatchNorm(  # noqa: E731
      use_running_average=not train, momentum=0.9, name=name
    )
    y = nn.Conv(
      self.width, (3, 3), self.stride, padding=1, use_bias=False, name='conv1'
    )(x)
    y = nn.relu(norm('bn1')(y))
    y = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, name='conv2')(y)
    y = norm('bn2')(y)
    if self.stride != 1 or x.shape[-1] != self.width:
      x = nn.Conv(
        self.width, (1, 1), self.stride, use_bias=False, name='shortcut'
      )(x)
      x = norm('shortcut_bn')(x)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """CIFAR ResNet of basic blocks (3x3 stem, 4 stages): ResNet-18 with 2
  blocks a stage (11.2 M params, 62 leaves), ResNet-34 with 3, 4, 6, 3
  (21.3 M params, 110 leaves)."""

  blocks: Sequence = (2, 2, 2, 2)
  classes: int = 10

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.Conv(64, (3, 3), padding=1, use_bias=False, name='conv1')(x)
    x = nn.relu(
      nn.BatchNorm(use_running_average=not train, momentum=0.9, name='bn1')(x)
    )
    for stage, width in enumerate((64, 128, 256, 512)):
      for block in range(self.blocks[stage]):
        stride = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(width, stride, name=f'layer{stage + 1}_{block}')(
          x, train
        )
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.classes, name='fc')(x)


class VGG16(nn.Module):
  """CIFAR VGG-16 with BatchNorm (13 conv layers, one classifier, 15 M params)."""

  classes: int = 10
  cfg: Sequence = (
    64,
    64,
    'M',
    128,
    128,
    'M',
    256,
    256,
    256,
    'M',
    512,
    512,
    512,
    'M',
    512,
    512,
    512,
    'M',
  )

  @nn.compact
  def __call__(self, x, train=True):
    i = 0
    for v in self.cfg:
      if v == 'M':
        x = nn.max_pool(x, (2, 2), (2, 2))
        continue
      i += 1
      x = nn.Conv(v, (3, 3), padding=1, use_bias=False, name=f'conv{i}')(x)
      x = nn.relu(
        nn.BatchNorm(
          use_running_average=not train, momentum=0.9, name=f'bn{i}'
        )(x)
      )
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(self.classes, name='fc')(x)


# name -> (module, input shape without the batch axis, default batch size)
MODELS = {
  'mlp': (MLP(), (28, 28, 1), 128),
  'lenet5': (LeNet5(), (28, 28, 1), 128),
  'resnet18': (ResNet(), (32, 32, 3), 256),
  'resnet34': (ResNet((3, 4, 6, 3)), (32, 32, 3), 256),
  'vgg16': (VGG16(), (32, 32, 3), 256),
}
