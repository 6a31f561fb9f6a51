"""jaxsearch: search agents trained with RL, and retrieval learned end to end, in JAX.

The light, dependency-free parts are imported here (and register their entries in the
library's registries); models, retrieval, rollout and training are imported from their
subpackages.
"""
from jaxsearch import losses, registry, rewards, types

__version__ = "0.1.0"
__all__ = ["losses", "registry", "rewards", "types"]
