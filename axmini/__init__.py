"""axmini: define and train large transformer models in JAX/Flax from strictly encapsulated configs."""

__version__ = "0.1.0"
