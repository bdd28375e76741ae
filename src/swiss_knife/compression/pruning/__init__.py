"""Pruning: unstructured and N:M (magnitude, Wanda, SparseGPT) and structured (heads, channels)."""

from .api import prune
from .base import PruneContext, PruneOutcome, method_names

__all__ = ["PruneContext", "PruneOutcome", "method_names", "prune"]
