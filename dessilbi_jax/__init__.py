"""DessiLBI for JAX: sparse structure paths as Optax transformations."""

from dessilbi_jax.alias import dessilbi, matrix_mask
from dessilbi_jax.flops import flops, param_count
from dessilbi_jax.fused import FusedDessilbi, fused_dessilbi
from dessilbi_jax.path import (
  LayerSummary,
  PathSummary,
  get_gamma,
  get_penalty,
  path_summary,
  residue,
  support,
  w_star,
)
from dessilbi_jax.penalties import (
  GroupLasso,
  Lasso,
  Penalty,
  PenaltyRule,
  PenaltyTable,
  default_penalty,
  path_str,
  penalty_rule,
)
from dessilbi_jax.pruning import prune
from dessilbi_jax.selection import (
  NOT_SELECTED,
  REFERENCE_NEVER,
  ReferenceOrder,
  SelectionState,
  init_selection,
  magnitude_record,
  rank_groups,
  reference_prune_order,
  track_selection,
  update_selection,
)
from dessilbi_jax.shrinkage import group_shrink, prox, soft_threshold
from dessilbi_jax.surgery import (
  Surgery,
  orthogonal_filters,
  reinit_unselected,
  set_nnx_opt_state,
  slim,
  widen,
)
from dessilbi_jax.topology import Link, chain_spec, check_spec, default_norm
from dessilbi_jax.transform import (
  DessiLBIState,
  expand_gamma,
  resolve_penalties,
  scale_by_dessilbi,
)

__version__ = '0.1.0'

__all__ = [
  'NOT_SELECTED',
  'REFERENCE_NEVER',
  'DessiLBIState',
  'FusedDessilbi',
  'GroupLasso',
  'Lasso',
  'LayerSummary',
  'Link',
  'PathSummary',
  'Penalty',
  'PenaltyRule',
  'PenaltyTable',
  'ReferenceOrder',
  'SelectionState',
  'Surgery',
  'chain_spec',
  'check_spec',
  'default_norm',
  'default_penalty',
  'dessilbi',
  'expand_gamma',
  'flops',
  'fused_dessilbi',
  'get_gamma',
  'get_penalty',
  'group_shrink',
  'init_selection',
  'magnitude_record',
  'matrix_mask',
  'orthogonal_filters',
  'param_count',
  'path_str',
  'path_summary',
  'penalty_rule',
  'prox',
  'prune',
  'rank_groups',
  'reference_prune_order',
  'reinit_unselected',
  'residue',
  'resolve_penalties',
  'scale_by_dessilbi',
  'set_nnx_opt_state',
  'slim',
  'soft_threshold',
  'support',
  'track_selection',
  'update_selection',
  'w_star',
  'widen',
]
