"""Three official training steps on a seeded draw, with how well the official step agrees with itself.

  python scripts/make_train_step_draw.py --official /path/to/STAR --seed 21 \
      --output tests/testdata/train_step_s21_pure64.npz [--pure64=true] [--reference_output FULL.npz]
  python scripts/make_train_step_draw.py --official /path/to/STAR \
      --remeasure ../shared/reference/train_step.npz,../shared/reference/train_step_s13_pure64.npz \
      --output tests/testdata/train_step_self_agreement.json

Needs PyTorch and a checkout of the official code (github ZhenglinZhou/STAR), loaded through
benchmarks/official.py; run it with a Python that has both star_jax and PyTorch.

A draw (`--seed S`): the tiny WFLW StackedHGNetV1 of the parity test (input 64, maps 16, nstack 4,
nlevels 4, 16 channels, CoordConv, AAM) with the official initialisation under torch.manual_seed(S)
and BatchNorm parameters and statistics drawn from numpy's default_rng(S) (weight 1 + 0.1 N(0, 1),
bias 0.05 N(0, 1), running mean 0.1 N(0, 1), running variance U(0.5, 1.5), all float32 numbers);
three batches of 4 uniformly random uint8 RGB images and 98 landmarks per face in crop pixels, uniform
in [8, 56] (the last face in [-12, 76], so that it runs past the border), as float32. Targets by the
official code: `encoder_default.generate_heatmap` (point maps), `AlignmentDataset._generate_edgemap`
(edge maps) and `_norm_points` (landmarks in [-1, 1]).

The run: `benchmarks.official.Trainer` in float64 (`net.double()`): three steps of the official pieces
as `lib.utility.forward_backward` runs them (compute_loss, zero_grad, backward, Adam lr 1e-3,
accumulate_net with decay 0.5 ** (4 / 10000)), the network fed (BGR - 127.5) / 127.5 computed in
float64. With --pure64 (the default) every `Tensor.float()` of the official code returns float64
(`official.pure64`), targets included, so the whole official step is float64 and a float64
reimplementation has nothing to emulate; --nopure64 keeps the official float32 islands (the format of
the shared train_step.npz).

Self-agreement. The same steps are rerun, each in a fresh process, with (a) another number of torch
threads (1 instead of --threads) and (b) MKL's code path of other CPUs (MKL_CBWR=COMPATIBLE: the
float64 convolutions run as GEMMs whose summation order differs, as on another machine; a thread
count leaves them unchanged). Per group (losses/steps12, losses/step3, grad1, net, net_stats, ema,
ema_stats, adam_mu, adam_nu; as make_train_step_golden.compare measures them, max over tensors of
max |a - b| / max |a|), the largest difference of a rerun from the run is stored as
`self_agreement/<group>`, plus `self_agreement/losses/step1` (step 1 alone) and
`self_agreement/losses/step1_terms` (12,) per term; `config/pure64` = 1 when the islands ran in float64,
`config/seed`, and `config/self_agreement_reruns` (what was rerun). A draw whose step-1 losses disagree
by more than 1e-10 is ill-conditioned (the official step's result there is mostly its own rounding): the
command says so and exits with status 1 without writing, unless --keep_ill_conditioned.

Output: `--output` the compact golden (scripts/make_train_step_golden.py's format: about a quarter of
the reference's size, decoded by its `decode`); `--reference_output` the full reference (the layout of
the shared train_step_s13_pure64.npz).

--remeasure FILE,...: for existing reference files (their initial weights and batches, float32 islands
as `config/pure64` says), reruns the official steps here: the run with --threads, and the two reruns
above. Each file's self-agreement is then the largest difference between any two of: the file's own
values (made on another machine), the run here and the reruns, together with what the file stores
(`self_agreement/*`); written as JSON with each file's `draw_digest`, for the parity test.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from absl import flags
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from star_jax import cli  # noqa: E402  pylint: disable=wrong-import-position

IMAGE_SIZE, MAP_SIZE, BATCH, POINTS, STEPS = 64, 16, 4, 98, (1, 2, 3)
ILL_CONDITIONED = 1e-10   # step-1 loss self-agreement above which a draw is refused
RERUNS = (('threads', {}), ('mkl_compatible', {'MKL_CBWR': 'COMPATIBLE'}))
REFERENCE_GROUPS = ('losses/steps12', 'losses/step3', 'grad1', 'net', 'net_stats', 'ema', 'ema_stats', 'adam_mu',
                    'adam_nu', 'losses/step1')


def _golden_format():
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('make_train_step_golden', REPO / 'scripts' / 'make_train_step_golden.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ---- The draw --------------------------------------------------------------------------------------------

def make_draw(official_path: str, seed: int, pure64: bool) -> dict[str, np.ndarray]:
  """Initial weights (init/<key>, float32 values), three batches and their official targets."""
  import torch  # pylint: disable=import-outside-toplevel

  from benchmarks import official  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  torch.manual_seed(seed)
  cfg = official.config(official_path, 'WFLW', width=IMAGE_SIZE, height=IMAGE_SIZE, batch_size=BATCH)
  net = official.network_class(official_path)(config=cfg, classes_num=cfg.classes_num, edge_info=cfg.edge_info,
                                              nstack=4, nlevels=4, in_channel=16, add_coord=cfg.add_coord,
                                              decoder_type=cfg.decoder_type)
  with torch.no_grad():
    for module in net.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        n = module.num_features
        module.weight.copy_(torch.from_numpy((1 + 0.1 * rng.standard_normal(n)).astype(np.float32)))
        module.bias.copy_(torch.from_numpy((0.05 * rng.standard_normal(n)).astype(np.float32)))
        module.running_mean.copy_(torch.from_numpy((0.1 * rng.standard_normal(n)).astype(np.float32)))
        module.running_var.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, n).astype(np.float32)))
  draw = {'init/' + k: v.numpy().copy() for k, v in net.state_dict().items()}

  encoder = official.module(official_path, 'lib.dataset.encoder.encoder_default').encoder_default(
      IMAGE_SIZE, IMAGE_SIZE)
  dataset = object.__new__(official.alignment_dataset(official_path).AlignmentDataset)
  dataset.image_height = dataset.image_width = IMAGE_SIZE
  dataset.edge_info = cfg.edge_info
  with official.pure64() if pure64 else contextlib.nullcontext():
    for k in STEPS:
      draw[f'step{k}/image_rgb_uint8'] = rng.integers(0, 256, (BATCH, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
      points = rng.uniform(8, 56, (BATCH, POINTS, 2))
      points[-1] = rng.uniform(-12, 76, (POINTS, 2))
      points = points.astype(np.float32)
      draw[f'step{k}/landmarks_px'] = points
      draw[f'step{k}/landmarks'] = np.stack([
          dataset._norm_points(torch.from_numpy(p), IMAGE_SIZE, IMAGE_SIZE).numpy() for p in points]).astype(np.float64)  # pylint: disable=protected-access
      draw[f'step{k}/pointmaps'] = np.stack([encoder.generate_heatmap(p).numpy() for p in points]).astype(np.float64)
      draw[f'step{k}/edgemaps'] = np.stack([dataset._generate_edgemap(p).numpy() for p in points]).astype(np.float64)  # pylint: disable=protected-access
  return draw


# ---- One run of the official steps (in a worker process) -------------------------------------------------

def run_official_steps(official_path: str, draw: dict, pure64: bool) -> dict[str, np.ndarray]:
  """The three official steps on `draw` in float64; the reference file's keys for what they give."""
  import torch  # pylint: disable=import-outside-toplevel

  from benchmarks import official  # pylint: disable=import-outside-toplevel
  init = {k[len('init/'):]: torch.from_numpy(np.asarray(v)) for k, v in draw.items() if k.startswith('init/')}
  trainer = official.Trainer(official_path, init, dtype=torch.float64)
  out = {}
  with official.pure64() if pure64 else contextlib.nullcontext():
    for k in STEPS:
      inputs = trainer.inputs(draw[f'step{k}/image_rgb_uint8'])
      labels = trainer.labels(draw[f'step{k}/landmarks'], draw[f'step{k}/pointmaps'], draw[f'step{k}/edgemaps'])
      losses, total = trainer.step(inputs, labels)
      out[f'step{k}/losses'] = np.asarray(losses, np.float64)
      out[f'step{k}/total_loss'] = np.float64(total)
      if k == 1:
        out.update({'step1/grad/' + n: g for n, g in trainer.gradients().items()})
  for name, net in (('net', trainer.net), ('net_ema', trainer.net_ema)):
    for key, value in net.state_dict().items():
      value = value.detach()
      out[f'step3/{name}/{key}'] = (value.double() if value.is_floating_point() else value).numpy().copy()
  mu, nu = trainer.adam_moments()
  out.update({'step3/adam_mu/' + k: v for k, v in mu.items()})
  out.update({'step3/adam_nu/' + k: v for k, v in nu.items()})
  return out


def _worker(official_path: str, draw_file: str, out_file: str, pure64: bool, threads: int) -> None:
  import torch  # pylint: disable=import-outside-toplevel
  import warnings  # pylint: disable=import-outside-toplevel
  warnings.filterwarnings('ignore', message='torch.meshgrid')   # the official code's calls
  torch.set_num_threads(threads)
  with np.load(draw_file) as f:
    draw = {k: f[k] for k in f.files}
  np.savez(out_file, **run_official_steps(official_path, draw, pure64))


def _run_worker(official_path: str, draw_file: pathlib.Path, out_file: pathlib.Path, pure64: bool, threads: int,
                env: dict) -> dict[str, np.ndarray]:
  """Runs the official steps in a fresh process (environment variables such as MKL_CBWR take effect
  at start-up) and returns what it computed."""
  from star_jax import cpu_tuning  # pylint: disable=import-outside-toplevel
  environment = dict(cpu_tuning.untuned_environment(), **env)   # the official code as shipped
  environment['PYTHONPATH'] = os.pathsep.join([str(REPO)] + [p for p in [os.environ.get('PYTHONPATH', '')] if p])
  cmd = [sys.executable, __file__, '--official', official_path, '--worker_draw', str(draw_file),
         '--worker_out', str(out_file), f'--pure64={pure64}', '--threads', str(threads)]
  proc = subprocess.run(cmd, env=environment, capture_output=True, text=True, timeout=3600, check=False)
  if proc.returncode != 0:
    raise cli.UserError(f'the official steps failed ({" ".join(f"{k}={v}" for k, v in env.items()) or "default"}, '
                        f'{threads} threads):\n{proc.stderr[-3000:]}')
  with np.load(out_file) as f:
    return {k: f[k] for k in f.files}


def _describe(name: str, threads: int) -> str:
  return {'threads': f'torch threads {1 if threads != 1 else 2} instead of {threads}',
          'mkl_compatible': f'MKL_CBWR=COMPATIBLE ({threads} threads)'}[name]


def _rerun_threads(name: str, threads: int) -> int:
  return (1 if threads != 1 else 2) if name == 'threads' else threads


# ---- Self-agreement -------------------------------------------------------------------------------------

def spread(fmt, runs: list[dict], base: dict) -> tuple[dict[str, float], np.ndarray]:
  """Largest difference, per group and per step-1 loss term, between any two of `runs` (each completed
  with `base`'s inputs and initial weights, which `compare` reads)."""
  worst, terms = {}, np.zeros(12)
  for i, a in enumerate(runs):
    for b in runs[i + 1:]:
      ref = dict(base, **a)
      for group, values in fmt.compare(ref, b).items():
        worst[group] = max(worst.get(group, 0.0), values[0][0])
      terms = np.maximum(terms, fmt.step1_loss_terms(ref, b))
  return worst, terms


def _measure(official_path: str, draw: dict, pure64: bool, threads: int, folder: pathlib.Path,
             extra_runs: tuple = ()) -> tuple[dict, dict, np.ndarray, str]:
  """(the run, self-agreement per group, per step-1 term, description) for `draw`."""
  fmt = _golden_format()
  draw_file = folder / 'draw.npz'
  np.savez(draw_file, **draw)
  print(f'official steps ({threads} threads) ...', flush=True)
  run = _run_worker(official_path, draw_file, folder / 'run.npz', pure64, threads, {})
  runs, described = [run], [f'the run ({threads} threads)']
  for name, env in RERUNS:
    print(f'rerun: {_describe(name, threads)} ...', flush=True)
    runs.append(_run_worker(official_path, draw_file, folder / f'{name}.npz', pure64, _rerun_threads(name, threads), env))
    described.append(_describe(name, threads))
  for label, values in extra_runs:
    runs.append(values)
    described.append(label)
  groups, terms = spread(fmt, runs, draw)
  return run, groups, terms, 'largest difference between any two of: ' + '; '.join(described)


def _ill_conditioned(groups: dict) -> bool:
  return groups['losses/step1'] > ILL_CONDITIONED


def _summary(groups: dict, terms: np.ndarray) -> str:
  lines = [f'  {g:16s} {groups[g]:.2e}' for g in REFERENCE_GROUPS if g in groups]
  lines.append('  step-1 terms     ' + ' '.join(f'{t:.1e}' for t in terms))
  return '\n'.join(lines)


# ---- The command ----------------------------------------------------------------------------------------

def _new_draw(args, folder: pathlib.Path) -> int:
  fmt = _golden_format()
  print(f'drawing seed {args.seed} (pure64 {args.pure64}) ...', flush=True)
  draw = make_draw(args.official, args.seed, args.pure64)
  run, groups, terms, how = _measure(args.official, draw, args.pure64, args.threads, folder)
  print(f'self-agreement of the official step on seed {args.seed}:\n{_summary(groups, terms)}')
  if _ill_conditioned(groups):
    message = (f'seed {args.seed} is ill-conditioned: the official step-1 losses disagree with themselves by '
               f'{groups["losses/step1"]:.1e} > {ILL_CONDITIONED:g}')
    if not args.keep_ill_conditioned:
      raise cli.UserError(message + ' (nothing written; --keep_ill_conditioned writes it anyway)')
    print('warning: ' + message, flush=True)
  reference = {k: v for k, v in draw.items()}
  reference.update(run)
  reference.update({
      'config/size': np.int64(IMAGE_SIZE), 'config/channels': np.int64(16), 'config/nstack': np.int64(4),
      'config/batch': np.int64(BATCH), 'config/lr': np.float64(1e-3), 'config/betas': np.array([0.9, 0.999]),
      'config/ema_decay': np.float64(0.5 ** (BATCH / 10000.0)),
      'config/loss_weights': np.array([2.0 ** i / 2.0 ** 3 * w for i in range(4) for w in (1.0, 10.0, 10.0)]),
      'config/criterions': np.array(['STARLoss_v2', 'AWingLoss', 'AWingLoss'] * 4),
      'config/star_w': np.float64(1.0), 'config/star_dist': np.array('smoothl1'),
      'config/pure64': np.int64(args.pure64), 'config/seed': np.int64(args.seed),
      'config/ill_conditioned': np.int64(_ill_conditioned(groups)),
      'config/self_agreement_reruns': np.array(how)})
  for group, value in groups.items():
    reference[f'self_agreement/{group}'] = np.float64(value)
  reference['self_agreement/losses/step1_terms'] = terms
  if args.reference_output:
    np.savez_compressed(args.reference_output, **reference)
    print(f'wrote {args.reference_output}')
  stored, errors = fmt.encode(reference)
  for group, err in errors.items():
    stored[f'storage_relerr/{group}'] = np.float64(err)
  stored['sha256'] = np.array(fmt.content_digest(stored))
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(output, **stored)
  print(f'wrote {output} ({output.stat().st_size / 1e6:.2f} MB)')
  return 0


def _remeasure(args, folder: pathlib.Path) -> int:
  fmt = _golden_format()
  entries = {}
  for path in args.remeasure:
    path = pathlib.Path(path)
    if not path.is_file():
      raise cli.UserError(f'--remeasure: {path} is not a file')
    with np.load(path) as f:
      reference = fmt.decode({k: f[k] for k in f.files})
    pure64 = int(reference.get('config/pure64', 0)) == 1
    draw = {k: v for k, v in reference.items() if k.startswith('init/') or
            any(k == f'step{s}/{n}' for s in STEPS for n in ('image_rgb_uint8', 'landmarks', 'pointmaps', 'edgemaps'))}
    draw = {k: (np.asarray(v, np.float32) if k.startswith('init/') and v.dtype.kind == 'f' else v) for k, v in draw.items()}
    file_values = {k: v for k, v in reference.items() if k.startswith(('step1/grad/', 'step3/')) or
                   k.endswith(('/losses', '/total_loss'))}
    print(f'{path.name} (pure64 {pure64}) ...', flush=True)
    _, groups, terms, how = _measure(args.official, draw, pure64, args.threads, folder,
                                     extra_runs=((f"the file's own values ({path.name})", file_values),))
    stored = {g[len('self_agreement/'):]: float(v) for g, v in reference.items()
              if g[len('self_agreement/'):] in REFERENCE_GROUPS}
    for group, value in stored.items():
      groups[group] = max(groups.get(group, 0.0), value)
    print(f'{path.name}:\n{_summary(groups, terms)}')
    entries[path.name] = {
        'draw_digest': fmt.draw_digest(reference), 'pure64': int(pure64),
        'self_agreement': {g: groups[g] for g in sorted(groups)},
        'losses_step1_terms': [float(t) for t in terms],
        'how': how + ('; and the self-agreement the file stores' if stored else ''),
        'ill_conditioned': bool(_ill_conditioned(groups))}
  output = pathlib.Path(args.output)
  output.parent.mkdir(parents=True, exist_ok=True)
  output.write_text(json.dumps(entries, indent=1, sort_keys=True) + '\n')
  print(f'wrote {output}')
  return 0


def _make(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_string('official', None, 'checkout of the official PyTorch STAR code', flag_values=fv)
  flags.DEFINE_integer('seed', None, 'the draw to make', flag_values=fv)
  flags.DEFINE_bool('pure64', True, "run the official code's float32 islands in float64 too", flag_values=fv)
  flags.DEFINE_string('output', None, 'the compact golden (.npz) to write; with --remeasure, the JSON file',
                      flag_values=fv)
  flags.DEFINE_string('reference_output', '', 'also write the full reference (.npz) here', flag_values=fv)
  flags.DEFINE_list('remeasure', [], 'reference files whose self-agreement to measure here instead of a new draw',
                    flag_values=fv)
  flags.DEFINE_integer('threads', 2, 'torch threads of the run (the thread rerun uses 1, or 2 if this is 1)',
                       flag_values=fv)
  flags.DEFINE_bool('keep_ill_conditioned', False, 'write an ill-conditioned draw anyway (flagged in '
                    'config/ill_conditioned)', flag_values=fv)
  flags.DEFINE_string('worker_draw', '', 'internal: run the official steps on this draw (.npz) ...', flag_values=fv)
  flags.DEFINE_string('worker_out', '', 'internal: ... and write them here', flag_values=fv)
  if command.parse():
    raise flags.Error('no positional arguments are taken')
  command.require('official')
  args = fv
  from benchmarks import official  # pylint: disable=import-outside-toplevel
  try:
    official.check_checkout(args.official)
  except FileNotFoundError as e:
    raise cli.UserError(f'--official: {e}') from None
  if args.worker_draw:
    _worker(args.official, args.worker_draw, args.worker_out, args.pure64, args.threads)
    return 0
  command.require('output')
  if (args.seed is None) == (not args.remeasure):
    raise flags.Error('give --seed (a new draw) or --remeasure (existing reference files), not both')
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise cli.UserError('PyTorch is not installed (pip install torch); it runs the official code') from None
  with tempfile.TemporaryDirectory() as folder:
    if args.remeasure:
      return _remeasure(args, pathlib.Path(folder))
    return _new_draw(args, pathlib.Path(folder))


def main(argv=None) -> int:
  return cli.guarded(_make, argv, __doc__)


if __name__ == '__main__':
  sys.exit(main())   # without star_jax's CPU tuning: the official code runs as shipped
