"""pat: low-cost deep ensembles by pruning.

Train one parent, split it into differently pruned children, tune each briefly, and
average their softmax. The names below are the public API; everything else may change.
"""

__version__ = "0.1.0"

from pat.errors import PatError as PatError

__all__ = ["__version__", "PatError"]
