"""star_jax: STAR loss facial landmark detection in JAX / Flax NNX.

Importing star_jax (or any of its modules) changes nothing in the process: the CPU tuning of the
command-line tools is an explicit call, `star_jax.cpu_tuning.setup_process()`.
"""

__version__ = '0.1.0'
