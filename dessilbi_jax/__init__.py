"""DessiLBI for JAX: sparse structure paths as Optax transformations."""

from dessilbi_jax.alias import dessilbi, matrix_mask
from dessilbi_jax.penalties import (
  GroupLasso,
  Lasso,
  Penalty,
  PenaltyRule,
  default_penalty,
  path_str,
  penalty_rule,
)
from dessilbi_jax.shrinkage import group_shrink, prox, soft_threshold
from dessilbi_jax.transform import (
  DessiLBIState,
  resolve_penalties,
  scale_by_dessilbi,
)

__version__ = '0.1.0'

__all__ = [
  'DessiLBIState',
  'GroupLasso',
  'Lasso',
  'Penalty',
  'PenaltyRule',
  'default_penalty',
  'dessilbi',
  'group_shrink',
  'matrix_mask',
  'path_str',
  'penalty_rule',
  'prox',
  'resolve_penalties',
  'scale_by_dessilbi',
  'soft_threshold',
]
