"""fractrain-jax: FracTrain (NeurIPS 2020) low-precision training in JAX/Flax NNX."""

__version__ = "0.1.0"
