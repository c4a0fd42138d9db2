"""star_jax: STAR loss facial landmark detection in JAX / Flax NNX."""

__version__ = '0.1.0'
