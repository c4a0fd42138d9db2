"""Video: a real photo moved by a known motion, an oracle "network" for it, jitter and frames/s.

  python scripts/benchmark.py video

`motion_video` moves a real annotated photo (tests/testdata/real_faces_full/takeo.png, 68 points) by a
known smooth similarity per frame (translation, rotation, zoom), so that every frame's true landmarks
are known. `RegistrationOracle` is a "network" that localises that one face in any crop of such a
frame: it registers the crop onto a reference crop of the photo (OpenCV's ECC, an affine warp) and maps
the annotated points through it, then adds noise drawn from a seed that is a hash of the crop's
pixels: a deterministic function of the crop, like a network, whose frame-to-frame jitter is known.
The tests use both (tests/inference/test_video.py); this section reports, through the predict command's tracker:

- jitter (`video.jitter`: frame-to-frame landmark motion beyond the true motion, RMS, px and % of the
  inter-ocular distance) and the mean error, with and without One Euro smoothing, for the oracle;
- frames/s of the whole video path (decode, track, network, draw, encode) for the tiny and the
  full-size WFLW networks (random weights: the speed does not depend on them).

`--small` (dry runs and smoke tests): the frames/s of the tiny network only, on the video's first
SMALL_FRAMES frames.
"""

from __future__ import annotations

import pathlib
import tempfile
import time
import zlib

import cv2
import numpy as np

from star_jax.data import annotations

REPO = pathlib.Path(__file__).resolve().parents[1]
PHOTO = REPO / 'tests' / 'testdata' / 'real_faces_full' / 'takeo.png'
# Out-of-photo pixels repeat the border: they move with the photo, and hold no second face.
PAD = 160
FRAMES = 48          # frames of the section's videos
SMALL_FRAMES = 12    # frames/s with --small: the first frames (the same motion from frame to frame)


def read_pts(path: pathlib.Path) -> np.ndarray:
  """A 68-point iBUG .pts file (1-based) -> (68, 2) float32 0-based pixels (the datasets' reader)."""
  return annotations.read_pts(path, 68)


def load_photo(photo: pathlib.Path = PHOTO) -> tuple[np.ndarray, np.ndarray]:
  """(padded RGB photo, its (68, 2) annotated points in the padded photo's pixels)."""
  image = cv2.cvtColor(cv2.imread(str(photo)), cv2.COLOR_BGR2RGB)
  points = read_pts(photo.with_suffix('.pts'))
  padded = cv2.copyMakeBorder(image, PAD, PAD, PAD, PAD, cv2.BORDER_REPLICATE)
  return padded, points + PAD


def motion(num_frames: int, amplitude: float = 1.0) -> list[tuple[float, float, float, float]]:
  """Per frame (dx, dy, angle in radians, zoom): a smooth loop of translation (up to 36 / 20 px),
  rotation (up to 12 degrees) and zoom (0.85-1.15), scaled by `amplitude`."""
  out = []
  for f in range(num_frames):
    u = f / max(num_frames - 1, 1)
    out.append((amplitude * 36 * np.sin(2 * np.pi * u), amplitude * 20 * np.sin(4 * np.pi * u),
                amplitude * np.deg2rad(12) * np.sin(2 * np.pi * u + 0.5),
                1.0 + amplitude * 0.15 * np.sin(2 * np.pi * u + 1.0)))
  return out


def motion_video(num_frames: int = FRAMES, size: tuple[int, int] = (288, 256), amplitude: float = 1.0,
                 photo: pathlib.Path = PHOTO) -> tuple[np.ndarray, np.ndarray]:
  """(frames uint8 (T, H, W, 3) RGB, true landmarks (T, 68, 2) in frame px) of the photo moved by
  `motion`: frame t shows the photo rotated and zoomed about the face centre, which is placed at the
  frame centre plus the translation. size: (width, height)."""
  world, points = load_photo(photo)
  box = np.concatenate([points.min(0), points.max(0)])
  centre = (box[:2] + box[2:]) / 2
  w, h = size
  frames, truth = [], []
  for dx, dy, angle, zoom in motion(num_frames, amplitude):
    m = cv2.getRotationMatrix2D((float(centre[0]), float(centre[1])), float(np.rad2deg(angle)), float(zoom))
    m[:, 2] += np.array([w / 2 + dx, h / 2 + dy]) - centre
    frames.append(cv2.warpAffine(world, m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE))
    truth.append(points @ m[:, :2].T + m[:, 2])
  return np.stack(frames), np.stack(truth).astype(np.float32)


class RegistrationOracle:
  """A "network" for one photo's face: `fn(crops uint8 (B, S, S, 3)) -> {'landmarks' (B, N, 2) in
  [-1, 1], 'covariances' (B, N, 2, 2)}` (the align_corners=False frame of `star_jax.models.network_fn`).

  Registers each crop onto the reference crop of the photo (ECC, affine) and maps the annotated
  points into the crop; adds Gaussian noise of `noise` (normalised units, i.e. of half the crop side)
  to each point and of `shared_noise` to all points together (a real network's errors are partly
  shared), drawn with a seed hashed from the crop's pixels, and reports it as each point's covariance.
  """

  def __init__(self, image_size: int, noise: float = 0.02, shared_noise: float = 0.01, photo: pathlib.Path = PHOTO):
    from star_jax.data import crop as crop_lib  # pylint: disable=import-outside-toplevel
    from star_jax.data import transforms  # pylint: disable=import-outside-toplevel

    world, points = load_photo(photo)
    self.size, self.noise, self.shared_noise = int(image_size), float(noise), float(shared_noise)
    scale, centre = crop_lib.box_rule(crop_lib.landmarks_box(points))
    matrix = transforms.crop_matrix(scale, centre, self.size)
    self.reference = self._gray(transforms.warp(world, matrix, self.size))
    self.points = transforms.transform_points(points, matrix).astype(np.float64)   # reference crop px
    self.failures = 0

  @staticmethod
  def _gray(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY).astype(np.float32)

  def locate(self, crop: np.ndarray) -> np.ndarray:
    """The annotated points in `crop` px (N, 2), noise-free: ECC finds the affine W with
    reference(W x) = crop(x), coarse to fine (1/4, 1/2, full size) so that it converges from the
    identity for rotations of ~15 degrees."""
    warp = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_COUNT | cv2.TERM_CRITERIA_EPS, 100, 1e-5)
    gray = self._gray(crop)
    for level, factor in enumerate((4, 2, 1)):
      size = self.size // factor
      a = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA) if factor > 1 else gray
      b = cv2.resize(self.reference, (size, size), interpolation=cv2.INTER_AREA) if factor > 1 else self.reference
      # Pixel centres: y = x / f + k with k = 0.5 / f - 0.5, so a warp x' = A x + t reads
      # y' = A y + t / f + k (1 - A 1) at this level.
      k = 0.5 / factor - 0.5
      scaled = warp.copy()
      scaled[:, 2] = warp[:, 2] / factor + k * (1 - warp[:, :2].sum(1))
      try:
        _, scaled = cv2.findTransformECC(a, b, scaled, cv2.MOTION_EUCLIDEAN if level == 0 else cv2.MOTION_AFFINE,
                                         criteria, None, 5 if factor == 1 else 3)
      except cv2.error:
        self.failures += 1
        break
      warp = scaled.copy()
      warp[:, 2] = factor * (scaled[:, 2] - k * (1 - scaled[:, :2].sum(1)))
    full = np.vstack([warp.astype(np.float64), [0, 0, 1]])
    inv = np.linalg.inv(full)
    return self.points @ inv[:2, :2].T + inv[:2, 2]

  def __call__(self, crops: np.ndarray) -> dict:
    s = self.size
    out, covs = [], []
    for crop in crops:
      if not crop.any():          # padding of the batch
        out.append(np.zeros_like(self.points))
        continue
      normalised = (2.0 * self.locate(crop) + 1.0) / s - 1.0
      rng = np.random.default_rng(zlib.crc32(np.ascontiguousarray(crop).tobytes()))
      out.append(normalised + rng.normal(0.0, self.noise, normalised.shape) + rng.normal(0.0, self.shared_noise, 2))
    n = len(self.points)
    covs = np.broadcast_to(np.eye(2) * (self.noise ** 2 + self.shared_noise ** 2), (len(crops), n, 2, 2))
    return {'landmarks': np.stack(out).astype(np.float32), 'covariances': covs.astype(np.float32)}


def inter_ocular(points68: np.ndarray) -> float:
  """The distance between the outer eye corners (points 36 and 45 of the 68-point layout)."""
  return float(np.linalg.norm(points68[..., 36, :] - points68[..., 45, :], axis=-1).mean())


def track(landmarker, frames: np.ndarray, fps: float = 25.0, **tracker_options):
  """Runs the tracker over the frames: (reported landmarks (T, N, 2) of track 0, NaN where it has no
  face; the list of faces of each frame)."""
  from star_jax.inference import video  # pylint: disable=import-outside-toplevel

  tracker = video.FaceTracker(landmarker, **tracker_options)
  per_frame = [tracker(frame, i / fps) for i, frame in enumerate(frames)]
  n = None
  for faces in per_frame:
    if faces:
      n = len(faces[0].landmarks)
      break
  out = np.full((len(frames), n or 1, 2), np.nan, np.float32)
  for i, faces in enumerate(per_frame):
    if faces:
      out[i] = faces[0].landmarks
  return out, per_frame


def oracle_jitter(num_frames: int = FRAMES, noise: float = 0.02, image_size: int = 128, fps: float = 25.0,
                  **tracker_options) -> dict:
  """The oracle's landmarks through the tracker, without and with smoothing: jitter and mean error
  (px, and as fractions of the inter-ocular distance), and whether the track had the face in every
  frame. noise: the oracle's noise (normalised units: half a crop side)."""
  from star_jax.inference import video  # pylint: disable=import-outside-toplevel
  from star_jax.inference.landmarker import FaceLandmarker  # pylint: disable=import-outside-toplevel

  frames, truth = motion_video(num_frames)
  iod = inter_ocular(truth)
  out = {'frames': num_frames, 'inter_ocular_px': iod, 'noise': noise,
         'true_jitter_px': video.jitter(truth, truth)}
  for name, smooth in (('raw', False), ('smoothed', True)):
    landmarker = FaceLandmarker(RegistrationOracle(image_size, noise), image_size, layout='300W', faces='largest')
    pred, per_frame = track(landmarker, frames, fps=fps, smooth=smooth, **tracker_options)
    out[f'{name}/every_frame'] = all(len(f) == 1 for f in per_frame)
    out[f'{name}/jitter_px'] = video.jitter(pred, truth)
    out[f'{name}/jitter_iod'] = out[f'{name}/jitter_px'] / iod
    out[f'{name}/error_px'] = float(np.nanmean(np.linalg.norm(pred - truth, axis=-1)))
    out[f'{name}/error_iod'] = out[f'{name}/error_px'] / iod
    out[f'{name}/predicted'] = pred
  out['truth'] = truth
  return out


def write_mp4(path, frames: np.ndarray, fps: float = 25.0) -> None:
  """RGB frames (T, H, W, 3) uint8 -> an MP4 file, by the video path's own writer."""
  from star_jax.inference import video  # pylint: disable=import-outside-toplevel
  writer = video.VideoWriter(pathlib.Path(path), fps)
  for frame in frames:
    writer.write(frame)
  writer.close()


def video_fps(checkpoint, frames: np.ndarray, fps: float = 25.0, extra: tuple = ()) -> tuple[float, dict]:
  """Frames/s of the predict command's whole video path on `frames` (written to an MP4 first), after the
  first frame (which compiles the network): (frames/s, the command's JSON summary)."""
  import json  # pylint: disable=import-outside-toplevel

  from star_jax import predict  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / 'clip.mp4'
    write_mp4(path, frames, fps)
    status = predict.main(['predict', '--checkpoint', str(checkpoint), str(path), '--output', f'{tmp}/out', *extra])
    if status:
      raise RuntimeError(f'predict failed with status {status}')
    summary = json.loads((pathlib.Path(tmp) / 'out' / 'clip_landmarks.json').read_text())
  summary.pop('frames')
  return summary['frames_per_second_after_first'], summary


class _NetworkWithOracleOutput:
  """A real network's compute with the oracle's answer: the video path's speed when the track holds
  (a network with random weights loses its track every few frames, which re-runs the detector).
  `oracle_seconds` is the time spent in the oracle, to leave out of the frames/s."""

  def __init__(self, network, oracle):
    self.network, self.oracle, self.oracle_seconds = network, oracle, 0.0

  def __call__(self, crops):
    out = self.network(crops)
    t0 = time.perf_counter()
    answer = self.oracle(crops)
    self.oracle_seconds += time.perf_counter() - t0
    return {'landmarks': answer['landmarks'], **({'covariances': out['covariances']} if 'covariances' in out else {})}


def tracked_fps(checkpoint, frames: np.ndarray, fps: float = 25.0, smooth: bool = False) -> tuple[float, dict]:
  """Frames/s of the video path (read, track, network, draw, encode) with the checkpoint's network and
  the oracle's landmarks, the oracle's own time left out, after the first frame (which compiles)."""
  from star_jax.inference import video  # pylint: disable=import-outside-toplevel
  from star_jax.inference.landmarker import FaceLandmarker  # pylint: disable=import-outside-toplevel

  landmarker = FaceLandmarker.from_checkpoint(checkpoint, faces='largest', covariances=False)
  composite = _NetworkWithOracleOutput(landmarker.network, RegistrationOracle(landmarker.image_size))
  landmarker.network = composite
  first = {}
  real_call = composite.__call__

  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / 'clip.mp4'
    write_mp4(path, frames, fps)

    def call(crops):
      out = real_call(crops)
      first.setdefault('oracle_seconds', composite.oracle_seconds)   # the first frame's oracle time
      return out

    landmarker.network = call
    options = video.VideoOptions(faces='largest', smooth=smooth, progress=True)
    summary = video.process_video(video.VideoInput(path, 'file'), landmarker, pathlib.Path(tmp), options, 'clip',
                                  print)
  steady = (summary['num_frames'] - 1) / summary['frames_per_second_after_first']   # seconds after frame 0
  oracle_after_first = composite.oracle_seconds - first['oracle_seconds']
  return (summary['num_frames'] - 1) / (steady - oracle_after_first), summary


def _checkpoints(tmp: pathlib.Path, full_size: bool = True) -> dict:
  """{'tiny': the tiny test network converted, 'full WFLW': the full-size WFLW network (random weights,
  unless not `full_size`)}."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from star_jax import config_lib  # pylint: disable=import-outside-toplevel
  from star_jax import convert_pytorch  # pylint: disable=import-outside-toplevel
  from star_jax.models import create_model  # pylint: disable=import-outside-toplevel
  from star_jax import checkpoints  # pylint: disable=import-outside-toplevel

  tiny = config_lib.load_config(str(REPO / 'configs' / 'wflw.py') + ':tiny')
  tiny.model.nstack, tiny.model.channels = 4, 32
  convert_pytorch.convert_checkpoint(str(REPO / 'tests' / 'testdata' / 'tiny_wflw_checkpoint.pkl'), tiny,
                                     str(tmp / 'tiny'))
  out = {'tiny (input 64, 4 stacks x 32 channels)': tmp / 'tiny'}
  if full_size:
    full = config_lib.load_config(str(REPO / 'configs' / 'wflw.py'))
    checkpoints.save_model_checkpoint(tmp / 'full', model=create_model(full, nnx.Rngs(0)), config=full)
    out['full WFLW (input 256, 4 stacks x 256)'] = tmp / 'full'
  return out


def run(args) -> list[dict]:
  """Rows for scripts/benchmark.py: the oracle's jitter and error, raw and smoothed; the video path's
  frames/s with the tiny and the full-size WFLW networks (`--small`: the tiny one, fewer frames)."""
  small = bool(getattr(args, 'small', False))
  rows = []
  j = oracle_jitter()
  for name in ('raw', 'smoothed'):
    rows.append({'name': f'oracle through the tracker, {name}: jitter', 'value': j[f'{name}/jitter_px'], 'unit': 'px',
                 'notes': f'{100 * j[f"{name}/jitter_iod"]:.2f} % of the inter-ocular distance '
                          f'({j["inter_ocular_px"]:.1f} px); face in every frame: {j[f"{name}/every_frame"]}'})
    rows.append({'name': f'oracle through the tracker, {name}: mean error', 'value': j[f'{name}/error_px'],
                 'unit': 'px', 'notes': f'{100 * j[f"{name}/error_iod"]:.2f} % inter-ocular'})
  frames, _ = motion_video(FRAMES, size=(640, 480))
  frames = frames[:SMALL_FRAMES] if small else frames
  with tempfile.TemporaryDirectory() as tmp:
    for name, checkpoint in _checkpoints(pathlib.Path(tmp), full_size=not small).items():
      for smooth in (False, True):
        value, summary = tracked_fps(checkpoint, frames, smooth=smooth)
        rows.append({'name': f'video 640x480 tracked, {name}{" smoothed" if smooth else ""}', 'value': value,
                     'unit': 'frames/s', 'notes': f'network with the oracle\'s landmarks (oracle time left out), '
                                                  f'after the first frame; detector on '
                                                  f'{summary["tracking"]["detections"]} of {summary["num_frames"]}'})
      for extra in ((), ('--smooth',)):
        value, summary = video_fps(checkpoint, frames, extra=extra)
        rows.append({'name': f'video 640x480 predict command, {name}{" --smooth" if extra else ""}', 'value': value,
                     'unit': 'frames/s', 'notes': f'after the first frame; {summary["frames_per_second"]:.2f} with '
                                                  f'it ({summary["seconds"]:.1f} s for {summary["num_frames"]} '
                                                  f'frames); detector on {summary["tracking"]["detections"]}'})
  return rows


def picture(path: pathlib.Path, num_frames: int = FRAMES) -> None:
  """docs/video_tracking.jpg: four frames of the oracle tracked with smoothing (landmarks and 1-sigma
  ellipses), and a landmark's error over time without and with smoothing."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel

  from star_jax.inference import video  # pylint: disable=import-outside-toplevel

  j = oracle_jitter(num_frames)
  frames, truth = motion_video(num_frames)
  from star_jax.inference.landmarker import FaceLandmarker  # pylint: disable=import-outside-toplevel
  landmarker = FaceLandmarker(RegistrationOracle(128), 128, layout='300W', faces='largest')
  _, per_frame = track(landmarker, frames, smooth=True)
  shown = [0, 12, 24, 36]
  fig = plt.figure(figsize=(12, 6.4), dpi=100)
  for k, i in enumerate(shown):
    ax = fig.add_subplot(2, 4, k + 1)
    ax.imshow(video.draw_frame(frames[i], per_frame[i], show_ambiguity=True))
    ax.set_title(f'frame {i}', fontsize=9)
    ax.axis('off')
  ax = fig.add_subplot(2, 1, 2)
  t = np.arange(num_frames)
  nose = 30   # the nose tip of the 68-point layout
  for name, style in (('raw', '-'), ('smoothed', '-')):
    err = j[f'{name}/predicted'][:, nose] - truth[:, nose]
    ax.plot(t, err[:, 0], style, label=f'{name}: jitter {j[f"{name}/jitter_px"]:.2f} px '
                                       f'({100 * j[f"{name}/jitter_iod"]:.1f} % IOD)')
  ax.axhline(0, color='k', lw=0.5)
  ax.set_xlabel('frame (25 frames/s)')
  ax.set_ylabel('nose tip x error (px)')
  ax.legend(fontsize=9)
  ax.set_title('takeo moved by a known motion; oracle network + noise; tracked without and with --smooth', fontsize=10)
  fig.tight_layout()
  fig.savefig(str(path), pil_kwargs={'quality': 88})
  plt.close(fig)


if __name__ == '__main__':
  import sys
  sys.path.insert(0, str(REPO))
  picture(pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else REPO / 'docs' / 'video_tracking.jpg'))
