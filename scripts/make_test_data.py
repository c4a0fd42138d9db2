"""Rebuilds the golden files of tests/testdata with the official STAR code, or checks the committed ones.

  python scripts/make_test_data.py --official /path/to/STAR --reference ../shared/reference
      [--output tests/testdata] [--only losses,loss_hard_cases,metrics,targets,tiny_outputs,layouts,checkpoints,
      real_faces,real_faces_full,train_step,train_step_draws,train_step_self_agreement]
      [--faces DIR] [--check]

--official is a checkout of the official PyTorch code (github.com/ZhenglinZhou/STAR; the goldens were
made from commit 9b12574), loaded through benchmarks/official.py; --reference the folder of the shared
reference arrays, whose README says what each one is. The command needs PyTorch (`pip install torch`),
which star_jax does not; `--only real_faces,real_faces_full` needs neither PyTorch nor the official code.

Each file takes its inputs from the reference and has the official code recompute, on the CPU in one
thread, what the tests compare against; it keeps exactly the keys, shapes and dtypes the tests read.
The run is deterministic (nothing is drawn at random; npz members carry a fixed date). Two names the
2023 code uses are gone from current releases; benchmarks/official.py stands in for them: PyTorch's
Tensor.symeig (STARLoss v1; as torch.linalg.eigh of the upper triangle) and scipy's simps (FR_AUC; as
scipy.integrate.simpson).

  losses_star_reference.npz  [losses]  inputs: losses.npz heatmap, target and AWing pred / target of
      the case b3_n5_h16 (kept as h16/*) and of b2_n24_h64. Recomputed: value and heatmap gradient of
      STARLoss_v2 (smoothl1, l1, l2; smoothl1 with w=0.5), STARLoss (v1, smoothl1) and AWingLoss on h16;
      on the whole of b2_n24_h64 the heatmap gradients of STARLoss_v2 smoothl1 and l2 and of STARLoss,
      of which h64/* keeps maps (1, 11) and (0, 0) as a batch of 1 x 2 maps, the gradients scaled by
      48 / 2 (each term depends on its own map only and the loss averages over the maps).
  metrics_reference.npz  [metrics]  inputs: metrics.npz gt and pred, 200 images per dataset (the file
      keeps the first 16). Recomputed with the official conf (norm_type ocular, pupil) and lib.metric:
      the NME of all 200 images, FR and AUC at the dataset's threshold, and that threshold.
  targets_golden.npz  [targets]  inputs: targets.npz landmarks_256, crop/{image, landmarks, scale_center}
      and the geometry draws. Recomputed: point maps (encoder_default), edge maps and normalised
      landmarks (AlignmentDataset) of landmarks_256; the test-time crop (Augmentation with is_train
      False: matrix, landmarks, and the warped image for WFLW), scale and centre read as the official
      reads them from text (the shortest decimals of the float32 values); the flip (Flip, always taken)
      of crop/landmarks and centre_w in the 400 px wide image; the random-geometry matrices
      (GetRandomGeometryMatrix) for the given draws.
  tiny_outputs.npz  [tiny_outputs]  inputs: tiny_model.npz input_nchw and the 'net' weights of
      tiny_{wflw,cofw}_checkpoint.pkl. Recomputed: the official StackedHGNetV1 (input 64, nstack 4,
      nlevels 4, 32 channels, the official conf otherwise), a fresh copy per mode, in float32 and in
      float64 (.double(), with the float32 islands in float64 too: official.pure64), eval and train
      mode. Kept per dataset D: D/f32/{eval,train}/stack<i>/landmarks of every stack and the maps (point
      and fusion maps every 12th channel for WFLW, every 7th for COFW; edge maps every 3rd; NCHW) of
      stacks 0 and 3 in eval mode and of stack 0 in train mode; D/f64/{eval,train}/stack<i>/landmarks
      (float64) of every stack and, in train mode, the maps of stack 1 (rounded to float32).
  tiny_official_layouts.json.gz  [layouts]  recomputed: for the full-size official networks of WFLW,
      300W and COFW (official conf and get_net arguments: input 256, nstack 4, 256 channels) every
      state_dict key with its shape and dtype, classes_num, nstack and the parameter count, as JSON
      (indent 0) in a gzip file without name or date. No inputs (the random weights are not kept).
  tiny_{wflw,cofw}_checkpoint.pkl  [checkpoints]  the reference's files, copied once 'net' is found
      to hold the parameters of tiny_model.npz's state_dict (whose BatchNorm statistics were recorded
      after its train-mode pass), 'net_ema' to equal 'net' and the epoch to be 7. They are random
      weights, not outputs; torch.save writes a random serialization id, so a re-save would differ.
  real_faces/*  [real_faces]  from the full-size photos in --faces (default <reference>/../data/
      real_faces): OpenCV imread (unchanged), INTER_AREA resize to (w // f, h // f), f = 8 for
      breakingbad.jpg, 4 for einstein.jpg (greyscale), 2 for takeo.ppm; written as JPEG quality 90
      (takeo as PNG, OpenCV defaults); each .pts is the original with its points (1-based) moved onto
      the small image, p' = (p - 0.5) * s + 0.5 per axis with s = small / original size, '%.6f'.
      The image bytes are those of OpenCV's encoders (equal with opencv-python-headless 4.14). The
      folder's README.md is not generated.
  real_faces_full/*  [real_faces_full]  the same photos at full size, for the face detector: the
      .jpg and .pts files copied byte for byte, takeo.ppm stored as a PNG of the same pixels (OpenCV
      defaults). The folder's README.md is not generated.
  train_step_golden.npz  [train_step]  the compact form of the reference's train_step.npz (three
      official training steps in float64), made by scripts/make_train_step_golden.py (its docstring
      says how it is stored); the official CoordConv radius channels in it are computed with PyTorch.
  train_step_s21_pure64.npz  [train_step_draws]  three official training steps on the draw of seed 21,
      float64 throughout (pure64), with the official step's self-agreement, made by
      scripts/make_train_step_draw.py (no inputs from the reference: the draw comes from the seed).
  train_step_self_agreement.json  [train_step_self_agreement]  how well the official step agrees with
      itself on the reference's train_step.npz and train_step_s13_pure64.npz draws, measured by
      scripts/make_train_step_draw.py --remeasure (reruns here, and the files' own values).
  losses_hard_cases.npz  [loss_hard_cases]  inputs drawn by `hard_case_inputs` (no reference needed):
      STARLoss_v2 (smoothl1, l1, l2, and wing applied per projected error) per map, value and heatmap
      gradient, and AWingLoss on the batch, computed by the official losses in float64 throughout
      (official.pure64); per map also how far the official result moves under changes that leave the
      loss the same up to rounding (one ulp, transposed, mirrored).

--check rebuilds the selected files in a temporary folder and compares them with those in --output,
printing the largest difference of each array; exit status 1 when one is out of tolerance. Inputs
must be bit-equal, and so must real_faces/*, the checkpoints and the layouts' JSON text (the gzip
header may differ). A recomputed array may differ from the committed one by the tolerance at which the
tests compare with it (GOLDENS below). A rebuilt train-step draw is another run of the official step, so
it is compared per group (make_train_step_golden.compare) within ten times the self-agreement the
committed file states; a rebuilt self-agreement file must name the same draws, within a factor of ten. Recomputing on another CPU changes float32 results in their
last bits (summation orders; PyTorch's float32 sqrt, which is not correctly rounded everywhere, enters
even the float64 run of the tiny networks through the official CoordConv radius, computed in
float32), and the ill-conditioned train mode of those random networks amplifies that; OpenCV builds
round warp positions differently (the crop image).
Arrays no test reads (the float32 train-mode landmarks of stacks 1-3) are reported only.
"""

from __future__ import annotations

import contextlib
import fnmatch
import gzip
import json
import pathlib
import shutil
import sys
import tempfile
import warnings
from typing import Callable, NamedTuple

from absl import flags
import numpy as np

# benchmarks/ (the official-code harness) is a folder of the checkout, beside this script's folder.
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from star_jax import cli  # noqa: E402  pylint: disable=wrong-import-position

DATASETS = ('WFLW', '300W', 'COFW')
TINY_DATASETS = ('WFLW', 'COFW')
TINY_POINT_STEP = {'WFLW': 12, 'COFW': 7}   # channel subsets of tiny_outputs.npz (edge maps: every 3rd)
STAR_CASES = {  # name in losses.npz -> (class name, keyword arguments)
    'star_v2_smoothl1': ('STARLoss_v2', dict(dist='smoothl1', w=1)),
    'star_v2_l1': ('STARLoss_v2', dict(dist='l1', w=1)),
    'star_v2_l2': ('STARLoss_v2', dict(dist='l2', w=1)),
    'star_v2_smoothl1_w0.5': ('STARLoss_v2', dict(dist='smoothl1', w=0.5)),
    'star_v1_smoothl1': ('STARLoss', dict(dist='smoothl1', w=1)),
}
H64_CASES = ('star_v2_smoothl1', 'star_v2_l2', 'star_v1_smoothl1')
H64_MAPS = ((1, 11), (0, 0))        # (image, point) of b2_n24_h64 kept in h64/*, in this order
FACES = (('breakingbad', '.jpg', 8, '.jpg'), ('einstein', '.jpg', 4, '.jpg'), ('takeo', '.ppm', 2, '.png'))


class Sources(NamedTuple):
  official: str | None       # checkout of the official code
  reference: pathlib.Path    # the shared reference arrays
  faces: pathlib.Path        # the full-size real faces


class Golden(NamedTuple):
  """One --only name: the files it writes (relative to the output folder), whether it needs PyTorch and
  the official code, how it makes them, and the tolerances of --check for its npz arrays:
  (key pattern, kind, value), the first matching pattern applies. Kinds: 'exact' (bit-equal), 'abs'
  (|difference| <= value), 'rel' (<= value x the committed array's largest |entry|), 'unread' (not
  read by any test, or only to widen a tolerance by how much rounding moves a result: the difference is
  reported only)."""
  files: tuple[str, ...]
  needs_torch: bool
  make: Callable[[Sources, pathlib.Path], None]
  tolerances: tuple[tuple[str, str, float], ...] = ()
  # --check's comparison of a rebuilt file with the committed one, when not the array-by-array one.
  check: Callable[[pathlib.Path, pathlib.Path], bool] | None = None


# ---- Helpers ------------------------------------------------------------------------------------------

def _input(folder: pathlib.Path, name: str, flag: str = '--reference') -> pathlib.Path:
  """folder / name; a UserError when it does not exist."""
  path = folder / name
  if not path.exists():
    raise cli.UserError(f'{path} does not exist (is {flag} the right folder?)')
  return path


def _load(src: Sources, name: str) -> dict[str, np.ndarray]:
  """The arrays of the reference's `name`."""
  with np.load(_input(src.reference, name)) as f:
    return dict(f)


def _save_npz(path: pathlib.Path, arrays: dict[str, np.ndarray]) -> None:
  np.savez_compressed(path, **arrays)   # numpy dates every member 1980-01-01: the bytes are reproducible


def _torch():
  import torch  # pylint: disable=import-outside-toplevel
  warnings.filterwarnings('ignore', message='torch.meshgrid')   # the official code's calls, on purpose
  torch.manual_seed(0)
  torch.set_num_threads(1)
  return torch


def _text_float(value) -> float:
  """A float32 read back as the decimal text it was written from (1.10000002 -> 1.1)."""
  return float(np.format_float_positional(np.float32(value)))


# ---- losses_star_reference.npz ------------------------------------------------------------------------

def make_losses(src: Sources, out: pathlib.Path) -> None:
  from benchmarks import official  # pylint: disable=import-outside-toplevel
  torch = _torch()
  loss = official.losses(src.official)
  ref = _load(src, 'losses.npz')

  def value_and_grad(criterion, prediction, target):
    prediction = torch.from_numpy(prediction).requires_grad_(True)
    with official.legacy_symeig():
      value = criterion(prediction, torch.from_numpy(target))
    value.backward()
    return value.detach().numpy(), prediction.grad.numpy()

  star = {name: (lambda cls=cls, kw=kw: getattr(loss, cls)(**kw)) for name, (cls, kw) in STAR_CASES.items()}
  arrays = {}
  case = 'b3_n5_h16'
  arrays['h16/heatmap'], arrays['h16/target'] = ref[f'{case}/heatmap'], ref[f'{case}/target']
  for name, make in star.items():
    arrays[f'h16/{name}/value'], arrays[f'h16/{name}/grad_heatmap'] = value_and_grad(
        make(), ref[f'{case}/heatmap'], ref[f'{case}/target'])
  arrays['h16/awing/pred'], arrays['h16/awing/target'] = ref[f'{case}/awing/pred'], ref[f'{case}/awing/target']
  arrays['h16/awing/value'], arrays['h16/awing/grad_pred'] = value_and_grad(
      loss.AWingLoss(), ref[f'{case}/awing/pred'], ref[f'{case}/awing/target'])

  case = 'b2_n24_h64'
  heatmap, target = ref[f'{case}/heatmap'], ref[f'{case}/target']
  maps = tuple(zip(*H64_MAPS))
  arrays['h64/heatmap'] = heatmap[maps][None]
  arrays['h64/target'] = target[maps][None]
  scale = np.float32(heatmap.shape[0] * heatmap.shape[1] / len(H64_MAPS))
  for name in H64_CASES:
    _, grad = value_and_grad(star[name](), heatmap, target)
    arrays[f'h64/{name}/grad_heatmap'] = grad[maps][None] * scale
  _save_npz(out / 'losses_star_reference.npz', arrays)


# ---- losses_hard_cases.npz -----------------------------------------------------------------------------

STAR_DISTANCES = ('smoothl1', 'l1', 'l2', 'wing')
HARD_SIZE = 16
# (name, what the map is): the maps an untrained network produces and the corners of the STAR loss.
HARD_MAPS = (
    ('uniform', 'all ones: numerically isotropic, its eigenvectors are rounding noise'),
    ('near_uniform_1e-3', 'ones + 1e-3 noise'),
    ('near_uniform_1e-7', 'ones + 1e-7 noise: eigenvalue gap ~1e-7 of the mean'),
    ('relu_noise', 'max(0, N(0, 1)): an untrained network\'s map'),
    ('blob', 'an anisotropic Gaussian blob, rotated 30 degrees'),
    ('near_isotropic_1e-4', 'a centred radial blob stretched by 1e-4 along 30 degrees'),
    ('near_isotropic_1e-9', 'the same stretched by 1e-9'),
    ('thin_row', 'a blob one pixel row high: a singular covariance (an eigenvalue 0)'),
    ('thin_diagonal', 'a line along the diagonal: singular, rotated'),
    ('single_pixel', 'one pixel: zero covariance (both eigenvalues 0)'),
    ('zeros', 'all zero: the sum is clamped to 1e-6'),
    ('blob_target_outside', 'a blob, its target outside the crop (1.4, -1.3)'),
)


def hard_case_inputs() -> dict[str, np.ndarray]:
  """The inputs of losses_hard_cases.npz, float64, NCHW: STAR maps (2, 12, 16, 16) with targets (2, 12, 2)
  (image 1: the same maps, mirrored left-right, with other targets), and AWing pred / target (2, 4, 16, 16)."""
  rng = np.random.default_rng(23)
  n = HARD_SIZE
  grid = np.arange(n) / (n - 1) * 2 - 1
  x, y = np.meshgrid(grid, grid)                                     # (H, W): x across, y down

  def gaussian(cx, cy, sx, sy, angle):
    c, s = np.cos(angle), np.sin(angle)
    u, v = (x - cx) * c + (y - cy) * s, -(x - cx) * s + (y - cy) * c
    return np.exp(-0.5 * ((u / sx) ** 2 + (v / sy) ** 2))

  radial = 0.25
  maps = {
      'uniform': np.ones((n, n)),
      'near_uniform_1e-3': 1 + 1e-3 * rng.standard_normal((n, n)),
      'near_uniform_1e-7': 1 + 1e-7 * rng.standard_normal((n, n)),
      'relu_noise': np.maximum(0, rng.standard_normal((n, n))),
      'blob': 2.5 * gaussian(0.2, -0.1, 0.3, 0.12, np.pi / 6),
      'near_isotropic_1e-4': gaussian(0, 0, radial * (1 + 1e-4), radial, np.pi / 6),
      'near_isotropic_1e-9': gaussian(0, 0, radial * (1 + 1e-9), radial, np.pi / 6),
      'thin_row': np.where(np.arange(n)[:, None] == 5, gaussian(0.1, grid[5], 0.3, 1.0, 0.0), 0.0),
      'thin_diagonal': np.eye(n) * 0.7,
      'single_pixel': np.where((np.arange(n)[:, None] == 9) & (np.arange(n)[None] == 4), 3.0, 0.0),
      'zeros': np.zeros((n, n)),
      'blob_target_outside': gaussian(0.6, -0.7, 0.15, 0.2, 0.4),
  }
  assert list(maps) == [name for name, _ in HARD_MAPS]
  stack = np.stack(list(maps.values()))
  heatmap = np.stack([stack, stack[:, :, ::-1]])                    # (2, 12, 16, 16)
  target = rng.uniform(-0.9, 0.9, (2, len(maps), 2))
  target[:, list(maps).index('blob_target_outside')] = [[1.4, -1.3], [-1.6, 1.05]]
  target[0, 0] = [0.3, 0.0]                     # uniform map, error along an axis
  target[1, 0] = [0.004, -0.003]                # ... and inside smooth-L1's quadratic zone

  # AWing: targets are point maps in [0, 1] with values at the weight map's threshold 0.2 (and one
  # float64 step below it), ones and zeros; predictions equal to the target, theta = 0.5 away, at 0 and 1.
  target_maps = np.stack([gaussian(cx, cy, 0.15, 0.15, 0.0) for cx, cy in ((0.1, 0.2), (-0.5, 0.4), (0.7, -0.6), (0, 0))])
  target_maps = np.stack([target_maps, target_maps[:, ::-1]])        # (2, 4, 16, 16)
  target_maps[0, 0, 0, :4] = [0.2, np.nextafter(0.2, 0.0), 1.0, 0.0]
  target_maps[1, 2, 8, 8:11] = [0.2, 0.2, 1.0]
  pred = np.clip(target_maps + rng.uniform(-0.6, 0.6, target_maps.shape), 0.0, 1.0)
  pred[0, 1] = target_maps[0, 1]                                     # delta = 0 everywhere on a map
  pred[0, 0, 1, :3] = target_maps[0, 0, 1, :3] + 0.5                 # delta = theta: the linear branch
  pred[1, 3, 2, :3] = np.abs(target_maps[1, 3, 2, :3] - 0.5)
  pred[1, 0, 0, :2] = [0.0, 1.0]
  return {'star/heatmap': heatmap, 'star/target': target, 'awing/pred': pred, 'awing/target': target_maps}


def _ulp_perturbed(a: np.ndarray, rng) -> np.ndarray:
  """a with every element moved by one float64 unit in the last place, up or down at random."""
  return np.where(rng.random(a.shape) < 0.5, np.nextafter(a, np.inf), np.nextafter(a, -np.inf))


def _transposed(heatmap, target, rng):
  del rng
  return heatmap.swapaxes(-1, -2), target[..., ::-1], lambda g: g.swapaxes(-1, -2)


def _mirrored(axis):
  def change(heatmap, target, rng):
    del rng
    flip = np.array([-1.0, 1.0]) if axis == -1 else np.array([1.0, -1.0])   # x across (W), y down (H)
    return np.flip(heatmap, axis), target * flip, lambda g: np.flip(g, axis)
  return change


def _perturbed(heatmap, target, rng):
  return _ulp_perturbed(heatmap, rng), target, lambda g: g


# Changes of a STAR problem that leave its loss the same up to rounding (each returns the changed map and
# target and how to bring the changed gradient back).
_EQUIVALENT_CHANGES = (_perturbed, _perturbed, _transposed, _mirrored(-1), _mirrored(-2))


def make_loss_hard_cases(src: Sources, out: pathlib.Path) -> None:
  from benchmarks import official  # pylint: disable=import-outside-toplevel
  torch = _torch()
  loss = official.losses(src.official)
  arrays = hard_case_inputs()
  arrays['star/case_names'] = np.array([name for name, _ in HARD_MAPS])
  rng = np.random.default_rng(5)

  def value_and_grad(criterion, prediction, target):
    prediction = torch.from_numpy(np.ascontiguousarray(prediction)).requires_grad_(True)
    value = criterion(prediction, torch.from_numpy(np.ascontiguousarray(target)))
    value.backward()
    return float(value.detach()), prediction.grad.numpy().copy()

  def wing_per_element(official_wing):
    """The official WingLoss applied to each projected error on its own (STARLoss_v2 calls its distance
    with reduction='none', which WingLoss does not take: as shipped, dist='wing' raises TypeError)."""
    def dist(error, zeros, reduction='none'):
      del reduction
      flat = error.reshape(-1, 1)
      return torch.stack([official_wing(flat[i:i + 1], zeros.reshape(-1, 1)[i:i + 1]) for i in range(len(flat))]
                         ).reshape(error.shape[:-1])
    return dist

  heatmap, target = arrays['star/heatmap'], arrays['star/target']
  b, m = heatmap.shape[:2]
  with official.pure64():   # float64 throughout: the losses' coordinate grids too (`.float()` gives float64)
    for dist in STAR_DISTANCES:
      def criterion(dist=dist):
        star = loss.STARLoss_v2(dist='l1' if dist == 'wing' else dist, w=1)
        if dist == 'wing':
          star.dist_func = wing_per_element(loss.WingLoss())
        return star
      # Per map (the loss of each map alone, B = N = 1): value, gradient, and how far both move under
      # changes that leave the loss the same up to rounding: the map moved by one float64 ulp per element
      # (twice, at random), and the problem transposed or mirrored (other summation orders): the
      # conditioning of the case.
      values, grads = np.zeros((b, m)), np.zeros_like(heatmap)
      value_sensitivity, grad_sensitivity = np.zeros((b, m)), np.zeros((b, m))
      for i in range(b):
        for j in range(m):
          one, t = heatmap[i:i + 1, j:j + 1], target[i:i + 1, j:j + 1]
          values[i, j], grads[i, j] = value_and_grad(criterion(), one, t)
          for change in _EQUIVALENT_CHANGES:
            changed_map, changed_target, restore = change(one, t, rng)
            v, g = value_and_grad(criterion(), changed_map, changed_target)
            g = restore(g)
            value_sensitivity[i, j] = max(value_sensitivity[i, j], abs(v - values[i, j]) / abs(values[i, j]))
            scale = np.abs(grads[i, j]).max()
            diff = np.abs(g[0, 0] - grads[i, j]).max()
            moved = diff / scale if scale > 0 else diff
            grad_sensitivity[i, j] = max(grad_sensitivity[i, j], moved if np.isfinite(moved) else np.inf)
      arrays[f'star/{dist}/values'] = values
      arrays[f'star/{dist}/grad_heatmap'] = grads
      arrays[f'star/{dist}/value_sensitivity'] = value_sensitivity
      arrays[f'star/{dist}/grad_sensitivity'] = grad_sensitivity
      arrays[f'star/{dist}/value'], _ = value_and_grad(criterion(), heatmap, target)   # the batch's mean
    arrays['awing/value'], arrays['awing/grad_pred'] = value_and_grad(loss.AWingLoss(), arrays['awing/pred'],
                                                                      arrays['awing/target'])
  _save_npz(out / 'losses_hard_cases.npz', {k: np.asarray(v) for k, v in arrays.items()})


# ---- metrics_reference.npz ----------------------------------------------------------------------------

def make_metrics(src: Sources, out: pathlib.Path) -> None:
  from benchmarks import official  # pylint: disable=import-outside-toplevel
  torch = _torch()
  nme_class, fr_auc_class = official.metrics(src.official)
  ref = _load(src, 'metrics.npz')
  arrays = {}
  for dataset in DATASETS:
    gt, pred = ref[f'{dataset}/gt'], ref[f'{dataset}/pred']
    arrays[f'{dataset}/gt'], arrays[f'{dataset}/pred'] = gt[:16], pred[:16]
    for norm in ('ocular', 'pupil'):
      cfg = official.config(src.official, dataset, norm_type=norm)
      nmes = nme_class(cfg.nme_left_index, cfg.nme_right_index).test(torch.from_numpy(pred), torch.from_numpy(gt))
      fr_auc = fr_auc_class(cfg.data_definition)
      fr, auc = fr_auc.test(np.asarray(nmes))
      arrays[f'{dataset}/{norm}/nme_per_image'] = np.asarray(nmes, np.float64)
      arrays[f'{dataset}/{norm}/fr'] = np.float64(fr)
      arrays[f'{dataset}/{norm}/auc'] = np.float64(auc)
      arrays[f'{dataset}/{norm}/threshold'] = np.float64(fr_auc.thresh)
  _save_npz(out / 'metrics_reference.npz', arrays)


# ---- targets_golden.npz -------------------------------------------------------------------------------

def make_targets(src: Sources, out: pathlib.Path) -> None:
  from benchmarks import official  # pylint: disable=import-outside-toplevel
  torch = _torch()
  dataset_module = official.alignment_dataset(src.official)
  augmentation = official.module(src.official, 'lib.dataset.augmentation')
  encoder = official.module(src.official, 'lib.dataset.encoder.encoder_default').encoder_default(256, 256)
  ref = _load(src, 'targets.npz')
  arrays = {}
  for dataset in DATASETS:
    cfg = official.config(src.official, dataset)
    # The dataset's methods that make the targets read only these attributes; its __init__ reads a TSV.
    targets = object.__new__(dataset_module.AlignmentDataset)
    targets.image_height = targets.image_width = 256
    targets.edge_info = cfg.edge_info
    landmarks_256 = ref[f'{dataset}/landmarks_256']
    arrays[f'{dataset}/landmarks_256'] = landmarks_256
    arrays[f'{dataset}/pointmaps'] = np.stack([encoder.generate_heatmap(p).numpy() for p in landmarks_256])
    arrays[f'{dataset}/edgemaps'] = np.stack([targets._generate_edgemap(p).numpy() for p in landmarks_256])  # pylint: disable=protected-access
    arrays[f'{dataset}/normalized'] = np.stack([
        targets._norm_points(torch.from_numpy(p), 256, 256).numpy() for p in landmarks_256])  # pylint: disable=protected-access

    # The test-time crop, as AlignmentDataset (crop_op, is_train False) builds its Augmentation.
    image, landmarks = ref[f'{dataset}/crop/image'], ref[f'{dataset}/crop/landmarks']
    scale, center_w, center_h = (_text_float(v) for v in ref[f'{dataset}/crop/scale_center'])
    crop = augmentation.Augmentation(is_train=False, aug_prob=0.0, image_size=256, crop_op=True,
                                     target_face_scale=1.0, flip_mapping=cfg.flip_mapping)
    out_image, out_landmarks, matrix = crop.process(image, landmarks, None, scale, center_w, center_h)
    if dataset == 'WFLW':                     # the tests keep WFLW's images only
      arrays[f'{dataset}/crop/image'] = image
    arrays[f'{dataset}/crop/landmarks'] = landmarks
    arrays[f'{dataset}/crop/scale_center'] = ref[f'{dataset}/crop/scale_center']
    arrays[f'{dataset}/crop/matrix'] = matrix
    if dataset == 'WFLW':
      arrays[f'{dataset}/crop/out_image'] = out_image
    arrays[f'{dataset}/crop/out_landmarks'] = out_landmarks

    flip = augmentation.Flip(cfg.flip_mapping, 1.0)    # rate 1: always flips
    _, flipped, _, flipped_w, _ = flip.process(np.zeros((300, 400, 3), np.uint8), landmarks, None, center_w, center_h)
    arrays[f'{dataset}/flip/landmarks'] = flipped
    arrays[f'{dataset}/flip/center_w'] = np.float32(flipped_w)

  draws = ref['geometry/draws_shiftx_shifty_angle_scale']
  matrices = []
  for draw in draws.astype(np.float64):
    # Augmentation's own GetRandomGeometryMatrix, with its draws (shift in units of the crop side, angle
    # in radians, scale) given instead of drawn.
    geometry = augmentation.GetRandomGeometryMatrix(
        target_shape=(256, 256), from_shape=(256, 256), shift_sigma=0.05, rot_sigma=np.pi / 180 * 18,
        scale_sigma=0.1, align_corners=True)
    given = iter([draw[:2], draw[2], draw[3]])
    geometry._random = lambda mu_sigma_normal, size=None, given=given: next(given)  # pylint: disable=protected-access
    matrices.append(geometry.process())
  arrays['geometry/draws_shiftx_shifty_angle_scale'] = draws
  arrays['geometry/matrices'] = np.stack(matrices)
  _save_npz(out / 'targets_golden.npz', arrays)


# ---- tiny_outputs.npz ---------------------------------------------------------------------------------

def _tiny_network(src: Sources, dataset: str, state_dict, dtype):
  from benchmarks import official  # pylint: disable=import-outside-toplevel
  cfg = official.config(src.official, dataset, width=64, height=64)
  net = official.network_class(src.official)(config=cfg, classes_num=cfg.classes_num, edge_info=cfg.edge_info,
                                             nstack=4, nlevels=4, in_channel=32, add_coord=cfg.add_coord,
                                             decoder_type=cfg.decoder_type)
  net.load_state_dict(state_dict)
  return net.to(dtype)


def make_tiny_outputs(src: Sources, out: pathlib.Path) -> None:
  from benchmarks import official  # pylint: disable=import-outside-toplevel
  torch = _torch()
  ref = _load(src, 'tiny_model.npz')
  inputs = {d: ref[f'{d}/input_nchw'] for d in TINY_DATASETS}
  if not np.array_equal(inputs['WFLW'], inputs['COFW']):
    raise cli.UserError('tiny_model.npz: the WFLW and COFW inputs differ; tiny_outputs.npz keeps one input')
  arrays = {'input_nchw': inputs['WFLW']}
  for dataset in TINY_DATASETS:
    state_dict = torch.load(_input(src.reference, f'tiny_{dataset.lower()}_checkpoint.pkl'), weights_only=True)['net']
    step = TINY_POINT_STEP[dataset]
    for mode in ('eval', 'train'):
      outputs = {}
      for precision, dtype in (('f64', torch.float64), ('f32', torch.float32)):
        net = _tiny_network(src, dataset, state_dict, dtype)
        getattr(net, mode)()
        # float64 throughout (official.pure64: the coordinate grids and CoordConv channels too).
        with torch.no_grad(), official.pure64() if dtype == torch.float64 else contextlib.nullcontext():
          maps, fusion, _ = net(torch.from_numpy(inputs[dataset]).to(dtype))
        outputs[precision] = [{'landmarks': maps[3 * i], 'pointmaps': maps[3 * i + 1], 'edgemaps': maps[3 * i + 2],
                               'fusion_heatmaps': fusion[i]} for i in range(4)]
      for i in range(4):
        keep_maps = {'f64': mode == 'train' and i == 1, 'f32': i == 0 or (mode == 'eval' and i == 3)}
        for name in ('landmarks', 'pointmaps', 'edgemaps', 'fusion_heatmaps'):
          for precision in ('f64', 'f32'):
            value = outputs[precision][i][name].numpy()
            if name != 'landmarks':
              if not keep_maps[precision]:
                continue
              value = value[:, ::3 if name == 'edgemaps' else step].astype(np.float32)
            arrays[f'{dataset}/{precision}/{mode}/stack{i}/{name}'] = value
  _save_npz(out / 'tiny_outputs.npz', arrays)


# ---- tiny_official_layouts.json.gz --------------------------------------------------------------------

def make_layouts(src: Sources, out: pathlib.Path) -> None:
  from benchmarks import official  # pylint: disable=import-outside-toplevel
  _torch()
  layouts = {}
  for dataset in DATASETS:
    cfg = official.config(src.official, dataset)
    # The official get_net's arguments (nlevels and in_channel at their defaults: 4 and 256).
    net = official.network_class(src.official)(config=cfg, classes_num=cfg.classes_num, edge_info=cfg.edge_info,
                                               nstack=cfg.nstack, add_coord=cfg.add_coord,
                                               decoder_type=cfg.decoder_type)
    layouts[dataset] = {
        'classes_num': list(cfg.classes_num), 'nstack': cfg.nstack,
        'num_params': sum(p.numel() for p in net.parameters()),
        'state_dict': [[key, list(value.shape), str(value.dtype).replace('torch.', '')]
                       for key, value in net.state_dict().items()]}
  with open(out / 'tiny_official_layouts.json.gz', 'wb') as f:
    with gzip.GzipFile(filename='', mode='wb', fileobj=f, mtime=0) as z:
      z.write(json.dumps(layouts, indent=0).encode())


# ---- tiny_{wflw,cofw}_checkpoint.pkl ------------------------------------------------------------------

def make_checkpoints(src: Sources, out: pathlib.Path) -> None:
  torch = _torch()
  ref = _load(src, 'tiny_model.npz')
  for dataset in TINY_DATASETS:
    path = _input(src.reference, f'tiny_{dataset.lower()}_checkpoint.pkl')
    checkpoint = torch.load(path, weights_only=True)
    recorded = {k.split('/', 2)[2]: ref[k] for k in ref if k.startswith(f'{dataset}/state_dict/')}
    net = checkpoint['net']
    # tiny_model.npz recorded its state_dict after its train-mode pass, which moved the BatchNorm
    # statistics once (num_batches_tracked 0 -> 1): the parameters must be equal, the buffers need not.
    parameters = [k for k in net if not k.endswith(('running_mean', 'running_var', 'num_batches_tracked'))]
    problems = []
    if net.keys() != recorded.keys():
      problems.append(f"'net' has other keys than tiny_model.npz's {dataset}/state_dict")
    elif any(not np.array_equal(net[k].numpy(), recorded[k]) for k in parameters):
      problems.append(f"the parameters of 'net' are not tiny_model.npz's {dataset}/state_dict")
    if checkpoint['net_ema'].keys() != net.keys() or any(not torch.equal(checkpoint['net_ema'][k], net[k]) for k in net):
      problems.append("'net_ema' is not 'net'")
    if checkpoint.get('epoch') != 7:
      problems.append(f'epoch {checkpoint.get("epoch")}, expected 7')
    if problems:
      raise cli.UserError(f'{path}: {"; ".join(problems)}')
    shutil.copyfile(path, out / path.name)


# ---- real_faces/* and real_faces_full/* ---------------------------------------------------------------

def _moved_pts(text: str, scale_x: float, scale_y: float) -> str:
  """An iBUG .pts file's text with its (1-based) points scaled about pixel centres."""
  lines = text.strip('\n').split('\n')
  if '{' not in lines or '}' not in lines:
    raise cli.UserError('a .pts file without its { ... } block of points')
  start, end = lines.index('{') + 1, lines.index('}')
  points = np.array([[float(v) for v in line.split()] for line in lines[start:end]])
  points = (points - 0.5) * np.array([scale_x, scale_y]) + 0.5
  body = [f'{x:.6f} {y:.6f}' for x, y in points]
  return '\n'.join(lines[:start] + body + lines[end:]) + '\n'


def make_real_faces(src: Sources, out: pathlib.Path) -> None:
  import cv2  # pylint: disable=import-outside-toplevel
  (out / 'real_faces').mkdir(exist_ok=True)
  for name, ext, factor, out_ext in FACES:
    path = _input(src.faces, f'{name}{ext}', '--faces')
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
      raise cli.UserError(f'OpenCV cannot read {path}')
    h, w = image.shape[:2]
    small = cv2.resize(image, (w // factor, h // factor), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(out_ext, small, [cv2.IMWRITE_JPEG_QUALITY, 90] if out_ext == '.jpg' else [])
    assert ok
    (out / 'real_faces' / f'{name}{out_ext}').write_bytes(encoded.tobytes())
    pts = _moved_pts(_input(src.faces, f'{name}.pts', '--faces').read_text(), (w // factor) / w, (h // factor) / h)
    (out / 'real_faces' / f'{name}.pts').write_text(pts)


def make_real_faces_full(src: Sources, out: pathlib.Path) -> None:
  import cv2  # pylint: disable=import-outside-toplevel
  (out / 'real_faces_full').mkdir(exist_ok=True)
  for name, ext, _, out_ext in FACES:
    path = _input(src.faces, f'{name}{ext}', '--faces')
    if ext == out_ext:
      data = path.read_bytes()
    else:  # takeo.ppm: the same pixels as a PNG (browsers and viewers show it)
      image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
      if image is None:
        raise cli.UserError(f'OpenCV cannot read {path}')
      ok, encoded = cv2.imencode(out_ext, image)
      assert ok
      data = encoded.tobytes()
    (out / 'real_faces_full' / f'{name}{out_ext}').write_bytes(data)
    (out / 'real_faces_full' / f'{name}.pts').write_bytes(_input(src.faces, f'{name}.pts', '--faces').read_bytes())


EXACT = 0.0
# --check's tolerances: inputs bit-equal; outputs within the tolerance at which the tests compare with
# them (the tests named), so that a rebuilt file would give the tests' verdicts the committed one gives.
GOLDENS = {
    'losses': Golden(('losses_star_reference.npz',), True, make_losses, (
        ('*/heatmap', 'exact', EXACT), ('*/target', 'exact', EXACT), ('h16/awing/pred', 'exact', EXACT),
        ('*', 'rel', 1e-5))),                     # test_losses: rtol 1e-5, gradients' floor 1e-5 x max
    'loss_hard_cases': Golden(('losses_hard_cases.npz',), True, make_loss_hard_cases, (
        ('star/heatmap', 'exact', EXACT), ('star/target', 'exact', EXACT), ('star/case_names', 'exact', EXACT),
        ('awing/pred', 'exact', EXACT), ('awing/target', 'exact', EXACT), ('awing/*', 'rel', 1e-13),
        ('*sensitivity', 'unread', EXACT),      # rounding itself: they only widen test_losses' tolerances
        ('*', 'rel', 1e-12))),
    'metrics': Golden(('metrics_reference.npz',), True, make_metrics, (
        ('*/gt', 'exact', EXACT), ('*/pred', 'exact', EXACT), ('*/threshold', 'exact', EXACT),
        ('*', 'abs', 1e-9))),                     # test_metrics: NME, FR, AUC to 1e-9
    'targets': Golden(('targets_golden.npz',), True, make_targets, (
        ('*/landmarks_256', 'exact', EXACT), ('*/crop/image', 'exact', EXACT), ('*/crop/landmarks', 'exact', EXACT),
        ('*/crop/scale_center', 'exact', EXACT), ('geometry/draws_*', 'exact', EXACT),
        ('*/normalized', 'abs', 1e-6), ('*/pointmaps', 'abs', 1e-5), ('*/edgemaps', 'abs', 1e-6),   # test_targets
        ('*/crop/matrix', 'abs', 1e-5), ('*/crop/out_landmarks', 'abs', 1e-4),                      # test_transforms
        ('*/crop/out_image', 'abs', 4), ('*/flip/landmarks', 'exact', EXACT), ('*/flip/center_w', 'rel', 1e-6),
        ('geometry/matrices', 'abs', 1e-5))),
    'tiny_outputs': Golden(('tiny_outputs.npz',), True, make_tiny_outputs, (   # test_model
        ('input_nchw', 'exact', EXACT),
        ('*/f32/eval/*/landmarks', 'abs', 1e-5), ('*/f32/eval/*', 'abs', 1e-4), ('*/f32/train/stack0/*', 'abs', 1e-4),
        ('*/f32/train/*', 'unread', EXACT), ('*/f64/eval/*', 'abs', 1e-12),
        ('*/f64/train/stack[01]/landmarks', 'abs', 1e-11), ('*/f64/train/stack1/*', 'abs', 1e-7),
        ('*/f64/train/*', 'abs', 1e-8))),
    'layouts': Golden(('tiny_official_layouts.json.gz',), True, make_layouts),
    'checkpoints': Golden(('tiny_wflw_checkpoint.pkl', 'tiny_cofw_checkpoint.pkl'), True, make_checkpoints),
    'real_faces': Golden(tuple(f'real_faces/{n}{e}' for n, _, _, e in FACES) + tuple(f'real_faces/{n}.pts' for n, *_ in FACES),
                         False, make_real_faces),
    'real_faces_full': Golden(tuple(f'real_faces_full/{n}{e}' for n, _, _, e in FACES)
                              + tuple(f'real_faces_full/{n}.pts' for n, *_ in FACES), False, make_real_faces_full),
}


def make_train_step(src: Sources, out: pathlib.Path) -> None:
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location('make_train_step_golden', REPO / 'scripts' / 'make_train_step_golden.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if module.main(['make_train_step_golden.py', '--reference', str(_input(src.reference, 'train_step.npz')),
                  '--output', str(out / 'train_step_golden.npz')]):
    raise cli.UserError('make_train_step_golden.py failed (see above)')


GOLDENS['train_step'] = Golden(('train_step_golden.npz',), True, make_train_step, (
    # The radius channels come from PyTorch's float32 sqrt, whose last bit depends on the CPU's MKL
    # (make_train_step_golden.py's docstring); the digest covers them, so it follows them.
    ('coordconv/*', 'abs', 3e-7), ('sha256', 'unread', EXACT)))


def _script(name: str):
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.spec_from_file_location(name, REPO / 'scripts' / f'{name}.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


DRAW_SEEDS = (21,)


def make_train_step_draws(src: Sources, out: pathlib.Path) -> None:
  for seed in DRAW_SEEDS:
    if _script('make_train_step_draw').main(['make_train_step_draw.py', '--official', str(src.official), '--seed',
                                             str(seed), '--output', str(out / f'train_step_s{seed}_pure64.npz')]):
      raise cli.UserError(f'make_train_step_draw.py --seed {seed} failed (see above)')


def make_train_step_self_agreement(src: Sources, out: pathlib.Path) -> None:
  files = [str(_input(src.reference, name)) for name in ('train_step.npz', 'train_step_s13_pure64.npz')]
  if _script('make_train_step_draw').main(['make_train_step_draw.py', '--official', str(src.official), '--remeasure',
                                           ','.join(files), '--output', str(out / 'train_step_self_agreement.json')]):
    raise cli.UserError('make_train_step_draw.py --remeasure failed (see above)')


def _check_train_step_draw(got: pathlib.Path, want: pathlib.Path) -> bool:
  """A rebuilt draw against the committed one: the same inputs, and every group within ten times the
  official step's self-agreement (a rebuild is one more run of the official step)."""
  fmt = _script('make_train_step_golden')
  with np.load(got) as g, np.load(want) as w:
    rebuilt, committed = fmt.decode(dict(g)), fmt.decode(dict(w))
  if fmt.draw_digest(rebuilt) != fmt.draw_digest(committed):
    print('  inputs (initial weights, batches, targets) differ  MISMATCH')
    return False
  print('  inputs bit-equal')
  ok = True
  for group, values in sorted(fmt.compare(committed, rebuilt).items()):
    if group.endswith('/null'):
      continue
    limit = max(10 * float(committed.get(f'self_agreement/{group}', 0.0)), 1e-12)
    good = values[0][0] <= limit
    ok &= good
    print(f'  {group:16s} max {values[0][0]:.2e} (tolerance 10 x self-agreement = {limit:.2e}){"" if good else "  MISMATCH"}')
  return ok


def _check_self_agreement(got: pathlib.Path, want: pathlib.Path) -> bool:
  """A rebuilt self-agreement file: the same draws, each group within a factor of ten."""
  rebuilt, committed = json.loads(got.read_text()), json.loads(want.read_text())
  ok = set(rebuilt) == set(committed)
  for name in sorted(set(rebuilt) & set(committed)):
    a, b = rebuilt[name], committed[name]
    same_draw = a['draw_digest'] == b['draw_digest'] and a['pure64'] == b['pure64']
    ok &= same_draw
    print(f'  {name}: {"the same draw" if same_draw else "another draw  MISMATCH"}')
    for group in sorted(b['self_agreement']):
      x, y = a['self_agreement'].get(group, np.inf), b['self_agreement'][group]
      good = (x <= 1e-15 and y <= 1e-15) or (y / 10 <= x <= 10 * y)
      ok &= good
      print(f'    {group:16s} {x:.2e} vs {y:.2e}{"" if good else "  MISMATCH"}')
  return ok


GOLDENS['train_step_draws'] = Golden(tuple(f'train_step_s{seed}_pure64.npz' for seed in DRAW_SEEDS), True,
                                     make_train_step_draws, check=_check_train_step_draw)
GOLDENS['train_step_self_agreement'] = Golden(('train_step_self_agreement.json',), True,
                                              make_train_step_self_agreement, check=_check_self_agreement)


# ---- --check ------------------------------------------------------------------------------------------

def _tolerance(key: str, expected: np.ndarray, tolerances) -> tuple[str, float, str]:
  """(kind, largest allowed |difference|, how it was set) for one array of a rebuilt npz."""
  kind, value = next(((k, v) for pattern, k, v in tolerances if fnmatch.fnmatchcase(key, pattern)), ('exact', EXACT))
  if kind == 'rel':
    scale = float(np.nanmax(np.abs(expected))) if expected.size else 0.0
    return kind, value * scale, f'{value:g} x max {scale:.3g}'
  return kind, value, {'exact': 'bit-equal', 'unread': 'not read by the tests: reported only'}.get(kind, f'{value:g}')


def _compare_npz(got_path: pathlib.Path, want_path: pathlib.Path, tolerances) -> bool:
  with np.load(got_path) as g, np.load(want_path) as w:
    got, want = dict(g), dict(w)
  ok = True
  for key in list(want) + [k for k in got if k not in want]:
    if key not in got or key not in want:
      print(f'  {key:40s} MISMATCH: only in the {"rebuilt" if key in got else "committed"} file')
      ok = False
      continue
    a, b = got[key], want[key]
    if a.shape != b.shape or a.dtype != b.dtype:
      print(f'  {key:40s} MISMATCH: rebuilt {a.dtype}{list(a.shape)}, committed {b.dtype}{list(b.shape)}')
      ok = False
      continue
    kind, tol, how = _tolerance(key, b, tolerances)
    equal = np.array_equal(a, b, equal_nan=a.dtype.kind == 'f')
    if a.dtype.kind not in 'biuf':   # text entries: equal or not
      good = equal or kind == 'unread'
      ok &= good
      print(f'  {key:40s} {"equal" if equal else "differs":22s}{"" if good else "  MISMATCH"}')
      continue
    # NaN where the official code gives NaN (a zero covariance's eigenvector gradient): it must stay NaN.
    same_nan = np.array_equal(np.isnan(a), np.isnan(b)) if a.dtype.kind == 'f' else True
    finite = ~np.isnan(a) if a.dtype.kind == 'f' else np.ones(a.shape, bool)
    diff = float(np.abs(a[finite].astype(np.float64) - b[finite].astype(np.float64)).max()) if finite.any() else 0.0
    diff = diff if same_nan else np.inf
    good = equal or kind == 'unread' or (kind != 'exact' and diff <= tol)
    ok &= good
    what = 'bit-equal' if equal else f'max |diff| {diff:.3g}'
    print(f'  {key:40s} {what:22s} (tolerance {how}){"" if good else "  MISMATCH"}')
  return ok


def _compare(file: str, got: pathlib.Path, want: pathlib.Path, tolerances) -> bool:
  print(file)
  if not want.exists():
    print('  MISMATCH: no committed file')
    return False
  if file.endswith('.npz'):
    return _compare_npz(got, want, tolerances)
  if file.endswith('.json.gz'):
    same = gzip.decompress(got.read_bytes()) == gzip.decompress(want.read_bytes())
    note = '' if got.read_bytes() == want.read_bytes() else ' (the gzip files differ in their headers only)'
    print(f'  JSON text {"bit-equal" + note if same else "differs  MISMATCH"}')
    return same
  same = got.read_bytes() == want.read_bytes()
  print(f'  {"bit-equal" if same else "bytes differ  MISMATCH"}')
  return same


# ---- The command --------------------------------------------------------------------------------------

def _check_torch() -> None:
  try:
    import torch  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise cli.UserError('PyTorch is not installed (pip install torch); it runs the official code. '
                        'Only --only real_faces,real_faces_full works without it.') from None


def _make_test_data(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_string('official', None, 'checkout of the official PyTorch STAR code (github ZhenglinZhou/STAR)',
                      flag_values=fv)
  flags.DEFINE_string('reference', None, 'folder of the shared reference arrays (losses.npz, metrics.npz, '
                      'targets.npz, tiny_model.npz, tiny_*_checkpoint.pkl)', flag_values=fv)
  flags.DEFINE_string('faces', None, 'folder of the full-size real faces (default <reference>/../data/real_faces)',
                      flag_values=fv)
  flags.DEFINE_string('output', str(REPO / 'tests' / 'testdata'), 'where the files go; with --check, the files to '
                      'compare with', flag_values=fv)
  flags.DEFINE_list('only', list(GOLDENS), f'which files to make: {", ".join(GOLDENS)}', flag_values=fv)
  flags.DEFINE_bool('check', False, 'rebuild into a temporary folder and compare with --output; exit status 1 '
                    'on a difference beyond tolerance', flag_values=fv)
  if command.parse():
    raise flags.Error('no positional arguments are taken')
  unknown = [n for n in fv.only if n not in GOLDENS]
  if unknown:
    raise flags.Error(f'--only: unknown {", ".join(unknown)}; choose from {", ".join(GOLDENS)}')
  selected = {n: GOLDENS[n] for n in GOLDENS if n in fv.only}
  needs_torch = any(g.needs_torch for g in selected.values())
  if needs_torch:
    command.require('official', 'reference')
  elif not (fv.faces or fv.reference):
    raise flags.Error('--faces or --reference is required')
  reference = pathlib.Path(fv.reference or '.').expanduser()
  if fv.reference and not reference.is_dir():
    raise cli.UserError(f'--reference {fv.reference} is not a folder')
  faces = pathlib.Path(fv.faces).expanduser() if fv.faces else reference.parent / 'data' / 'real_faces'
  if needs_torch:
    from benchmarks import official  # pylint: disable=import-outside-toplevel
    try:
      official.check_checkout(fv.official)
    except FileNotFoundError as e:
      raise cli.UserError(f'--official: {e}') from None
    _check_torch()
  sources = Sources(fv.official, reference, faces)
  output = pathlib.Path(fv.output)

  with contextlib.ExitStack() as stack:
    folder = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory())) if fv.check else output
    folder.mkdir(parents=True, exist_ok=True)
    for golden in selected.values():
      print(f'making {", ".join(golden.files)} ...', flush=True)
      golden.make(sources, folder)
    if not fv.check:
      return 0
    print()
    ok = True
    for golden in selected.values():
      for file in golden.files:
        if golden.check is not None and (output / file).exists():
          print(file)
          ok &= golden.check(folder / file, output / file)
        else:
          ok &= _compare(file, folder / file, output / file, golden.tolerances)
    print(f'\n{"all within tolerance" if ok else "MISMATCH: some files differ beyond tolerance"}')
    return 0 if ok else 1


def main(argv=None) -> int:
  return cli.guarded(_make_test_data, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
