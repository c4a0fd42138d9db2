"""TFDS builders of star_jax, importable as `star_jax_datasets.<name>`."""
