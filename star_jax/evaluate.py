"""Evaluate a checkpoint on a dataset's test split: NME, FR and AUC overall and per subset.

  python -m star_jax.evaluate --config configs/wflw.py --checkpoint DIR [--norm ocular|pupil]
      [--step best|latest|N] [--weights model|ema] [--output OUT]
  python -m star_jax.evaluate --config configs/wflw.py --pytorch WFLW_STARLoss_NME_4_02_FR_2_32_AUC_0_605.pkl

(`python scripts/evaluate.py ...` is the same command.) --checkpoint is a star_jax checkpoint
directory or a training workdir (trained here, or written by `python -m star_jax.convert_pytorch`);
--pytorch converts an official PyTorch checkpoint on the fly (into a temporary folder; PyTorch is not
needed).

Which weights (the official protocol): by default the best checkpoint of the run with the weights
that won there. The official trainer scores the network and its EMA at every evaluation and keeps
whichever has the lowest NME so far as best_model.pkl, whose `net` its tester evaluates; our trainer
records the same choice with each evaluated checkpoint (README, "Relation to the official code").
--step chooses a step ('best', 'latest' or a number; with a number the weights default to the ones
that won that step's evaluation) and --weights the weights (model or ema). For --pytorch the default
is the `.pkl`'s `net`, what the official tester evaluates (--weights=ema: its `net_ema`). Reports say
which step and weights were scored, how they were chosen and whether they are the best by the official
protocol. The dataset comes from the config and can be changed from the command line, e.g.
`--config.data.data_dir=~/tensorflow_datasets`, `--config.data.max_eval_examples=100`,
`--config.eval_batch_size=16`.

Scores are the official tester's: the last stack's landmarks against the ground truth in the
normalised crop frame, NME normalised by the inter-ocular (or inter-pupil) distance; FR and AUC at the
layout's threshold (0.1; 0.05 for 300W), AUC by Simpson's rule on a 1e-4 grid. The published numbers
of the official PyTorch models (paper Tables 1-3) are shown beside ours when the dataset is the real
one. NME and FR are printed in percent, AUC as a fraction, as in the paper.

Writes to OUT (default: next to the checkpoint, '<checkpoint>_eval'):
  report.md        the table, with the run's details
  metrics.json     everything in the table, machine-readable, plus images/s
  ced.png          cumulative error distribution, overall and per subset
  predictions.json per image: image_name, landmarks (x, y) in original image pixels (prediction
                   and ground truth) and its NME; for video datasets (300VW) also its video and
                   frame, in video frame pixels

Video datasets (300VW, configs/300vw.py) also get the temporal stability of each video in the report
and metrics.json ('temporal': per video and per category, star_jax/evaluation/temporal.py).
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import tempfile

from absl import flags
import numpy as np

from star_jax import cli
from star_jax import metrics
from star_jax.evaluation import temporal as temporal_lib
from star_jax.layouts import get_layout


def _flags(argv):
  command = cli.Command(__doc__, argv, config='required')
  fv = command.fv
  flags.DEFINE_string('checkpoint', None, 'star_jax checkpoint directory (or a training workdir holding '
                      'checkpoints/)', flag_values=fv)
  flags.DEFINE_string('pytorch', None, 'official PyTorch STAR checkpoint (.pkl), converted on the fly',
                      flag_values=fv)
  flags.DEFINE_string('step', None, "checkpoint step: 'best' (the default: the best by the official "
                      "protocol), 'latest' or a step number", flag_values=fv)
  flags.DEFINE_enum('weights', None, ['model', 'ema'], 'the weights to evaluate (default: those that won the '
                    "step's evaluation; for --pytorch the .pkl's net, i.e. model)", flag_values=fv)
  flags.DEFINE_enum('norm', None, ['ocular', 'pupil'],
                    "NME normalisation (default: the layout's: ocular for WFLW and 300W, pupil for COFW)",
                    flag_values=fv)
  flags.DEFINE_string('output', None, "where the report goes (default '<checkpoint>_eval')", flag_values=fv)
  flags.DEFINE_bool('progress', True, 'show a progress bar', flag_values=fv)
  rest = command.parse()
  if rest:
    raise flags.Error(f'unexpected arguments: {" ".join(rest)}')
  if bool(fv.checkpoint) == bool(fv.pytorch):
    raise cli.UserError('give exactly one of --checkpoint DIR (a star_jax checkpoint) and --pytorch FILE.pkl '
                        '(an official PyTorch checkpoint)')
  return fv, command.config


def _load(fv, config, tmp: str):
  """The model to evaluate: (LoadedModel, where it came from, what was read for the report: step, weights,
  best_by_protocol, chosen_by, best)."""
  from star_jax import checkpoints  # lazy: command start-up
  from star_jax import convert_pytorch  # lazy: command start-up

  weights = fv.weights
  if fv.pytorch:
    if fv.step is not None:
      raise cli.UserError('--step is for --checkpoint directories; an official .pkl holds one network')
    use_ema = weights == 'ema'
    where = f'PyTorch checkpoint {fv.pytorch}'
    if not os.path.isfile(fv.pytorch):
      raise cli.UserError(f'PyTorch checkpoint {fv.pytorch} does not exist')
    directory = os.path.join(tmp, 'checkpoint')
    try:
      convert_pytorch.convert_checkpoint(fv.pytorch, config, directory, weights='net_ema' if use_ema else 'net')
    except (ValueError, OSError, KeyError) as e:
      raise cli.UserError(f'cannot convert {fv.pytorch} for the {config.layout} config: {e}') from None
    step, weights = None, 'model'
  else:
    where = f'checkpoint {fv.checkpoint}'
    directory = fv.checkpoint
    try:
      step = checkpoints.parse_step(fv.step if fv.step is not None else 'best')
    except ValueError as e:
      raise cli.UserError(f'--step: {e}') from None
  try:
    loaded = checkpoints.load_model(directory, step=step, weights=weights)
  except (FileNotFoundError, ValueError) as e:
    raise cli.UserError(f'cannot load the {where}: {e}') from None
  described = loaded.describe()
  if fv.pytorch:
    # The official tester evaluates `net` (in best_model.pkl: the official trainer's best of the network
    # and its EMA); the step of a converted checkpoint means nothing.
    described = {'step': loaded.step, 'weights': 'net_ema' if use_ema else 'net', 'best_by_protocol': not use_ema,
                 'chosen_by': "the .pkl's net_ema, as asked" if use_ema else
                 "the .pkl's net, what the official tester evaluates", 'best': None}
  try:
    checkpoints.check_compatible(loaded.config, config)
  except ValueError as e:
    raise cli.UserError(f'{where}: {e}') from None
  return loaded, where, described


def _evaluate(argv: list[str]) -> int:
  fv, config = _flags(argv)
  cli.setup_logging('error')  # Orbax warns about harmless details of read-only restores
  # The libraries load here, after cli.run's process set-up (which may re-execute the process) and the
  # flags: they load once, and --help stays fast.
  import jax  # lazy: command start-up
  from star_jax.data import build  # lazy: command start-up
  from star_jax.data import pipeline  # lazy: command start-up
  from star_jax.evaluation import plots  # lazy: command start-up
  from star_jax.evaluation import report  # lazy: command start-up
  from star_jax.evaluation import scoring  # lazy: command start-up

  layout = get_layout(config.layout)
  norm = fv.norm or layout.default_norm

  # ---- The model ----
  with tempfile.TemporaryDirectory(prefix='star_jax_converted_') as tmp:
    loaded, where, chosen = _load(fv, config, tmp)
  weights = chosen['weights']

  # ---- The data ----
  split = config.data.test_split
  try:
    source = build.load_source(config.data, split, layout=config.layout)
  except (FileNotFoundError, ImportError, ValueError) as e:
    raise cli.UserError(str(e)) from None
  num_examples = pipeline.num_eval_examples(config, source)

  # ---- Predict ----
  print(f'evaluating {where} (step {loaded.step}, {weights} weights{report.selection_note(chosen)}) on '
        f'{config.data.name}/{config.data.config or "default"} {split} ({num_examples} images)', flush=True)
  try:
    results = scoring.evaluate_model(loaded.model, config, source, progress=fv.progress)
  except pipeline.BadRecordError as e:  # a damaged record of the dataset, named
    raise cli.UserError(f'{config.data.name} {split}: {e}') from None
  size = int(config.data.image_size)
  wall = results['wall_seconds']
  fields = report.record_fields(source, results['index'], ('image_name', 'video', 'frame', 'frame_offset'))
  names = fields['image_name'] or [str(int(i)) for i in results['index']]
  extra, temporal, coordinates = {}, None, '0-based original image pixels (x, y)'
  if fields['video'] is not None and fields['frame'] is not None:
    # Video frames (300VW): records hold a window of the frame; back to frame pixels, and the
    # frame-to-frame stability of each video.
    if fields['frame_offset'] is not None:
      offsets = np.asarray(fields['frame_offset'], np.float32).reshape(-1, 1, 2)
      results = dict(results, pred_px=results['pred_px'] + offsets, gt_px=results['gt_px'] + offsets)
      coordinates = '0-based video frame pixels (x, y)'
    extra = {'video': [str(v) for v in fields['video']], 'frame': [int(f) for f in fields['frame']]}
    videos = temporal_lib.per_video(results['pred_px'], results['gt_px'], extra['video'], extra['frame'], layout,
                                    norm, results.get('attributes'))
    temporal = {'summary': temporal_lib.summarize(videos, report.ALL), 'videos': videos}
  summary = scoring.score(results, layout, norm)
  nmes = metrics.nme_per_image(results['pred'], results['gt'], layout, norm)

  # ---- Report ----
  published = report.published_numbers(config, norm)
  rows = report.subset_rows(summary, layout)
  out_dir = pathlib.Path(fv.output or (os.path.abspath(fv.checkpoint or os.path.splitext(fv.pytorch)[0])
                                       .rstrip(os.sep) + '_eval'))
  device = f'{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})'
  info = {
      'checkpoint': os.path.abspath(fv.checkpoint) if fv.checkpoint else None,
      'pytorch': os.path.abspath(fv.pytorch) if fv.pytorch else None,
      **chosen, 'layout': layout.name, 'num_points': layout.num_points,
      'dataset': str(config.data.name), 'dataset_config': str(config.data.config), 'split': str(split),
      'data_dir': str(config.data.data_dir), 'num_images': int(len(nmes)), 'norm': norm,
      'threshold': layout.threshold, 'image_size': size, 'device': device,
      'images_per_second_model': float(results['images_per_second']),
      'images_per_second_total': float(len(nmes) / max(wall, 1e-9)),
      'date': datetime.datetime.now().isoformat(timespec='seconds'),
  }
  if report.REAL_DATASETS.get(str(config.data.name)) == layout.name and layout.name not in report.PUBLISHED:
    # 300VW: the STAR paper reports it, but we do not have its numbers to show beside ours.
    info['notes'] = [f'paper: the numbers of the official models on {layout.name} are not in this code base '
                     '(see configs/300vw.py), so none are shown.']
  doc = report.jsonable({'info': info, 'rows': rows, 'published': published, 'summary': summary,
                         **({'temporal': temporal} if temporal else {})})
  if jax.process_index() == 0:  # every process has the full results; one writes them
    markdown = report.markdown_report(info, rows, published, summary.get('nme_image'), temporal)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / 'report.md').write_text(markdown)
    (out_dir / 'metrics.json').write_text(json.dumps(doc, indent=1))
    report.write_predictions(out_dir / 'predictions.json', names, results, nmes, extra, coordinates)
    plots.ced_figure(report.ced_curves(nmes, results.get('attributes'), layout, layout.threshold),
                     layout.threshold, str(out_dir / 'ced.png'),
                     title=f'CED, {config.data.name} {split} ({layout.name}, {norm} NME)')
    print(markdown)
    print(f'written: {out_dir}/report.md, metrics.json, ced.png, predictions.json')
  return 0


def main(argv=None) -> int:
  return cli.guarded(_evaluate, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
