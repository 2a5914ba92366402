"""tops_jax: visual-token selection for multimodal LLMs as pure JAX functions (scores in, kept indices out).

Modules: `prune` (the public `select` / `select_order` / `merge` API and the method registry), `similarity`,
`relevance` (attention-row relevance signals), `greedy` (shared engine pieces), one module per method family.
"""

from tops_jax import greedy
from tops_jax import prune
from tops_jax import relevance
from tops_jax import similarity

__all__ = ["greedy", "prune", "relevance", "similarity"]
