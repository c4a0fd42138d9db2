"""Experiment configs (ml_collections files with `get_config`), loaded by path: `--config configs/<name>.py`.

Installed with star_jax as the package `star_jax_configs`, so that `--config configs/<name>.py` also
works where no checkout is (see star_jax/config_lib.py).
"""
