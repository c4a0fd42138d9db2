"""star_jax: STAR loss facial landmark detection in JAX / Flax NNX."""

from star_jax import cpu_tuning as _cpu_tuning

# Before JAX starts its CPU backend: XLA:CPU flags measured to be faster (see star_jax/cpu_tuning.py).
_cpu_tuning.apply_xla_flags()

__version__ = '0.1.0'
