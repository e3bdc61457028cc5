"""Phase 1: the variational filter (paper section 3.6) and the belief filter it hands to phase 2."""

from lightning_modules.filter.belief_filter import BeliefFilter
from lightning_modules.filter.module import VariationalFilterModule

__all__ = ["BeliefFilter", "VariationalFilterModule"]
