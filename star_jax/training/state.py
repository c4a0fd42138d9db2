"""The training state and how it is made: the model's split state, Adam with the official step-decay
schedule, and the EMA of weights and BatchNorm statistics.

The model is an NNX module; training works on its split state (`nnx.split`) so that `jax.jit` sees
plain pytrees, the state can be donated, and Orbax saves it as it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from flax import struct

from star_jax import models


@struct.dataclass
class TrainState:
  """Everything that changes during training. Shapes follow the model's nnx state."""
  step: jax.Array            # () int32, optimizer steps taken
  params: Any                # nnx.State of nnx.Param
  batch_stats: Any           # nnx.State of nnx.BatchStat (running mean / var)
  opt_state: Any             # optax state
  ema_params: Any            # EMA of params (None when config.ema is off)
  ema_batch_stats: Any       # EMA of the BatchNorm statistics, as the official accumulate_net does


@dataclasses.dataclass(frozen=True)
class Graphs:
  """Static halves of the model: one graph in train mode (batch statistics), one in eval mode."""
  train: Any
  eval: Any


def steps_per_epoch(config: ml_collections.ConfigDict, num_examples: int) -> int:
  """Training steps (global batches) in one epoch of `num_examples` records. The last partial batch
  is not dropped: the shuffled stream simply continues into the next epoch."""
  return max(1, num_examples // int(config.batch_size))


def total_steps(config: ml_collections.ConfigDict, steps_per_epoch_: int) -> int:
  """config.total_steps when set, else config.num_epochs epochs."""
  return int(config.total_steps) or int(config.num_epochs) * steps_per_epoch_


def ema_decay(config: ml_collections.ConfigDict) -> float:
  """The official EMA decay 0.5 ** (global_batch / 10000), unless config.ema_decay >= 0."""
  if config.ema_decay >= 0:
    return float(config.ema_decay)
  return 0.5 ** (config.batch_size / 10000.0)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch_: int) -> optax.Schedule:
  """Step decay: lr x gamma at each milestone (PyTorch MultiStepLR, stepped once per epoch), given in
  epochs, or in steps when config.milestone_unit is 'step' (short runs)."""
  unit = config.get('milestone_unit', 'epoch')
  if unit not in ('epoch', 'step'):
    raise ValueError(f"config.milestone_unit must be 'epoch' or 'step', got {unit!r}")
  per = steps_per_epoch_ if unit == 'epoch' else 1
  boundaries = {int(m) * per: config.gamma for m in config.milestones}
  return optax.piecewise_constant_schedule(config.lr, boundaries)


def make_optimizer(config: ml_collections.ConfigDict, steps_per_epoch_: int) -> optax.GradientTransformation:
  """Adam as the official code builds it (no weight decay reaches the optimizer there, see configs/base.py)."""
  schedule = learning_rate_schedule(config, steps_per_epoch_)
  tx = optax.adam(schedule, b1=config.b1, b2=config.b2)
  if config.weight_decay > 0:
    # PyTorch Adam's weight_decay is an L2 term added to the gradient (not AdamW's decoupled decay).
    tx = optax.chain(optax.add_decayed_weights(config.weight_decay), tx)
  return tx


def create_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                       rng_seed: int) -> tuple[Graphs, TrainState]:
  """Builds the model and its TrainState (on the default device; the caller places it)."""
  model = models.create_model(config, nnx.Rngs(rng_seed))
  model.train()
  train_graph, params, batch_stats = models.split(model)
  model.eval()
  eval_graph, _, _ = models.split(model)
  state = TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      batch_stats=batch_stats,
      opt_state=tx.init(params),
      ema_params=jax.tree.map(jnp.copy, params) if config.ema else None,
      ema_batch_stats=jax.tree.map(jnp.copy, batch_stats) if config.ema else None,
  )
  return Graphs(train=train_graph, eval=eval_graph), state


def eval_weights(state: TrainState) -> dict[str, tuple]:
  """The weights an evaluation scores: {'model': (params, batch_stats)} and, with an EMA, 'ema'."""
  out = {'model': (state.params, state.batch_stats)}
  if state.ema_params is not None:
    out['ema'] = (state.ema_params, state.ema_batch_stats)
  return out
