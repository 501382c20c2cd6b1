"""LeNet-5 train steps: the reference PyTorch DessiLBI beside dessilbi_jax.

Optional: needs PyTorch and a checkout of the reference implementation
(DessiLBI2020/DessiLBI; nothing of it ships here). Times, interleaved in one
process on the CPU, a whole train step (forward, backward, update) of the same
LeNet-5 (MNIST shapes) with: PyTorch SGD with momentum, the reference's SLBI
optimizer, ``optax.sgd`` and ``dessilbi_jax.dessilbi``, and prints each
framework's DessiLBI / SGD ratio.

Usage::

  python benchmarks/torch_reference.py --reference path/to/DessiLBI/DessiLBI/code
"""

import argparse
import contextlib
import io
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import optax

import dessilbi_jax as dl

try:
  from benchmarks import harness
  from benchmarks.models import LeNet5
except ImportError:  # run as a script from the repository root
  sys.path.insert(0, __file__.rsplit('/', 2)[0])
  from benchmarks import harness
  from benchmarks.models import LeNet5


def torch_lenet(torch):
  nn = torch.nn
  return nn.Sequential(
    nn.Conv2d(1, 6, 5, padding=2),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(6, 16, 5),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(16, 120, 5),
    nn.ReLU(),
    nn.Flatten(),
    nn.Linear(120, 84),
    nn.ReLU(),
    nn.Linear(84, 10),
  )


def torch_runner(torch, make_optimizer, x, y):
  model = torch_lenet(torch)
  optimizer = make_optimizer(model)
  loss_fn = torch.nn.CrossEntropyLoss()

  def step():
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    optimizer.step()
    return loss

  return step


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
    '--reference',
    required=True,
    help="folder holding the reference's slbi_opt.py (DessiLBI/code)",
  )
  parser.add_argument('--batch', type=harness.positive_int, default=128)
  parser.add_argument('--steps', type=harness.positive_int, default=30)
  parser.add_argument('--repeats', type=harness.positive_int, default=7)
  args = parser.parse_args(argv)
  try:
    import torch
  except ImportError:
    sys.exit('PyTorch is not installed: pip install torch')
  sys.path.insert(0, args.reference)
  if not os.path.isfile(os.path.join(args.reference, 'slbi_opt.py')):
    sys.exit(f'no slbi_opt.py in --reference {args.reference!r}')
  try:
    from slbi_opt import SLBI
  except ImportError as e:
    sys.exit(f'slbi_opt.py in {args.reference!r} failed to import: {e}')

  torch.manual_seed(0)
  xt = torch.randn(args.batch, 1, 28, 28)
  yt = torch.randint(0, 10, (args.batch,))

  def make_slbi(model):
    names = [n for n, _ in model.named_parameters()]
    coupled = [n for n, p in model.named_parameters() if p.dim() in (2, 4)]
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its settings
      opt = SLBI(model.parameters(), lr=0.1, kappa=1, mu=20, momentum=0.9)
    opt.assign_name(names)
    opt.initialize_slbi(coupled)
    return opt

  runners = {
    'torch_sgd': torch_runner(
      torch,
      lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9),
      xt,
      yt,
    ),
    'torch_slbi': torch_runner(torch, make_slbi, xt, yt),
  }

  module = LeNet5()
  x = jnp.asarray(xt.numpy().transpose(0, 2, 3, 1))
  y = jnp.asarray(yt.numpy())
  params = module.init(jax.random.key(0), x[:2])['params']
  for name, tx in (
    ('jax_sgd', optax.sgd(0.1, momentum=0.9)),
    ('jax_dessilbi', dl.dessilbi(0.1, nu=20.0)),
  ):
    step = harness.make_train_step(module, tx)
    carry = [harness.copy_tree(params), {}, tx.init(params)]

    def run(step=step, carry=carry):
      p, s, o, loss = step(*carry, x, y)
      carry[:] = [p, s, o]
      return loss

    runners[name] = run

  for run in runners.values():  # compile and warm up
    for _ in range(3):
      run()
  jax.block_until_ready(runners['jax_dessilbi']())
  times = {name: [] for name in runners}
  for _ in range(args.repeats):
    for name, run in runners.items():
      t0 = time.perf_counter()
      for _ in range(args.steps):
        loss = run()
      if name.startswith('jax'):
        jax.block_until_ready(loss)
      times[name].append((time.perf_counter() - t0) / args.steps * 1e3)
  ms = {name: statistics.median(t) for name, t in times.items()}
  print(f'LeNet-5 train step, batch {args.batch}, CPU ({torch.__version__})')
  for name, value in ms.items():
    print(f'  {name:13s} {value:8.3f} ms')
  print(
    f'  reference SLBI / torch SGD: {ms["torch_slbi"] / ms["torch_sgd"]:.2f}'
  )
  print(
    f'  dessilbi / optax.sgd:       {ms["jax_dessilbi"] / ms["jax_sgd"]:.2f}'
  )
  print(
    f'  dessilbi / reference SLBI:  {ms["jax_dessilbi"] / ms["torch_slbi"]:.2f}'
  )
  return ms


if __name__ == '__main__':
  main()
