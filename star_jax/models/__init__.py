"""The STAR network (StackedHGNetV1) in Flax NNX: `create_model(config, rngs)`, `preprocess`."""

from star_jax.models.stacked_hg import StackedHGNet, create_model, preprocess

__all__ = ['StackedHGNet', 'create_model', 'preprocess']
