"""Evaluation: running a model over a test split and scoring it (`scoring`), the report beside the
published numbers (`report`), and the CED plot (`plots`). The command is `star_jax.evaluate`."""
