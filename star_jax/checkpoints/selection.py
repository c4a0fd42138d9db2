"""Which checkpoint and which weights: the official model selection, stated once.

The rule (the official trainer's): each evaluation scores the weights and their EMA; the evaluation's
score is the lower of the two NMEs and its winner the weights that scored it, the weights winning a
tie (`select_weights`). The trainer saves, with each evaluated step's Orbax metrics, 'nme' (that
score), 'best_weights' (the winner), 'selection' ('official') and 'step'. The best checkpoint is the
evaluated step with the lowest 'nme', the earliest on a tie (the official trainer replaces its best
only on a strictly lower NME), read with its winning weights: the official trainer keeps that network
as `best_model.pkl`, whose `net` its tester evaluates (`best_of`, `best_checkpoint`).

What a reader gets by default (`choose_step`, `choose_weights`): step 'best' is the best checkpoint;
a checkpoint without a training history (converted from the official release: one step, no
evaluation) is read as its latest step. A training workdir none of whose steps records an
evaluation has no best: asking for it is a `NoEvaluationError` that says to choose a step. The
weights default to the ones that won the chosen step's evaluation ('best' or a step number), else,
for 'latest' and for a step without an evaluation, to the EMA when the step has one.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import orbax.checkpoint as ocp

from star_jax.checkpoints import format as format_lib

RULE = 'official'
# The item only the trainer writes (with 'opt_state' and 'data_iter'): a step that has it was trained here.
TRAINER_ITEM = 'meta'


class NoEvaluationError(format_lib.CheckpointError):
  """The best checkpoint was asked of a training workdir whose steps record no evaluation."""


def select_weights(scores: dict) -> tuple[float, str]:
  """(score, weights) of one evaluation: `scores` holds 'model/nme' and, with an EMA, 'ema/nme'.

  The lower of the two NMEs and whose it is; the weights win a tie, as in the official trainer,
  which scores `net` before `net_ema` and replaces its best only on a strictly lower NME.
  """
  if 'ema/nme' in scores and float(scores['ema/nme']) < float(scores['model/nme']):
    return float(scores['ema/nme']), 'ema'
  return float(scores['model/nme']), 'model'


@dataclasses.dataclass(frozen=True)
class Best:
  """The best checkpoint of a training run by the model selection rule.

  step: its step. weights: 'model' or 'ema', the weights that scored `nme` there. nme: the score.
  rule: 'official' (the better of weights and EMA at each evaluation).
  """
  step: int
  weights: str
  nme: float
  rule: str = RULE


def step_score(metrics) -> tuple[float, str] | None:
  """(nme, winning weights) of a step's saved evaluation; None when the step records none."""
  if not isinstance(metrics, dict) or not isinstance(metrics.get('nme'), (int, float)):
    return None
  if metrics.get('best_weights') not in format_lib.WEIGHTS:
    return None
  return float(metrics['nme']), metrics['best_weights']


def _metrics(manager: ocp.CheckpointManager, step: int):
  try:
    return manager.metrics(step)
  except Exception:  # pylint: disable=broad-except  (unreadable metrics: as a step without an evaluation)
    return None


def best_of(manager: ocp.CheckpointManager) -> Best | None:
  """The best step of the manager's directory (module docstring); None when no step is evaluated."""
  best = None
  for step in sorted(manager.all_steps()):
    score = step_score(_metrics(manager, step))
    # Strictly lower: the earliest step wins a tie, as the official trainer's `best_metric > cur_metric`.
    if score is not None and np.isfinite(score[0]) and (best is None or score[0] < best.nme):
      best = Best(step=int(step), weights=score[1], nme=score[0])
  return best


def best_checkpoint(path) -> Best | None:
  """The best step of a checkpoint directory or training workdir and its winning weights (see the
  module docstring); None when no kept step holds an evaluation (a converted checkpoint, a run that
  never evaluated)."""
  directory = format_lib.resolve_checkpoint_dir(path).absolute()
  if not directory.is_dir():
    return None
  with format_lib.reader(directory, create=False) as manager:
    return best_of(manager)


def parse_step(value) -> int | str | None:
  """A --step value: None, 'best', 'latest' or a step number (int or digits); ValueError otherwise."""
  if value is None or isinstance(value, int):
    return value
  text = str(value).strip().lower()
  if text in ('best', 'latest'):
    return text
  if text.isdigit():
    return int(text)
  raise ValueError(f"step must be 'best', 'latest' or a step number, got {value!r}")


@dataclasses.dataclass
class Choice:
  """The step a reader reads, whether its evaluation decides the weights ('best', 'step' or None),
  and how it was chosen, in words."""
  step: int
  by_evaluation: str | None
  chosen_by: list[str]


def choose_step(manager: ocp.CheckpointManager, step: int | str | None, best: Best | None) -> Choice:
  """The step to read for `step` (None, 'latest', 'best' or a number; see the module docstring).

  Raises FileNotFoundError for a step number the directory does not have, NoEvaluationError for
  'best' in a training workdir without an evaluation.
  """
  directory = pathlib.Path(manager.directory)
  steps = sorted(manager.all_steps())
  if step == 'best' and best is not None:
    return Choice(best.step, 'best', [f'the best checkpoint by the {best.rule} model selection (NME {best.nme:.6g})'])
  if step == 'best' and any(format_lib.has_item(directory, s, TRAINER_ITEM) for s in steps):
    raise NoEvaluationError(
        f'{directory}: none of its steps {steps} records an evaluation, so it has no best checkpoint (the run '
        'stopped before its first evaluation, or an earlier star_jax wrote it without its evaluations). '
        "Choose a step: --step latest or --step N, with --weights model or ema (step='latest' in Python)")
  if step in (None, 'latest', 'best'):
    why = ' (no step holds an evaluation to rank by)' if step == 'best' else ''
    return Choice(int(manager.latest_step()), None, [f'the latest step{why}'])
  if step not in steps:
    raise FileNotFoundError(f'{directory} has no step {step}; it has {steps}')
  return Choice(int(step), 'step', [f'step {step} as asked'])


def choose_weights(manager: ocp.CheckpointManager, choice: Choice, present: set[str],
                   weights: str | None) -> str:
  """The weights to read of `choice.step`, whose items include `present` ('model', 'ema'); adds the
  reason to `choice.chosen_by`. Raises FileNotFoundError for weights the step does not have."""
  if weights is not None:
    if weights not in present:
      raise FileNotFoundError(f'{manager.directory} step {choice.step} has no {weights!r} weights (it has '
                              f'{sorted(present)})')
    choice.chosen_by.append(f'the {weights!r} weights as asked')
    return weights
  score = step_score(_metrics(manager, choice.step)) if choice.by_evaluation else None
  if score is not None and score[1] in present:
    choice.chosen_by.append('with the weights that won there' if choice.by_evaluation == 'best' else
                            f'the weights that won its evaluation ({RULE} rule)')
    return score[1]
  weights = 'ema' if 'ema' in present else 'model'
  choice.chosen_by.append('its EMA weights' if weights == 'ema' else 'its only weights')
  return weights
