"""Training losses of STAR: the STAR loss (v2 and v1), Adaptive Wing, coordinate baselines, and the
multi-stack combination used to train the stacked hourglass.

Conventions: as star_jax/models/decoding.py (channels-last heatmaps (B, H, W, N); landmarks (B, N, 2)
as (x, y) in [-1, 1] on the align-corners grid of the heatmap).

Every function here is pure and jit-able; string / float options (`dist`, `eig_clamp`, `loss_cfg`) are
static Python values, so wrap calls in `functools.partial` before `jax.jit`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp

from star_jax.models.decoding import check_heatmaps
from star_jax.models.decoding import heatmap_moments

# Official SmoothL1Loss switches from quadratic to linear at this distance (lib/loss/smoothL1Loss.py).
SMOOTH_L1_SCALE = 0.01
# A float32 2x2 covariance whose eigenvalue gap is below this fraction of its mean eigenvalue (about 84
# epsilons) is isotropic up to the rounding of its computation: its eigenvectors are noise, so
# `eigh_2x2` pins them (see there). Other dtypes: the same number of their epsilons (float64: 1.9e-14).
_ISOTROPIC_RTOL_FLOAT32 = 1e-5
# STAR's eigenvectors of isotropic covariances: 'pin' (the default, above) or 'official' (as LAPACK
# returns them: never pinned, except where the gap is exactly zero).
ISOTROPIC = ('pin', 'official')

# Official WingLoss (lib/loss/wingLoss.py): logarithmic below OMEGA, linear above.
WING_OMEGA = 0.01
WING_EPSILON = 2.0

DISTANCES = ('smoothl1', 'l1', 'l2', 'wing')
LANDMARK_LOSSES = ('star', 'star_v1', 'l1', 'l2', 'smoothl1', 'none')


# ------------------------------------------------------------------------------------------------
# Closed-form eigendecomposition of symmetric 2x2 matrices
# ------------------------------------------------------------------------------------------------

def isotropic_rtol(dtype, isotropic: str = 'pin') -> float:
  """The relative eigenvalue gap below which `eigh_2x2` pins eigenvectors, for covariances of `dtype`:
  1e-5 in float32, 1.9e-14 in float64 (`_ISOTROPIC_RTOL_FLOAT32`, in epsilons); 0 for isotropic='official'."""
  if isotropic not in ISOTROPIC:
    raise ValueError(f'isotropic must be one of {ISOTROPIC}, got {isotropic!r}')
  if isotropic == 'official':
    return 0.0
  eps = jnp.finfo(jnp.promote_types(dtype, jnp.float32)).eps
  return _ISOTROPIC_RTOL_FLOAT32 * float(eps / jnp.finfo(jnp.float32).eps)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def eigh_2x2(cov: jnp.ndarray, rtol: float | None = None):
  """Eigendecomposition of symmetric 2x2 matrices, closed form and differentiable everywhere.

  For [[a, b], [b, c]] with m = (a + c) / 2, d = (a - c) / 2 and r = sqrt(d^2 + b^2) the eigenvalues
  are m - r and m + r, and the major eigenvector is (d + r, b) / sqrt(2 r (r + d)) when d >= 0, else
  (b, r - d) / sqrt(2 r (r - d)): no cancellation in either branch, and only sqrt and division
  (no trigonometry, which XLA evaluates less accurately inside fused loops).

  Replaces the official per-step copy of every covariance to the CPU for LAPACK `eigh`. Unlike
  LAPACK-based `eigh` its gradient stays finite for equal eigenvalues: when the gap r is (numerically)
  zero the eigenvectors are pinned to the coordinate axes with zero derivative (what LAPACK returns for
  an isotropic matrix too). "Numerically zero" is relative: a half-gap r at most `rtol` times the mean
  eigenvalue; by default (None) `isotropic_rtol(cov.dtype)`, 1e-5 in float32 and 1.9e-14 in float64,
  about 84 epsilons (the covariance's own rounding). rtol=0 pins only an exactly zero gap, where
  LAPACK's gradient is infinite or NaN; elsewhere its eigenvectors and their derivatives are LAPACK's
  (up to sign), however ill-conditioned.

  Derivatives are the analytic ones (a custom JVP): r' = (d d' + b b') / r and, for the eigenvector
  angle t, t' = (d b' - b d') / (2 r^2). Autodiff through the formula above would take the difference
  of large O(1 / r) terms and lose ~40x more precision for nearly equal eigenvalues.

  Args:
    cov: (..., 2, 2) symmetric (only cov[..., 0, 1] is read off the diagonal).
    rtol: see above (a static float).
  Returns:
    evalues (..., 2) in ascending order, as `jnp.linalg.eigh`;
    evectors (..., 2, 2) whose COLUMNS are the unit eigenvectors: cov @ evectors = evectors * evalues.
    Their signs are arbitrary; callers must index columns, not rows.
  """
  mean, d, b, r, anisotropic = _eigh_2x2_parts(cov, rtol)
  big = r + jnp.abs(d)                      # >= r: the well-conditioned component
  # The major eigenvector's direction, then normalised by its own length (scaled to at most 1 first):
  # unit even where r is at the rounding of the covariance (rtol 0), where XLA may compute r and d in
  # separate fusions that round differently, so that sqrt(2 r big) would not be its length.
  vx, vy = jnp.where(d >= 0, big, b), jnp.where(d >= 0, b, big)
  scale = jnp.where(anisotropic, jnp.maximum(jnp.abs(vx), jnp.abs(vy)), 1.0)
  vx, vy = vx / scale, vy / scale
  inv_norm = 1.0 / jnp.sqrt(jnp.where(anisotropic, vx * vx + vy * vy, 1.0))
  major_x = jnp.where(anisotropic, vx * inv_norm, 1.0)
  major_y = jnp.where(anisotropic, vy * inv_norm, 0.0)
  evalues = _eigenvalues_2x2(cov, mean, r)
  minor = jnp.stack([-major_y, major_x], axis=-1)   # eigenvector of mean - r
  major = jnp.stack([major_x, major_y], axis=-1)    # eigenvector of mean + r
  evectors = jnp.stack([minor, major], axis=-1)     # columns
  return evalues, evectors


def _eigenvalues_2x2(cov, mean, r):
  """(..., 2) ascending eigenvalues of symmetric 2x2 matrices, as LAPACK's dlae2 computes them: the one
  of larger magnitude as mean +- r, the other as the determinant divided by it. m - r would cancel for
  a nearly singular matrix (a map on one row or line: its small eigenvalue is 0 up to rounding, whose
  sign matters to the restriction's |eigenvalue|); the determinant form keeps it at its relative
  accuracy, and exactly 0 where LAPACK gives 0."""
  a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
  positive = mean >= 0
  large = jnp.where(positive, mean + r, mean - r)
  nonzero = large != 0
  safe = jnp.where(nonzero, large, 1.0)
  a_larger = jnp.abs(a) > jnp.abs(c)
  acmx, acmn = jnp.where(a_larger, a, c), jnp.where(a_larger, c, a)
  small = jnp.where(nonzero, (acmx / safe) * acmn - (b / safe) * b, 0.0)
  return jnp.stack([jnp.where(positive, small, large), jnp.where(positive, large, small)], axis=-1)


def _eigh_2x2_parts(cov, rtol):
  """(m, d, b, r, anisotropic) of symmetric 2x2 matrices [[m + d, b], [b, m - d]], r = sqrt(d^2 + b^2)."""
  a, b, c = cov[..., 0, 0], cov[..., 0, 1], cov[..., 1, 1]
  d = 0.5 * (a - c)
  mean = 0.5 * (a + c)
  r = jnp.sqrt(d * d + b * b)
  if rtol is None:
    rtol = isotropic_rtol(cov.dtype)
  # Eigenvectors of a (numerically) isotropic matrix are arbitrary and their derivative ~ 1 / r would
  # only amplify rounding noise: there they are the axes, with zero derivative. The relative test also
  # covers the all-zero matrix (r = m = 0).
  return mean, d, b, r, r > rtol * jnp.abs(mean)


@eigh_2x2.defjvp
def _eigh_2x2_jvp(rtol, primals, tangents):
  (cov,), (cov_dot,) = primals, tangents
  evalues, evectors = eigh_2x2(cov, rtol)
  _, d, b, r, anisotropic = _eigh_2x2_parts(cov, rtol)
  d_dot = 0.5 * (cov_dot[..., 0, 0] - cov_dot[..., 1, 1])
  m_dot = 0.5 * (cov_dot[..., 0, 0] + cov_dot[..., 1, 1])
  b_dot = cov_dot[..., 0, 1]       # the primal reads only the upper off-diagonal entry
  positive = r > 0
  safe_r = jnp.where(positive, r, 1.0)
  r_dot = jnp.where(positive, (d * d_dot + b * b_dot) / safe_r, 0.0)
  angle_dot = jnp.where(anisotropic, (d * b_dot - b * d_dot) / (2.0 * safe_r * safe_r), 0.0)
  evalues_dot = jnp.stack([m_dot - r_dot, m_dot + r_dot], axis=-1)
  # Rotating by t': the major column moves along the minor one, the minor column along -major.
  minor, major = evectors[..., 0], evectors[..., 1]
  evectors_dot = jnp.stack([-major, minor], axis=-1) * angle_dot[..., None, None]
  return (evalues, evectors), (evalues_dot, evectors_dot)


# ------------------------------------------------------------------------------------------------
# Distances
# ------------------------------------------------------------------------------------------------

def smooth_l1(delta2: jnp.ndarray, scale: float = SMOOTH_L1_SCALE) -> jnp.ndarray:
  """The official SmoothL1Loss of a squared distance `delta2`, elementwise (no reduction).

  0.5 / scale * d^2 for d < scale, else d - 0.5 * scale (d = sqrt(delta2), clamped at 1e-3 as the
  official code does so the unused branch's derivative stays finite).
  """
  delta = jnp.sqrt(jnp.maximum(delta2, 1e-6))
  return jnp.where(delta2 < scale * scale, 0.5 / scale * delta2, delta - 0.5 * scale)


def wing(delta2: jnp.ndarray, omega: float = WING_OMEGA, epsilon: float = WING_EPSILON) -> jnp.ndarray:
  """The official WingLoss of a squared distance `delta2`, elementwise (no reduction).

  omega * log(1 + d / epsilon) for d < omega, else d - C with C = omega - omega * log(1 + omega /
  epsilon) (the official constants; d = sqrt(delta2) clamped at 1e-3 as the official code does).
  """
  delta = jnp.sqrt(jnp.maximum(delta2, 1e-6))
  c = omega - omega * math.log(1.0 + omega / epsilon)
  return jnp.where(delta < omega, omega * jnp.log1p(delta / epsilon), delta - c)


def abs_official(x: jnp.ndarray) -> jnp.ndarray:
  """|x| with derivative sign(x), 0 at x = 0, as PyTorch's abs and F.l1_loss differentiate it (jnp.abs's
  derivative at 0 is 1): for a zero error under 'l1', an eigenvalue exactly 0 in the restriction."""
  return x * jnp.sign(x)


def eigenvalue_restriction(evalues: jnp.ndarray) -> jnp.ndarray:
  """STAR's restriction |evalue_0| + |evalue_1|: (..., 2) -> (...).

  |e| has a kink at 0, where a singular covariance (a map on one row, one line, one pixel) puts its
  small eigenvalue; computed, that eigenvalue is 0 or +-1e-17, by the covariance's rounding, and the
  derivative sign(e) follows the rounding (the official code's LAPACK eigenvalue is exactly 0 on such
  maps, and PyTorch's abs has derivative 0 at 0). So an eigenvalue within the rounding of zero, |e| at
  most `isotropic_rtol` (about 84 epsilons) of the larger |e|, gets the derivative 0; its value is kept.
  """
  size = abs_official(evalues)
  rtol = isotropic_rtol(evalues.dtype)
  zero = size <= rtol * jax.lax.stop_gradient(size.max(-1, keepdims=True))
  return jnp.where(zero, jax.lax.stop_gradient(size), size).sum(-1)


def _scalar_distance(x: jnp.ndarray, dist: str) -> jnp.ndarray:
  """Distance of scalar errors `x` from 0, elementwise: smooth-L1, |x|, x^2 or Wing."""
  if dist == 'smoothl1':
    return smooth_l1(jnp.square(x))
  if dist == 'l1':
    return abs_official(x)
  if dist == 'l2':
    return jnp.square(x)
  if dist == 'wing':
    return wing(jnp.square(x))
  raise ValueError(f'STAR distance must be one of {DISTANCES}, got {dist!r}')


# ------------------------------------------------------------------------------------------------
# STAR losses
# ------------------------------------------------------------------------------------------------

def _decompose(heatmaps, targets, eps, eig_clamp, isotropic):
  check_heatmaps(heatmaps)
  if targets.shape != (heatmaps.shape[0], heatmaps.shape[3], 2):
    raise ValueError(f'targets must be (batch, points, 2) = {(heatmaps.shape[0], heatmaps.shape[3], 2)} '
                     f'for heatmaps of shape {heatmaps.shape}, got {targets.shape}')
  means, cov = heatmap_moments(heatmaps, eps)
  evalues, evectors = eigh_2x2(cov, isotropic_rtol(cov.dtype, isotropic))
  if eig_clamp > 0:
    # Not in the official code. For non-negative maps the covariance is positive semi-definite, but
    # negative map values (e.g. a head without the final ReLU) can make an eigenvalue < -eps, and then
    # sqrt(evalue + eps) is NaN; clamping keeps eigenvalues at least `eig_clamp`.
    evalues = jnp.maximum(evalues, eig_clamp)
  return targets - means, evalues, evectors


def star_terms(error, evalues, evectors, *, w=1.0, dist='smoothl1', eps=1e-5):
  """Per-point STAR v2 loss from an error and a covariance eigendecomposition.

  Args:
    error: (..., 2) target minus heatmap mean, (x, y).
    evalues: (..., 2) covariance eigenvalues.
    evectors: (..., 2, 2) unit eigenvectors as COLUMNS (evectors[..., :, k] belongs to evalues[..., k]).
  Returns:
    (...,) sum_k dist(error . v_k) / sqrt(evalue_k + eps) + w * (|evalue_0| + |evalue_1|).
  """
  # Projections on the columns. The official code indexes rows (evectors[:, :, 0]); that is the same
  # only because LAPACK returns a symmetric reflection matrix for 2x2 inputs. Every distance is even,
  # so the eigenvectors' signs do not matter.
  proj = jnp.einsum('...i,...ik->...k', error, evectors)
  scaled = _scalar_distance(proj, dist) / jnp.sqrt(evalues + eps)
  return scaled.sum(-1) + w * eigenvalue_restriction(evalues)


def star_loss(heatmaps, targets, *, w=1.0, dist='smoothl1', eps=1e-5, eig_clamp=0.0, isotropic='pin'):
  """STAR loss, the official STARLoss_v2 (lib/loss/starLoss_v2.py).

  Each map is normalised to a distribution; its mean is the prediction and its covariance the
  ambiguity. The error (target - mean) is projected on both covariance eigenvectors, each distance
  divided by sqrt(eigenvalue + eps) (less weight along the ambiguous direction), plus w times the sum
  of |eigenvalues| (keeps maps from spreading out).

  Args:
    heatmaps: (B, H, W, N) non-negative, not normalised (the model's fusion heatmaps).
    targets: (B, N, 2) ground truth (x, y) in [-1, 1], align-corners grid.
    w: weight of the eigenvalue restriction.
    dist: 'smoothl1' (scale 0.01), 'l1', 'l2' (squared) or 'wing' (omega 0.01, epsilon 2), applied to
      each projected error. (The official STARLoss_v2 accepts 'wing' but raises a TypeError when it
      calls WingLoss with `reduction=`; here it is the Wing distance of each projected error.)
    eps: added to the eigenvalues under the square root, and to the covariance's V1 and V2.
    eig_clamp: > 0 clamps eigenvalues to at least this (not in the official code; off by default).
    isotropic: 'pin' (default) takes the eigenvectors of a numerically isotropic covariance (relative
      eigenvalue gap below ~84 epsilons of the compute dtype) to be the axes, with a finite gradient;
      'official' takes them from the matrix whatever its gap, as LAPACK does (`eigh_2x2`).
  Returns:
    scalar, the mean over batch and points (float32, also for bfloat16 maps).
  """
  error, evalues, evectors = _decompose(heatmaps, targets, eps, eig_clamp, isotropic)
  return star_terms(error, evalues, evectors, w=w, dist=dist, eps=eps).mean()


def star_loss_v1(heatmaps, targets, *, w=1.0, dist='smoothl1', eps=1e-5, eig_clamp=0.0, isotropic='pin'):
  """The older STAR loss, the official STARLoss (lib/loss/starLoss.py).

  Differs from `star_loss` in where the distance is taken: the error is rotated into the eigenbasis
  and each component divided by sqrt(eigenvalue + eps) first; then 'smoothl1' / 'wing' is applied to
  the norm of that 2-vector per point, 'l1' / 'l2' to each component; everything is averaged (over
  points, and for 'l1' / 'l2' also over the two components). Plus w times the mean of |evalue_0| + |evalue_1|.
  Same arguments and shapes as `star_loss`.
  """
  error, evalues, evectors = _decompose(heatmaps, targets, eps, eig_clamp, isotropic)
  # Columns again (the official code takes rows; equal for LAPACK's symmetric 2x2 eigenvectors).
  scaled = jnp.einsum('...i,...ik->...k', error, evectors) / jnp.sqrt(evalues + eps)   # (B, N, 2)
  if dist == 'smoothl1':
    trans = smooth_l1(jnp.square(scaled).sum(-1)).mean()
  elif dist == 'wing':
    trans = wing(jnp.square(scaled).sum(-1)).mean()
  else:
    trans = _scalar_distance(scaled, dist).mean()
  return trans + w * eigenvalue_restriction(evalues).mean()


# ------------------------------------------------------------------------------------------------
# Adaptive Wing loss and coordinate baselines
# ------------------------------------------------------------------------------------------------

def awing_weight_map(target: jnp.ndarray, threshold: float = 0.2, weight: float = 10.0) -> jnp.ndarray:
  """Official AWing weight map: 1 + weight where the 3x3 max-dilation of `target` >= threshold.

  Args:
    target: (B, H, W, C) target maps.
  Returns:
    (B, H, W, C) of 1 or 1 + weight (11 with the defaults).
  """
  dilated = jax.lax.reduce_window(target, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1),
                                  ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.where(dilated < threshold, 0.0, 1.0) * weight + 1.0


def awing_loss(pred, target, *, omega=14.0, theta=0.5, epsilon=1.0, alpha=2.1, use_weight_map=True):
  """Adaptive Wing loss (Wang et al. 2019), the official AWingLoss, mean over all elements.

  Args:
    pred: (B, H, W, C) predicted maps (sigmoid outputs in [0, 1]).
    target: (B, H, W, C) target maps in [0, 1]; treated as a constant (no gradient flows into it).
  Returns:
    scalar: mean of the (weighted) loss.
  """
  if pred.shape != target.shape:
    raise ValueError(f'awing_loss: pred {pred.shape} and target {target.shape} differ in shape')
  params = (float(omega), float(theta), float(epsilon), float(alpha), bool(use_weight_map))
  # One dtype for both: the target-dependent terms (alpha - target, its powers) in float32 would
  # cost a float64 run (float32 targets from the input pipeline, float64 maps) 6e-8 of the loss.
  dtype = jnp.promote_types(jnp.result_type(pred, target), jnp.float32)
  return _awing_mean(pred.astype(dtype), jax.lax.stop_gradient(target.astype(dtype)), params)


def _awing_terms(pred, target, params):
  """(elementwise loss, d loss / d pred) of AWing, both times the weight map when it is on."""
  omega, theta, epsilon, alpha, use_weight_map = params
  diff = pred - target
  delta = jnp.abs(diff)
  power = alpha - target
  ratio = theta / epsilon
  ratio_power = jnp.exp(power * math.log(ratio))          # ratio ** power
  # The linear branch's slope A and offset C, exactly as the official formulas.
  a = omega / (1 + ratio_power) * power * (ratio_power / ratio) / epsilon
  c = theta * a - omega * jnp.log1p(ratio_power)
  u = delta / epsilon
  positive = u > 0
  safe_u = jnp.where(positive, u, 1.0)
  p = jnp.where(positive, jnp.exp(power * jnp.log(safe_u)), 0.0)   # (delta / epsilon) ** power
  near = delta < theta
  loss = jnp.where(near, omega * jnp.log1p(p), a * delta - c)
  # d/d delta of omega * log1p(u ** power) = omega * power * u ** (power - 1) / (1 + u ** power) / eps,
  # with u ** (power - 1) = p / u; 0 at u = 0 (power > 1 for targets in [0, 1], as autograd gives).
  slope = jnp.where(near, omega * power * p / (safe_u * (1 + p)) / epsilon, a)
  grad = jnp.sign(diff) * slope
  if use_weight_map:
    weight = awing_weight_map(target)
    loss, grad = loss * weight, grad * weight
  return loss, grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _awing_mean(pred, target, params):
  return _awing_terms(pred, target, params)[0].mean()


def _awing_mean_fwd(pred, target, params):
  # One pass computes the loss and its gradient: the power (an exp and a log per element) is
  # evaluated once, where autodiff of the formula evaluated it again for the derivative and kept
  # several full-size intermediates (the AWing fusions were ~6% of a CPU training step).
  loss, grad = _awing_terms(pred, target, params)
  return loss.mean(), (grad / loss.size, target)


def _awing_mean_bwd(params, residuals, g):
  del params
  grad, target = residuals
  return (g * grad).astype(grad.dtype), jnp.zeros_like(target)


_awing_mean.defvjp(_awing_mean_fwd, _awing_mean_bwd)


def smooth_l1_loss(pred, target, scale=SMOOTH_L1_SCALE):
  """Official SmoothL1Loss on points: smooth-L1 of each Euclidean point error, mean over (B, N).

  Args:
    pred, target: (B, N, 2) landmarks.
  """
  return smooth_l1(jnp.square(pred - target).sum(-1), scale).mean()


def l1_loss(pred, target):
  """F.l1_loss (the official loss_func 'l1'): mean absolute error over every coordinate of (B, N, 2)."""
  return abs_official(pred - target).mean()


def mse_loss(pred, target):
  """F.mse_loss: mean squared error over every coordinate of (B, N, 2) landmarks."""
  return jnp.square(pred - target).mean()


# ------------------------------------------------------------------------------------------------
# Multi-stack combination
# ------------------------------------------------------------------------------------------------

def _landmark_loss(stack_out: Mapping[str, Any], gt_landmarks, loss_cfg):
  kind = loss_cfg.kind
  if kind in ('star', 'star_v1'):
    # As the official compute_loss: STAR sees the fusion heatmaps (heatmaps x AAM mask).
    fn = star_loss if kind == 'star' else star_loss_v1
    return fn(stack_out['fusion_heatmaps'], gt_landmarks, w=loss_cfg.star_w, dist=loss_cfg.star_dist,
              eps=loss_cfg.star_eps, eig_clamp=loss_cfg.eig_clamp,
              isotropic=loss_cfg.get('star_isotropic', 'pin'))
  if kind == 'l1':
    return l1_loss(stack_out['landmarks'], gt_landmarks)
  if kind == 'l2':
    return mse_loss(stack_out['landmarks'], gt_landmarks)
  if kind == 'smoothl1':
    return smooth_l1_loss(stack_out['landmarks'], gt_landmarks)
  raise ValueError(f'loss.kind must be one of {LANDMARK_LOSSES}, got {kind!r}')


def multistack_loss(outputs: Sequence[Mapping[str, Any]], batch: Mapping[str, Any], loss_cfg):
  """Total training loss of a stacked hourglass, as the official compute_loss.

  Stack i (of S) is weighted 2^i / 2^(S-1) (the last stack counts fully); within a stack:
  weights[0] x landmark loss + weights[1] x AWing(point maps) + weights[2] x AWing(edge maps),
  the two AWing terms only when the stack has point / edge maps (AAM on).

  Args:
    outputs: one dict per stack with 'landmarks' (B, N, 2), 'fusion_heatmaps' (B, h, w, N) and, with
      AAM, 'pointmaps' (B, h, w, N) and 'edgemaps' (B, h, w, E).
    batch: 'landmarks' (B, N, 2) in [-1, 1]; 'pointmaps' / 'edgemaps' targets when AAM is on.
    loss_cfg: configs/base.py's `c.loss` (kind, star_w, star_dist, star_eps, eig_clamp, star_isotropic,
      weights).
      kind 'none' drops the landmark term (AWing-only baseline).
  Returns:
    (total scalar, metrics) with metrics 'loss' (the total) and per stack i the unweighted terms
    'stack{i}/landmark', 'stack{i}/pointmap', 'stack{i}/edgemap' (those that exist).
  """
  if loss_cfg.kind not in LANDMARK_LOSSES:
    raise ValueError(f'loss.kind must be one of {LANDMARK_LOSSES}, got {loss_cfg.kind!r}')
  weights = tuple(loss_cfg.weights)
  if len(weights) != 3:
    raise ValueError(f'loss.weights must be (landmark, pointmap, edgemap), got {weights}')
  nstack = len(outputs)
  if nstack == 0:
    raise ValueError('multistack_loss: outputs is empty')
  total = jnp.zeros((), jnp.float32)
  metrics = {}
  for i, out in enumerate(outputs):
    factor = 2.0 ** i / 2.0 ** (nstack - 1)
    terms = []
    if loss_cfg.kind != 'none':
      terms.append(('landmark', weights[0], _landmark_loss(out, batch['landmarks'], loss_cfg)))
    for key, weight in (('pointmap', weights[1]), ('edgemap', weights[2])):
      if key + 's' in out:
        if key + 's' not in batch:
          raise KeyError(f"stack {i} outputs '{key}s' but the batch has no '{key}s' target")
        terms.append((key, weight, awing_loss(out[key + 's'], batch[key + 's'])))
    for name, weight, value in terms:
      metrics[f'stack{i}/{name}'] = value
      total = total + factor * weight * value
  metrics['loss'] = total
  return total, metrics
