"""Evaluate a checkpoint on a dataset's test split: NME, FR and AUC overall and per subset.

  python -m star_jax.evaluate --config configs/wflw.py --checkpoint DIR [--norm ocular|pupil]
      [--use_ema|--nouse_ema] [--step N] [--output OUT]
  python -m star_jax.evaluate --config configs/wflw.py --pytorch WFLW_STARLoss_NME_4_02_FR_2_32_AUC_0_605.pkl

(`python scripts/evaluate.py ...` is the same command.) --checkpoint is a star_jax checkpoint
directory or a training workdir (trained here, or written by `python -m star_jax.convert_pytorch`);
--pytorch converts an official PyTorch checkpoint on the fly (into a temporary folder; PyTorch is not
needed). The dataset comes from the config and can be changed from the command line, e.g.
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


def _flags(argv):
  command = cli.Command(__doc__, argv, config='required')
  fv = command.fv
  flags.DEFINE_string('checkpoint', None, 'star_jax checkpoint directory (or a training workdir holding '
                      'checkpoints/)', flag_values=fv)
  flags.DEFINE_string('pytorch', None, 'official PyTorch STAR checkpoint (.pkl), converted on the fly',
                      flag_values=fv)
  flags.DEFINE_integer('step', None, 'checkpoint step (default: the latest)', flag_values=fv)
  flags.DEFINE_enum('norm', None, ['ocular', 'pupil'],
                    "NME normalisation (default: the layout's: ocular for WFLW and 300W, pupil for COFW)",
                    flag_values=fv)
  flags.DEFINE_bool('use_ema', None, 'evaluate the EMA weights when the checkpoint has them (default: yes '
                    "for --checkpoint; for --pytorch the official tester's choice, 'net', i.e. no)",
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
  """The model to evaluate: (LoadedModel, where it came from, the weights' name for the report)."""
  from star_jax import convert_pytorch  # pylint: disable=import-outside-toplevel
  from star_jax.training import checkpoints  # pylint: disable=import-outside-toplevel

  if fv.pytorch:
    use_ema = bool(fv.use_ema) if fv.use_ema is not None else False
    where = f'PyTorch checkpoint {fv.pytorch}'
    if not os.path.isfile(fv.pytorch):
      raise cli.UserError(f'PyTorch checkpoint {fv.pytorch} does not exist')
    directory = os.path.join(tmp, 'checkpoint')
    try:
      convert_pytorch.convert_checkpoint(fv.pytorch, config, directory, weights='net_ema' if use_ema else 'net')
    except (ValueError, OSError, KeyError) as e:
      raise cli.UserError(f'cannot convert {fv.pytorch} for the {config.layout} config: {e}') from None
  else:
    use_ema = True if fv.use_ema is None else bool(fv.use_ema)
    where = f'checkpoint {fv.checkpoint}'
    directory = fv.checkpoint
  try:
    loaded = checkpoints.load_model(directory, step=fv.step, weights=None if use_ema else 'model')
  except (FileNotFoundError, ValueError) as e:
    raise cli.UserError(f'cannot load the {where}: {e}') from None
  weights = ('net_ema' if use_ema else 'net') if fv.pytorch else loaded.weights
  try:
    checkpoints.check_compatible(loaded.config, config)
  except ValueError as e:
    raise cli.UserError(f'{where}: {e}') from None
  return loaded, where, weights


def _evaluate(argv: list[str]) -> int:
  fv, config = _flags(argv)
  cli.setup_logging('error')  # Orbax warns about harmless details of read-only restores
  import jax  # pylint: disable=import-outside-toplevel  (after flag parsing: --help stays fast)

  from star_jax import metrics  # pylint: disable=import-outside-toplevel
  from star_jax.data import build  # pylint: disable=import-outside-toplevel
  from star_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from star_jax.evaluation import plots  # pylint: disable=import-outside-toplevel
  from star_jax.evaluation import report  # pylint: disable=import-outside-toplevel
  from star_jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
  from star_jax.evaluation import temporal as temporal_lib  # pylint: disable=import-outside-toplevel
  from star_jax.layouts import get_layout  # pylint: disable=import-outside-toplevel

  layout = get_layout(config.layout)
  norm = fv.norm or layout.default_norm

  # ---- The model ----
  with tempfile.TemporaryDirectory(prefix='star_jax_converted_') as tmp:
    loaded, where, weights = _load(fv, config, tmp)

  # ---- The data ----
  split = config.data.test_split
  try:
    source = build.load_source(config.data, split, layout=config.layout)
  except (FileNotFoundError, ImportError, ValueError) as e:
    raise cli.UserError(str(e)) from None
  num_examples = pipeline.num_eval_examples(config, source)

  # ---- Predict ----
  print(f'evaluating {where} (step {loaded.step}, {weights} weights) on {config.data.name}/'
        f'{config.data.config or "default"} {split} ({num_examples} images)', flush=True)
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
      'step': loaded.step, 'weights': weights, 'layout': layout.name, 'num_points': layout.num_points,
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
