"""Evaluate a checkpoint on a dataset's test split: `python scripts/evaluate.py --config configs/wflw.py
--checkpoint DIR`. The same command as `python -m star_jax.evaluate` (see there for every option)."""

from star_jax import cli
from star_jax import evaluate

if __name__ == '__main__':
  cli.run(evaluate.main)
