"""Evaluation: running a model over a test split and scoring it (`scoring`), the trainer's evaluation
pass (`evaluator`), the report beside the published numbers (`report`), the CED plot (`plots`),
temporal stability on video (`temporal`) and the reproduction table (`reproduce`). The command is
`star_jax.evaluate`."""
