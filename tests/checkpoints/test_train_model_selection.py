"""The official model selection end to end: a short real training run records, at each evaluation, the
better of the weights and their EMA; the best checkpoint is the argmin of those over the run; evaluate,
predict and the Python API load it by default and say so; --step / --weights override it; a workdir
whose steps record no evaluation has no best, and asking for it says to choose a step
(star_jax/checkpoints/selection.py)."""

import json
import pathlib
import shutil

import numpy as np
import pytest

from conftest import TINY_CONFIG as TINY, TRAINED_STEPS as LATEST
from star_jax import evaluate
from star_jax import checkpoints


@pytest.fixture(scope='module')
def trained(trained_tiny, tiny_tfds_dir):
  """(workdir, data dir, the train command's stdout) of the shared short run (conftest.TRAINED_RUN: 32
  training faces at batch 4, 8 steps per epoch, an evaluation every epoch, 4 in all; checkpoints only
  at evaluations and only the latest one kept besides the best)."""
  workdir, proc = trained_tiny
  return workdir, tiny_tfds_dir, proc.stdout


def _evaluations(workdir) -> dict[int, tuple[float, float]]:
  """step -> (model NME, EMA NME) from metrics.jsonl."""
  out = {}
  for line in (pathlib.Path(workdir) / 'metrics.jsonl').read_text().splitlines():
    record = json.loads(line)
    if 'eval/model/nme' in record:
      out[record['step']] = (record['eval/model/nme'], record['eval/ema/nme'])
  return out


def _expected_best(evaluations) -> tuple[int, str, float]:
  """The official rule recomputed: per evaluation the lower of the two (the network wins a tie), over
  the run the lowest (the earliest step wins a tie)."""
  best = None
  for step in sorted(evaluations):
    model, ema = evaluations[step]
    score, weights = (ema, 'ema') if ema < model else (model, 'model')
    if best is None or score < best[2]:
      best = (step, weights, score)
  return best


def _run_evaluate(workdir, data_dir, out, *extra) -> int:
  return evaluate.main(['evaluate', TINY, f'--checkpoint={workdir}', f'--config.data.data_dir={data_dir}',
                        f'--output={out}', '--noprogress', *extra])


def test_best_checkpoint_is_the_argmin_of_the_better_of_model_and_ema(trained):
  workdir, _, stdout = trained
  evaluations = _evaluations(workdir)
  assert sorted(evaluations) == [8, 16, 24, 32] and LATEST == 32
  step, weights, score = _expected_best(evaluations)
  best = checkpoints.best_checkpoint(workdir)
  assert (best.step, best.weights, best.rule) == (step, weights, 'official')
  assert best.nme == pytest.approx(score, rel=1e-12)
  # Each evaluation's record says which weights won it.
  records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  for record in (r for r in records if 'eval/nme' in r):
    model, ema = evaluations[record['step']]
    assert record['eval/nme'] == min(model, ema)
    assert record['eval/best_weights'] == ('ema' if ema < model else 'model')
  # The best step is kept, with the latest, whatever the other evaluations did.
  kept = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())
  assert kept == sorted({step, LATEST})
  # The run's final output names it.
  final = json.loads((workdir / 'final_metrics.json').read_text())
  assert final['best'] == {'step': step, 'weights': weights, 'nme': pytest.approx(score), 'rule': 'official'}
  assert 'best checkpoint (the official model selection' in stdout and f'step {step}, {weights} weights' in stdout


def test_evaluate_defaults_to_the_best_and_says_so(trained, tmp_path):
  workdir, data_dir, _ = trained
  step, weights, score = _expected_best(_evaluations(workdir))
  assert _run_evaluate(workdir, data_dir, tmp_path / 'default') == 0
  doc = json.loads((tmp_path / 'default' / 'metrics.json').read_text())
  info = doc['info']
  assert (info['step'], info['weights'], info['best_by_protocol']) == (step, weights, True)
  assert info['best']['step'] == step and 'best checkpoint' in info['chosen_by']
  # The same number the trainer recorded for that step's winning weights.
  assert doc['rows'][0]['nme'] == pytest.approx(100 * score, rel=1e-5)
  assert f'- weights: {weights} (step {step}); the best checkpoint' in (tmp_path / 'default' / 'report.md').read_text()


def test_evaluate_step_and_weights_override_the_default(trained, tmp_path, capsys):
  workdir, data_dir, _ = trained
  evaluations = _evaluations(workdir)
  step, weights, _ = _expected_best(evaluations)
  other = 'model' if weights == 'ema' else 'ema'
  assert _run_evaluate(workdir, data_dir, tmp_path / 'other', '--step', str(step), '--weights', other) == 0
  doc = json.loads((tmp_path / 'other' / 'metrics.json').read_text())
  info = doc['info']
  assert (info['step'], info['weights'], info['best_by_protocol']) == (step, other, False)
  assert doc['rows'][0]['nme'] == pytest.approx(100 * evaluations[step][0 if other == 'model' else 1], rel=1e-5)
  assert 'not the best by the official protocol' in (tmp_path / 'other' / 'report.md').read_text()
  # --step latest with --weights.
  latest = max(evaluations)
  assert _run_evaluate(workdir, data_dir, tmp_path / 'latest', '--step=latest', '--weights=model') == 0
  info = json.loads((tmp_path / 'latest' / 'metrics.json').read_text())['info']
  assert (info['step'], info['weights']) == (latest, 'model')
  assert info['best_by_protocol'] == ((latest, 'model') == (step, weights))
  # Bad values: one line, no traceback; --use_ema is not a flag (--weights is): a usage error naming it.
  capsys.readouterr()
  assert _run_evaluate(workdir, data_dir, tmp_path / 'x', '--use_ema', '--weights=model') == 2
  assert 'use_ema' in capsys.readouterr().err
  assert _run_evaluate(workdir, data_dir, tmp_path / 'x', '--step=soon') == 1
  assert _run_evaluate(workdir, data_dir, tmp_path / 'x', '--step=3') == 1
  err = capsys.readouterr().err
  assert "'best', 'latest' or a step number" in err and 'has no step 3' in err
  assert 'Traceback' not in err


def test_predict_and_the_python_api_default_to_the_best(trained, tmp_path):
  import cv2
  from star_jax import FaceLandmarker
  from star_jax import predict
  from star_jax.data import synthetic

  workdir, _, _ = trained
  step, weights, _ = _expected_best(_evaluations(workdir))
  landmarker = FaceLandmarker.from_checkpoint(workdir, detector=None)
  assert (landmarker.step, landmarker.weights, landmarker.selection['best_by_protocol']) == (step, weights, True)
  chosen = FaceLandmarker.from_checkpoint(workdir, step=LATEST, weights='ema', detector=None)
  assert (chosen.step, chosen.weights) == (LATEST, 'ema')
  assert chosen.selection['best_by_protocol'] == ((LATEST, 'ema') == (step, weights))

  face = synthetic.generate(0, 'test', 0)
  image = tmp_path / 'face.png'
  cv2.imwrite(str(image), cv2.cvtColor(face.image, cv2.COLOR_RGB2BGR))
  box = ','.join(str(float(v)) for v in face.box)
  assert predict.main(['predict', '--checkpoint', str(workdir), str(image), '--output', str(tmp_path / 'a'),
                       '--box', box]) == 0
  record = json.loads((tmp_path / 'a' / 'face.json').read_text())
  assert (record['step'], record['weights'], record['best_by_protocol']) == (step, weights, True)
  assert predict.main(['predict', '--checkpoint', str(workdir), str(image), '--output', str(tmp_path / 'b'),
                       '--box', box, f'--step={LATEST}', '--weights=model']) == 0
  record = json.loads((tmp_path / 'b' / 'face.json').read_text())
  assert (record['step'], record['weights']) == (LATEST, 'model')
  assert record['best_by_protocol'] == ((LATEST, 'model') == (step, weights))


def _rewrite_metrics(workdir, edit):
  """Applies `edit(metrics) -> metrics or None` to every step's saved metrics (None: remove them)."""
  for path in pathlib.Path(workdir, 'checkpoints').glob('*/metrics'):
    metrics = json.loads((path / 'metrics').read_text())
    new = edit(metrics)
    if new is None:
      shutil.rmtree(path)
    else:
      (path / 'metrics').write_text(json.dumps(new))


def test_a_workdir_without_evaluations_has_no_best_and_says_to_choose_a_step(trained, tmp_path, capsys):
  workdir, data_dir, _ = trained
  kept = sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())

  # Evaluations saved without the winning weights, and no evaluations saved at all (as an earlier star_jax
  # wrote its workdirs): nothing ranks the steps, so there is no best checkpoint.
  legacy = tmp_path / 'legacy'
  shutil.copytree(workdir, legacy)
  _rewrite_metrics(legacy, lambda m: {k: v for k, v in m.items() if k not in ('best_weights', 'selection', 'step')}
                   | {'nme': m['ema/nme']})
  bare = tmp_path / 'bare'
  shutil.copytree(workdir, bare)
  _rewrite_metrics(bare, lambda m: None)
  for old in (legacy, bare):
    assert checkpoints.best_checkpoint(old) is None
    # The one error, for the default (the best) of every reader: it says how to go on.
    with pytest.raises(checkpoints.NoEvaluationError, match=r'records an evaluation.*Choose a step: --step latest'):
      checkpoints.load_model(old, step='best')
    assert _run_evaluate(old, data_dir, tmp_path / 'x') == 1
    err = capsys.readouterr().err
    assert 'no best checkpoint' in err and '--step latest' in err and 'Traceback' not in err
    # A step chosen by hand still loads: without an evaluation, its EMA weights.
    loaded = checkpoints.load_model(old, step='latest')
    assert (loaded.step, loaded.weights, loaded.is_best) == (max(kept), 'ema', None)
    assert checkpoints.load_model(old, step=kept[0], weights='model').weights == 'model'

  # A converted checkpoint (no training history: one network) reads as its latest step.
  converted = tmp_path / 'converted'
  latest = checkpoints.load_model(workdir, step='latest', weights='model')
  checkpoints.save_model_checkpoint(converted, model=latest.model, config=latest.config)
  loaded = checkpoints.load_model(converted, step='best')
  assert (loaded.step, loaded.weights, loaded.is_best) == (0, 'model', None)
  assert 'no step holds an evaluation' in loaded.chosen_by


def test_select_weights_rules():
  assert checkpoints.select_weights({'model/nme': 0.2, 'ema/nme': 0.1}) == (0.1, 'ema')
  assert checkpoints.select_weights({'model/nme': 0.1, 'ema/nme': 0.2}) == (0.1, 'model')
  # A tie goes to the network, which the official trainer scores first and replaces only on a lower NME.
  assert checkpoints.select_weights({'model/nme': 0.1, 'ema/nme': 0.1}) == (0.1, 'model')
  assert checkpoints.select_weights({'model/nme': 0.1}) == (0.1, 'model')
  assert checkpoints.parse_step('7') == 7 and checkpoints.parse_step('BEST') == 'best'
  with pytest.raises(ValueError):
    checkpoints.parse_step('-1')
  np.testing.assert_equal(checkpoints.parse_step(None), None)
