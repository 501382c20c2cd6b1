"""Bad input: early, clear errors that name the argument."""

import jax
import jax.numpy as jnp
import optax
import pytest

import dessilbi_jax as dl

PARAMS = {
  'conv': jnp.zeros((3, 3, 2, 4)),
  'dense': jnp.zeros((4, 3)),
  'b': jnp.zeros(3),
}


@pytest.mark.parametrize(
  'kwargs, error, match',
  [
    (dict(kappa=0.0), ValueError, 'kappa'),
    (dict(kappa=-1.0), ValueError, 'kappa'),
    (dict(nu=0.0), ValueError, 'nu'),
    (dict(nu=-5.0), ValueError, 'nu'),
    (dict(nu=float('nan')), ValueError, 'nu'),
    (dict(learning_rate=-0.1), ValueError, 'learning_rate'),
    (dict(weight_decay=-1e-4), ValueError, 'weight_decay'),
    (dict(momentum=1.0), ValueError, 'momentum'),
    (dict(momentum=-0.1), ValueError, 'momentum'),
    (dict(kappa=jnp.ones(3)), TypeError, 'kappa'),
    (dict(kappa='1'), TypeError, 'kappa'),
    (dict(nesterov=1), TypeError, 'nesterov'),
    (dict(nesterov=True, momentum=None), ValueError, 'nesterov'),
    (dict(penalty=dl.Lasso()), TypeError, 'penalty'),
  ],
)
def test_hyper_parameters_are_checked_at_construction(kwargs, error, match):
  kwargs = {'learning_rate': 0.1, **kwargs}
  with pytest.raises(error, match=match):
    dl.dessilbi(**kwargs)


def test_core_checks_its_arguments_too():
  with pytest.raises(ValueError, match='kappa'):
    dl.scale_by_dessilbi(0.1, kappa=-2.0)
  with pytest.raises(ValueError, match='learning_rate'):
    dl.scale_by_dessilbi(-0.1)


@pytest.mark.parametrize(
  'make, match',
  [
    (lambda: dl.Lasso(lam=-1.0), 'lam'),
    (lambda: dl.GroupLasso(lam=-0.5), 'lam'),
    (lambda: dl.Lasso(lam=float('inf')), 'lam'),
  ],
)
def test_negative_lambda_is_rejected(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_penalty_types_are_checked():
  with pytest.raises(TypeError, match='axes'):
    dl.GroupLasso(axes=1.5)
  with pytest.raises(TypeError, match='lam'):
    dl.Lasso(lam='big')
  with pytest.raises(TypeError, match='dense'):
    dl.penalty_rule(dense='lasso')
  with pytest.raises(TypeError, match="overrides\\['head'\\]"):
    dl.penalty_rule(overrides={'head': 1.0})


def test_group_axes_that_do_not_exist_name_the_leaf():
  tx = dl.dessilbi(0.1, penalty=dl.penalty_rule(dense=dl.GroupLasso(axes=(2,))))
  with pytest.raises(ValueError, match=r"'dense'.*shape \(4, 3\).*axes"):
    tx.init(PARAMS)
  tx = dl.dessilbi(
    0.1, penalty=dl.penalty_rule(conv=dl.GroupLasso(axes=(0, -4)))
  )
  with pytest.raises(ValueError, match=r"'conv'.*repeat"):
    tx.init(PARAMS)


def test_non_floating_leaves_are_rejected_with_their_path():
  tx = dl.dessilbi(0.1)
  with pytest.raises(TypeError, match=r"'layer/steps'.*int32"):
    tx.init(
      {'layer': {'w': jnp.zeros((2, 2)), 'steps': jnp.zeros((), jnp.int32)}}
    )


def test_rule_returning_garbage_names_the_leaf():
  tx = dl.dessilbi(0.1, penalty=lambda path, leaf: 'group')
  with pytest.raises(TypeError, match="returned 'group' for leaf 'b'"):
    tx.init(PARAMS)


@pytest.mark.parametrize('make', [dl.dessilbi, dl.scale_by_dessilbi])
def test_update_without_params(make):
  tx = make(0.1)
  state = tx.init(PARAMS)
  with pytest.raises(ValueError, match='params'):
    tx.update(PARAMS, state)


def test_values_are_checked_when_concrete_and_skipped_when_traced():
  # Concrete values given through inject_hyperparams are checked at init.
  with pytest.raises(ValueError, match='nu'):
    optax.inject_hyperparams(dl.dessilbi)(learning_rate=0.1, nu=-1.0).init(
      PARAMS
    )
  # Traced values (jitted init and update) cannot be checked and pass through.
  tx = optax.inject_hyperparams(dl.dessilbi)(learning_rate=0.1, nu=5.0)
  state = jax.jit(tx.init)(PARAMS)
  updates, _ = jax.jit(tx.update)(PARAMS, state, PARAMS)
  assert jax.tree.structure(updates) == jax.tree.structure(PARAMS)
