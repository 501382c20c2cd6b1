"""DessiLBI on 8 host CPU devices; run by tests/test_multidevice.py.

Run as a script in a process started with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``. It prints one JSON
object of measurements (largest differences to the one-device trajectory,
sharding and type checks) for the test to assert on.
"""

import json
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import dessilbi_jax as dl
from dessilbi_jax import _trees

STEPS = 25
BATCH = 64
TX = dl.dessilbi(0.05, nu=0.05, weight_decay=1e-3)


def problem():
  """A conv-shaped regression: 16 filters, a sparse teacher using 4."""
  k = jax.random.split(jax.random.key(0), 5)
  teacher = jax.random.normal(k[0], (8, 8, 8, 16)) * (jnp.arange(16) < 4)
  head = jax.random.normal(k[1], (16, 8))
  x = jax.random.normal(k[2], (BATCH, 8, 8, 8))
  y = jnp.einsum('bhwc,hwco->bo', x, teacher) @ head / 16
  params = {
    'conv': {'kernel': 0.02 * jax.random.normal(k[3], (8, 8, 8, 16))},
    'dense': {
      'kernel': 0.1 * jax.random.normal(k[4], (16, 8)),
      'bias': jnp.zeros(8),
    },
  }
  return params, x, y


def loss(params, x, y):
  # A contraction over an explicitly sharded axis must be told how to shard
  # its output (like the batch); automatic axes leave it to the compiler.
  kw = {}
  if jax.sharding.get_abstract_mesh().are_all_axes_explicit:
    kw['out_sharding'] = P(jax.typeof(x).sharding.spec[0], None)
  h = jnp.einsum('bhwc,hwco->bo', x, params['conv']['kernel'], **kw)
  h = jnp.einsum('bi,io->bo', h, params['dense']['kernel'], **kw)
  return jnp.mean((h + params['dense']['bias'] - y) ** 2)


@jax.jit
def step(params, state, x, y):
  grads = jax.grad(loss)(params, x, y)
  updates, state = TX.update(grads, state, params)
  return optax.apply_updates(params, updates), state


def run(params, x, y):
  state = first = TX.init(params)
  for _ in range(STEPS):
    params, state = step(params, state, x, y)
  return params, first, state


def max_diff(a, b):
  diffs = jax.tree.map(
    lambda u, v: float(np.max(np.abs(np.asarray(u) - np.asarray(v)))), a, b
  )
  return max(jax.tree.leaves(diffs), default=0.0)


def same_sharding(tree, ref):
  """Each leaf of ``tree`` is sharded as the leaf of ``ref`` at its place."""
  ok = jax.tree.map(
    lambda s, p: s.sharding.is_equivalent_to(p.sharding, p.ndim), tree, ref
  )
  return all(jax.tree.leaves(ok))


def coupled(tree):
  return {'conv': tree['conv'], 'dense': tree['dense']['kernel']}


def put(a, mesh, spec):
  return jax.device_put(a, NamedSharding(mesh, spec))


def trajectories():
  """Data-parallel and sharded runs against the one-device run."""
  params, x, y = problem()
  ref_params, _, ref_state = run(params, x, y)
  gamma = optax.tree.get(ref_state, 'gamma')['conv']['kernel']
  selected = int(jnp.sum(jnp.any(gamma != 0, axis=(0, 1, 2))))

  auto, explicit = AxisType.Auto, AxisType.Explicit
  model = ((8,), ('model',), P())  # mesh shape, axis names, batch spec
  variants = {
    # name: (mesh shape, axis names, batch, conv kernel, dense kernel, kinds)
    'data': ((8,), ('data',), P('data'), P(), P(), (auto, explicit)),
    'axis0': (*model, P('model'), P('model'), (auto,)),
    'axis1': (*model, P(None, 'model'), P(None, 'model'), (explicit,)),
    'axis2': (*model, P(None, None, 'model'), P(), (explicit,)),
    'filters': (*model, P(None, None, None, 'model'), P(), (auto, explicit)),
    'data_x_filters': (
      (2, 4),
      ('data', 'model'),
      P('data'),
      P(None, None, None, 'model'),
      P('model'),
      (auto,),
    ),
  }
  cases = {}
  for name, (shape, axes, batch, conv, dense, kinds) in variants.items():
    for kind in kinds:
      mesh = jax.make_mesh(shape, axes, axis_types=(kind,) * len(shape))
      with jax.set_mesh(mesh):
        p = {
          'conv': {'kernel': put(params['conv']['kernel'], mesh, conv)},
          'dense': {
            'kernel': put(params['dense']['kernel'], mesh, dense),
            'bias': put(params['dense']['bias'], mesh, P()),
          },
        }
        new, first, state = run(p, put(x, mesh, batch), put(y, mesh, batch))
      # With automatic axes the compiler may re-shard the params (the Dense
      # kernel's inputs take the conv filters' sharding); the state follows
      # whatever sharding the params get.
      state_trees = [
        coupled(optax.tree.get(state, 'z')),
        coupled(optax.tree.get(state, 'gamma')),
      ]
      cases[f'{name}/{kind.name}'] = {
        'params': max_diff(new, ref_params),
        'state': max_diff(state, ref_state),
        'init_follows_params': same_sharding(
          coupled(optax.tree.get(first, 'z')), coupled(p)
        ),
        'state_follows_params': all(
          same_sharding(t, coupled(new)) for t in state_trees
        )
        and same_sharding(optax.tree.get(state, 'trace'), new),
        'params_keep_sharding': same_sharding(new, p),
      }
  return {'selected_filters': selected, 'cases': cases}


def types_stable():
  """As optax/_src/sharding_test.py: with sharding in types, the state's
  types (shape, dtype, sharding) are the same after init and after updates,
  eager or jitted."""
  mesh = jax.make_mesh((8,), ('x',), axis_types=(AxisType.Explicit,))
  out = {}
  with jax.set_mesh(mesh):
    for name, dtype, tx in (
      ('dessilbi', jnp.float32, dl.dessilbi(1.0, nu=1.0)),
      ('dessilbi', jnp.bfloat16, dl.dessilbi(1.0, nu=1.0)),
      (
        'core_f32_state',
        jnp.float16,
        dl.scale_by_dessilbi(1.0, state_dtype=jnp.float32),
      ),
      (
        'core_compact_gamma',
        jnp.float32,
        dl.scale_by_dessilbi(1.0, store_gamma=False),
      ),
      (
        # Its record used to start replicated and take Γ's sharding at the
        # first update: lax.scan refused the state as its carry.
        'track_selection',
        jnp.float32,
        dl.track_selection(dl.dessilbi(1.0, nu=1.0)),
      ),
    ):
      p = {
        'conv': jnp.ones(
          (3, 3, 8, 16), dtype, out_sharding=P(*[None] * 3, 'x')
        ),
        'dense': jnp.ones((2, 8, 4), dtype, out_sharding=P(None, 'x')),
        'b': jnp.ones((8,), dtype, out_sharding=P('x')),
      }
      s0 = tx.init(p)
      s1 = tx.update(p, s0, p)[1]
      s2 = jax.jit(tx.init)(p)
      s3 = jax.jit(tx.update)(p, s0, p)[1]
      s4 = jax.jit(tx.update)(p, s3, p)[1]
      t = [jax.tree.map(jax.typeof, s) for s in (s0, s1, s2, s3, s4)]
      out[f'{name}/{jnp.dtype(dtype).name}'] = all(ti == t[0] for ti in t)
  return out


def int_(a):
  return np.asarray(a).astype(np.int32)


def toolbox_sharded():
  """rank_groups and prune on params sharded over an explicit mesh axis
  (filters, rows, columns, input channels) give what they give on one
  device, and prune's masks and params keep the params' sharding."""
  mesh = jax.make_mesh((8,), ('x',), axis_types=(AxisType.Explicit,))
  key = jax.random.split(jax.random.key(3), 2)
  whole = {
    'conv': {'kernel': jax.random.normal(key[0], (3, 3, 8, 16))},
    'dense': {'kernel': jax.random.normal(key[1], (16, 8))},
  }
  record = dl.magnitude_record(whole)
  want = {
    scope: (
      dl.rank_groups(whole, record, scope=scope),
      dl.prune(whole, record, 0.5, scope=scope),
    )
    for scope in ('layer', 'global')
  }
  out = {}
  with jax.set_mesh(mesh):
    for name, conv, dense in (
      ('filters_rows', P(None, None, None, 'x'), P('x', None)),
      ('inputs_columns', P(None, None, 'x', None), P(None, 'x')),
    ):
      p = {
        'conv': {'kernel': jax.sharding.reshard(whole['conv']['kernel'], conv)},
        'dense': {
          'kernel': jax.sharding.reshard(whole['dense']['kernel'], dense)
        },
      }
      rec = dl.magnitude_record(p)
      for scope, (ranks, (pruned, masks)) in want.items():
        try:
          got_ranks = dl.rank_groups(p, rec, scope=scope)
          got_pruned, got_masks = dl.prune(p, rec, 0.5, scope=scope)
        except Exception as e:  # reported, so that the other cases still run
          out[f'{name}/{scope}'] = {'error': str(e)[:500]}
          continue
        out[f'{name}/{scope}'] = {
          'same': max_diff(got_ranks, ranks) == 0
          and max_diff(got_pruned, pruned) == 0
          and max_diff(*(jax.tree.map(int_, m) for m in (got_masks, masks)))
          == 0,
          'keep_sharding': same_sharding(got_pruned, p)
          and same_sharding(got_masks, p),
        }
  return out


def toolbox_outside_mesh():
  """Outside ``jax.set_mesh``, arrays sharded in their types still carry
  their mesh: prune gives what it gives on one device, and prune and
  reinit_unselected (same-shaped edits) keep the params' and the state's
  sharding."""
  mesh = jax.make_mesh((8,), ('x',), axis_types=(AxisType.Explicit,))
  key = jax.random.split(jax.random.key(4), 2)
  whole = {
    'conv': {
      'kernel': jax.random.normal(key[0], (3, 3, 4, 16)),
      'bias': jnp.zeros(16),
    },
    'dense': {'kernel': jax.random.normal(key[1], (16, 8))},
  }
  specs = {
    'conv': {'kernel': P(None, None, None, 'x'), 'bias': P('x')},
    'dense': {'kernel': P('x', None)},
  }
  p = jax.tree.map(
    lambda a, s: jax.device_put(a, NamedSharding(mesh, s)), whole, specs
  )
  record = dl.magnitude_record(whole)
  out = {}
  try:
    pruned, masks = dl.prune(p, dl.magnitude_record(p), 0.5)
    want, _ = dl.prune(whole, record, 0.5)
    out['prune'] = {
      'same': max_diff(pruned, want) == 0,
      'keep_sharding': same_sharding(pruned, p) and same_sharding(masks, p),
    }
  except Exception as e:  # reported, so that the other cases still run
    out['prune'] = {'error': str(e)[:500]}
  tx = dl.track_selection(dl.dessilbi(0.1, nu=1.0))
  state = tx.init(p)
  keep = {'conv': np.arange(16) % 2 == 0}
  new, new_state = dl.reinit_unselected(
    jax.random.key(5), p, state, ['conv'], keep=keep
  )
  z = optax.tree.get(new_state, 'z')
  before = optax.tree.get(state, 'first_step')['conv']['kernel']
  after = optax.tree.get(new_state, 'first_step')['conv']['kernel']
  out['reinit'] = {
    'keep_sharding': same_sharding(new, p)
    and same_sharding(optax.tree.get(new_state, 'trace'), p)
    and same_sharding(z['conv']['kernel'], p['conv']['kernel'])
    and same_sharding(after, before),
  }
  out['set_nnx_opt_state'] = nnx_state_placed()
  return out


def nnx_state_placed():
  """set_nnx_opt_state writes a state on one device (as slim or widen
  return it) where the optimizer keeps its own: sharded as the model."""
  from flax import nnx

  mesh = jax.make_mesh((8,), ('x',), axis_types=(AxisType.Auto,))

  def model(width):
    m = nnx.Linear(4, width, rngs=nnx.Rngs(0))
    state = jax.tree.map(
      lambda a: put(a, mesh, P(*[None] * (a.ndim - 1), 'x')), nnx.state(m)
    )
    nnx.update(m, state)
    return m

  tx = dl.track_selection(dl.dessilbi(0.1, nu=1.0))
  optimizer = nnx.Optimizer(model(8), tx, wrt=nnx.Param)
  held = _trees.pure(optimizer.opt_state)  # nnx.as_pure from Flax 0.12.7
  given = jax.tree.map(jnp.asarray, jax.device_get(held))
  dl.set_nnx_opt_state(optimizer, given)
  return same_sharding(_trees.pure(optimizer.opt_state), held)


def conv_sharded(tree, mesh, spec):
  """``tree`` on ``mesh``: the conv kernels as ``spec``, the rest replicated."""
  return jax.tree.map(
    lambda a: put(a, mesh, spec if a.ndim == 4 else P()), tree
  )


def fused():
  """fused_dessilbi on 8 devices: its kernels (Pallas interpret mode) and
  its choice of path, against its XLA step on one device (3 steps with
  fixed gradients)."""
  params, x, y = problem()
  grads = jax.grad(loss)(params, x, y)
  kwargs = dict(learning_rate=0.05, nu=0.05, weight_decay=1e-3)

  def steps(implementation, p, g):
    tx = dl.fused_dessilbi(**kwargs, implementation=implementation)
    state, step = tx.init(p), jax.jit(tx.step)
    for _ in range(3):
      p, state = step(g, state, p)
    return p, state

  def on_a_gpu(p, g):
    """The primitives the default (None) would run on a GPU: traced only,
    as the kernels' Triton compile needs a GPU."""
    tx = dl.fused_dessilbi(**kwargs)
    with mock.patch.object(dl.fused, '_gpu_backend', return_value=True):
      jaxpr = jax.make_jaxpr(tx.step)(g, tx.init(p), p)
    text = str(jaxpr)
    return {'kernels': 'pallas_call' in text, 'shard_map': 'shard_map' in text}

  want = steps('xla', params, grads)
  filters = P(None, None, None, 'model')
  out, shards = {}, {}
  for name, kind, spec, implementation in (
    # XLA partitions around the kernels (in interpret mode here).
    ('filters/Auto', AxisType.Auto, filters, 'pallas'),
    # Data parallel with sharding in types: the kernels under shard_map.
    ('replicated/Explicit', AxisType.Explicit, P(), 'pallas'),
    # Filters sharded in their types: XLA's step (the default's choice).
    ('filters/Explicit', AxisType.Explicit, filters, None),
  ):
    mesh = jax.make_mesh((8,), ('model',), axis_types=(kind,))
    with jax.set_mesh(mesh):
      shard = shards[name] = conv_sharded((params, grads), mesh, spec)
      case = {'gpu': on_a_gpu(*shard)}
      got = steps(implementation, *shard)
      case['diff'] = max_diff(got, want)
      case['params_keep_sharding'] = same_sharding(got[0], shard[0])
      case['pallas'] = 'ran' if implementation == 'pallas' else None
      if case['pallas'] is None:
        try:
          steps('pallas', *shard)
          case['pallas'] = 'ran'
        except ValueError as e:
          case['pallas'] = str(e)
    out[name] = case
  # Outside the mesh, arrays still carry their sharding in their types: the
  # replicated ones go to the kernels under shard_map on the mesh of their
  # types, the sharded ones are refused.
  shard = shards['replicated/Explicit']
  got = steps('pallas', *shard)
  out['replicated/Explicit/outside'] = {
    'gpu': on_a_gpu(*shard),
    'diff': max_diff(got, want),
    'params_keep_sharding': same_sharding(got[0], shard[0]),
  }
  try:
    steps('pallas', *shards['filters/Explicit'])
    out['filters/Explicit/outside'] = 'ran'
  except ValueError as e:
    out['filters/Explicit/outside'] = str(e)
  return out


def main():
  assert jax.device_count() == 8, jax.devices()
  out = trajectories()
  out['types_stable'] = types_stable()
  out['fused'] = fused()
  out['toolbox'] = toolbox_sharded()
  out['outside_mesh'] = toolbox_outside_mesh()
  json.dump(out, sys.stdout)


if __name__ == '__main__':
  main()
