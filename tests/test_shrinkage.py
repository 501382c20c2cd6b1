"""Shrinkage kernels: NumPy reference, properties, exactness at zero."""

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import dessilbi_jax as dl
from dessilbi_jax.shrinkage import group_factor


def np_soft(z, lam):
  return np.sign(z) * np.maximum(np.abs(z) - lam, 0)


def np_group(z, lam, reduce_axes):
  norm = np.sqrt(np.sum(z * z, axis=reduce_axes, keepdims=True))
  with np.errstate(divide='ignore', invalid='ignore'):
    factor = np.where(norm > lam, 1 - lam / norm, 0.0)
  return z * factor


# XLA on the CPU flushes subnormal results to zero; tiny inputs become 0 so that
# no shrunk value lands in the subnormal range.
floats = st.floats(-10, 10, allow_nan=False).map(
  lambda x: x if abs(x) > 1e-100 else 0.0
)
lams = st.floats(0, 5, allow_nan=False)
arrays = hnp.arrays(
  np.float64, hnp.array_shapes(min_dims=1, max_dims=4), elements=floats
)


@pytest.fixture(autouse=True)
def _x64(x64):
  del x64


def test_soft_threshold_matches_numpy():
  z = np.random.default_rng(0).normal(size=(7, 5)) * 2
  for lam in (0.0, 0.5, 1.0, 3.0):
    np.testing.assert_allclose(
      dl.soft_threshold(z, lam), np_soft(z, lam), rtol=1e-14
    )


@pytest.mark.parametrize('reduce_axes', [(0, 1, 2), (0,), (1, 3), ()])
def test_group_shrink_matches_numpy(reduce_axes):
  z = np.random.default_rng(1).normal(size=(3, 3, 4, 6))
  z[..., 2] = 0  # a zero group (for reduce_axes that span axis 3 it is partial)
  for lam in (0.0, 0.7, 2.0, 5.0):
    got = dl.group_shrink(z, lam, reduce_axes=reduce_axes)
    np.testing.assert_allclose(
      got, np_group(z, lam, reduce_axes), rtol=1e-13, atol=1e-15
    )


def test_prox_dispatches_on_penalty_and_scales_threshold():
  z = np.random.default_rng(2).normal(size=(3, 3, 2, 4))
  z[..., 0] *= 0.1  # a group below the scaled threshold
  np.testing.assert_array_equal(
    dl.prox(z, dl.Lasso(0.3)), dl.soft_threshold(z, 0.3)
  )
  penalty = dl.GroupLasso(axes=-1, lam=0.2, scale_by_size=True)
  want = np_group(z, 0.2 * np.sqrt(3 * 3 * 2), (0, 1, 2))
  np.testing.assert_allclose(dl.prox(z, penalty), want, rtol=1e-13)
  assert np.any(want != 0) and np.any(want == 0)


@settings(max_examples=200, deadline=None)
@given(arrays, lams)
def test_soft_threshold_support_and_non_expansive(z, lam):
  out = np.asarray(dl.soft_threshold(z, lam))
  np.testing.assert_array_equal(out != 0, np.abs(z) > lam)
  # Shrinks toward zero, never flips sign.
  assert np.all(np.abs(out) <= np.abs(z)) and np.all(out * z >= 0)


@settings(max_examples=200, deadline=None)
@given(st.data(), lams)
def test_group_shrink_properties(data, lam):
  z = data.draw(arrays)
  w = data.draw(hnp.arrays(np.float64, z.shape, elements=floats))
  ndim = z.ndim
  keep = data.draw(st.sets(st.integers(0, ndim - 1), max_size=ndim))
  reduce_axes = tuple(a for a in range(ndim) if a not in keep)
  norm = np.sqrt(np.sum(z * z, axis=reduce_axes, keepdims=True))
  assume(np.all(np.abs(norm - lam) > 1e-9))  # away from the rounding boundary

  pz = np.asarray(dl.group_shrink(z, lam, reduce_axes=reduce_axes))
  pw = np.asarray(dl.group_shrink(w, lam, reduce_axes=reduce_axes))
  # Support is exactly {‖z_g‖ > λ}, whole groups at a time.
  selected = np.broadcast_to(norm > lam, z.shape)
  np.testing.assert_array_equal(pz != 0, selected & (z != 0))
  assert np.all(pz[~selected] == 0)
  # Non-expansive: ‖prox(z) - prox(w)‖ <= ‖z - w‖.
  assert np.linalg.norm(pz - pw) <= np.linalg.norm(z - w) * (1 + 1e-12) + 1e-12
  # Zero groups stay exactly zero.
  zero = np.array(z)
  zero[...] = 0
  assert np.all(
    np.asarray(dl.group_shrink(zero, lam, reduce_axes=reduce_axes)) == 0
  )


@pytest.mark.parametrize(
  'dtype', [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64]
)
def test_exact_zero_values_and_gradients(dtype):
  z = jnp.zeros((3, 3, 2, 4), dtype).at[..., 1].set(2.0)
  for fn in (
    lambda x: dl.group_shrink(x, 1.0, reduce_axes=(0, 1, 2)),
    lambda x: dl.group_shrink(x, 0.0, reduce_axes=(0, 1, 2)),
    lambda x: dl.soft_threshold(x, 1.0),
  ):
    out = fn(z)
    assert out.dtype == dtype
    assert bool(jnp.all(out[..., 0] == 0))
    grad = jax.grad(
      lambda x, fn=fn: jnp.sum(
        fn(x).astype(jnp.float32) ** 2 + fn(x).astype(jnp.float32)
      )
    )(z)
    assert bool(jnp.all(jnp.isfinite(grad))), grad
  # λ = 0 and an all-zero input: still exact, still finite.
  g = jax.grad(lambda x: jnp.sum(dl.group_shrink(x, 0.0, reduce_axes=(0,))))(
    jnp.zeros((4, 2), dtype)
  )
  assert bool(jnp.all(jnp.isfinite(g)))


def test_reduce_axes_may_be_a_list_and_lam_a_numpy_scalar():
  z = np.random.default_rng(3).normal(size=(4, 3))
  np.testing.assert_array_equal(
    dl.group_shrink(z, 0.5, reduce_axes=[0]),
    dl.group_shrink(z, 0.5, reduce_axes=(0,)),
  )
  assert dl.Lasso(np.float32(0.25)).lam == 0.25
  assert dl.GroupLasso(lam=np.float64(2.0)).lam == 2.0


def test_integer_z_is_refused_instead_of_truncating_lam():
  zi = jnp.array([3, -1, 0])
  with pytest.raises(TypeError, match=r'z must be a floating-point.*int'):
    dl.soft_threshold(zi, 0.5)
  with pytest.raises(TypeError, match=r'z must be a floating-point.*int'):
    dl.group_shrink(zi[None], 0.5, reduce_axes=(1,))
  with pytest.raises(TypeError, match=r'z must be a floating-point.*bool'):
    dl.prox(jnp.array([True, False]), dl.Lasso(0.5))
  # Cast, the threshold is applied as given.
  np.testing.assert_allclose(
    dl.soft_threshold(zi.astype(jnp.float32), 0.5), [2.5, -0.5, 0.0]
  )


@pytest.mark.parametrize('lam', [-1.0, float('nan'), float('inf'), -1])
def test_a_concrete_negative_or_non_finite_lam_is_refused(lam):
  z = jnp.array([[3.0, -1.0, 0.0]])
  with pytest.raises(ValueError, match=r'lam must be a finite number >= 0'):
    dl.soft_threshold(z, lam)
  with pytest.raises(ValueError, match=r'lam must be a finite number >= 0'):
    dl.group_shrink(z, jnp.asarray(lam), reduce_axes=(1,))
  # Closed over by a jitted function, λ is still concrete: refused too.
  with pytest.raises(ValueError, match=r'lam must be a finite number >= 0'):
    jax.jit(lambda z: dl.soft_threshold(z, lam))(z)
  with pytest.raises(ValueError, match=r'lam must be finite and >= 0 every'):
    dl.group_shrink(z, np.array([[1.0], [lam]]), reduce_axes=(1,))


def test_a_penalty_reads_a_concrete_scalar_array_as_its_lam():
  # Penalties are static (hashed into the compiled step): a concrete scalar
  # array is read as its number, a traced one is refused, saying why.
  assert dl.Lasso(jnp.array(0.5)) == dl.Lasso(0.5)
  assert hash(dl.GroupLasso(lam=np.float32(0.25))) == hash(
    dl.GroupLasso(lam=0.25)
  )
  with pytest.raises(ValueError, match='lam must be a finite number >= 0'):
    dl.Lasso(jnp.array(-1.0))
  with pytest.raises(TypeError, match=r'lam must be a real number.*Array'):
    dl.Lasso(jnp.array([0.5]))
  with pytest.raises(TypeError, match=r'lam must be a real number.*bool'):
    dl.Lasso(jnp.array(True))
  with pytest.raises(TypeError, match='lam must be concrete'):
    jax.jit(lambda lam: dl.Lasso(lam).lam)(0.5)


def test_traced_lam_is_not_checked_and_gradients_flow():
  z = jnp.array([3.0, -1.0, 0.0])
  # Under jit λ is traced: no check, the kernel computes as before.
  np.testing.assert_allclose(
    jax.jit(dl.soft_threshold)(z, -1.0), [4.0, -2.0, 0.0]
  )
  g = jax.grad(lambda lam: jnp.sum(dl.soft_threshold(z, lam)))(0.5)
  assert float(g) == 0.0  # d/dλ of (3 - λ) - (1 - λ)
  g = jax.grad(
    lambda lam: jnp.sum(dl.group_shrink(z[None], lam, reduce_axes=1))
  )(0.5)
  np.testing.assert_allclose(g, -2 / np.sqrt(10))  # d/dλ of 2 (1 - λ/√10)


def test_prox_refuses_what_is_not_a_penalty():
  z = jnp.ones((2, 3))
  with pytest.raises(TypeError, match=r'penalty must be a Lasso or a Group'):
    dl.prox(z, None)
  with pytest.raises(TypeError, match=r'penalty must.*rule\(path, leaf\)'):
    dl.prox(z, dl.default_penalty)


def test_reduce_axes_may_be_a_single_int():
  z = np.random.default_rng(4).normal(size=(4, 3))
  for axis in (1, np.int64(1), -1):
    np.testing.assert_array_equal(
      dl.group_shrink(z, 0.5, reduce_axes=axis),
      dl.group_shrink(z, 0.5, reduce_axes=(1,)),
    )
  np.testing.assert_allclose(
    dl.group_shrink(z, 0.5, reduce_axes=0), np_group(z, 0.5, (0,)), rtol=1e-13
  )


def test_a_bfloat16_lam_is_a_real_number():
  z = jnp.ones((2, 4), jnp.bfloat16)
  lam = jnp.full((1, 4), 0.5, jnp.bfloat16)
  out = dl.group_shrink(z, lam, (0,))
  assert out.dtype == jnp.bfloat16 and bool(jnp.all(out > 0))
  dl.soft_threshold(z, jnp.bfloat16(0.5))


def test_lam_per_group_is_one_per_group_or_refused():
  # Rows are groups (norms 5 and 0.5). One λ per group in the groups' shape
  # (2, 1) shrinks each row by its own λ; λ of shape (2,) used to broadcast
  # against the (2, 1) norms into a (2, 2) factor, mixing two thresholds in
  # one group (or failing deep in jit where z is not square).
  z = jnp.array([[3.0, 4.0], [0.3, 0.4]])
  per_row = jnp.array([[1.0], [0.1]])
  np.testing.assert_allclose(
    dl.group_shrink(z, per_row, reduce_axes=1),
    [[2.4, 3.2], [0.24, 0.32]],
    rtol=1e-6,
  )
  for bad, x in ((jnp.array([1.0, 0.1]), z), (jnp.ones(2), jnp.ones((2, 3)))):
    for fn in (dl.group_shrink, group_factor):
      with pytest.raises(ValueError, match=r'lam: shape \(2,\) .* \(2, 1\)'):
        fn(x, bad, reduce_axes=1)
  with pytest.raises(ValueError, match=r"lam: shape \(2, 1\) .*z's shape"):
    dl.soft_threshold(jnp.array([1.0, -2.0, 3.0]), jnp.array([[0.5], [2.5]]))
  np.testing.assert_allclose(
    dl.soft_threshold(jnp.array([1.0, -2.0, 3.0]), jnp.array([0.5, 2.5, 1.0])),
    [0.5, 0.0, 2.0],
  )


@pytest.mark.parametrize(
  'axes, error', [(None, TypeError), (5, ValueError), ((0, True), TypeError)]
)
def test_reduce_axes_are_checked(axes, error):
  with pytest.raises(error, match='reduce_axes'):
    dl.group_shrink(jnp.ones((2, 2)), 1.0, reduce_axes=axes)
