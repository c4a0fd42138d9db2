"""Landmarks on videos: read frames, track faces from frame to frame, smooth, write the results.

Tracking (`FaceTracker`): a face is found by the detector once, then followed by cropping each frame
by the bounding box of the previous frame's landmarks (the official demo's crop rule, one network
pass per face and frame, no detector). The detector runs again every `redetect_every` frames, to
confirm each track and to start tracks for new faces, and at once when a track is lost: its new
landmarks are not finite, or their box changed size by more than 1.5x or moved by more than half its
side in one frame, or left the frame. A track the detector fails to confirm twice in a row is dropped.

Smoothing (optional, `OneEuroFilter`): each landmark is low-pass filtered with a cut-off frequency
that rises with the landmark's speed (Casiez, Roussel and Vogel, "1 Euro Filter", CHI 2012): at rest
the jitter is filtered out, in fast motion the lag stays small. Speeds are measured in face sizes per
second, so the same settings suit small and large faces. The crops keep following the raw landmarks
(a lagging crop would cut fast-moving faces).

Inputs: a video file OpenCV can read (`VIDEO_EXTENSIONS`), or a folder of frames (one image per frame,
in the natural order of the file names, at a given frame rate). Frames are uint8 (H, W, 3) RGB;
coordinates are 0-based image pixels (x, y), times are seconds from the first frame.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import pathlib
import re
import time
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import tqdm

from star_jax import drawing
from star_jax.data import crop as crop_lib
from star_jax.inference import face_detect
from star_jax.inference import landmarker as landmarker_lib
from star_jax.inference import predictor

VIDEO_EXTENSIONS = ('.mp4', '.avi', '.mov', '.mkv', '.webm', '.m4v', '.mpg', '.mpeg', '.wmv', '.flv', '.ts')
# How far a track may change in one frame before it counts as lost (see the module docstring).
MAX_SIZE_CHANGE = 1.5
MAX_SHIFT = 0.5
# A track is dropped when this many detection rounds in a row did not confirm it.
MAX_MISSES = 2


# ---- Smoothing ----------------------------------------------------------------------------------

class OneEuroFilter:
  """The One Euro filter of a set of K vectors of dimension D, e.g. one face's (N, 2) landmarks.

  Each row gets an exponential smoothing whose cut-off frequency is min_cutoff + beta * speed, speed
  being the norm of the row's rate of change (itself low-passed at d_cutoff), divided by `scale`
  (given with each sample: a number or (K, 1)). Frequencies in Hz, times in seconds.
  """

  def __init__(self, min_cutoff: float = 1.0, beta: float = 0.5, d_cutoff: float = 1.0):
    if min_cutoff <= 0 or d_cutoff <= 0 or beta < 0:
      raise ValueError(f'need min_cutoff > 0, d_cutoff > 0 and beta >= 0, got {min_cutoff}, {d_cutoff}, {beta}')
    self.min_cutoff, self.beta, self.d_cutoff = float(min_cutoff), float(beta), float(d_cutoff)
    self.reset()

  def reset(self) -> None:
    self._x = self._dx = self._t = None

  @staticmethod
  def _alpha(cutoff, dt: float):
    tau = 1.0 / (2.0 * math.pi * cutoff)
    return 1.0 / (1.0 + tau / dt)

  def __call__(self, x: np.ndarray, t: float, scale=1.0) -> np.ndarray:
    """The filtered (K, D) values at time t (seconds, increasing); the first sample passes unchanged."""
    x = np.asarray(x, np.float64)
    if self._x is None or self._x.shape != x.shape or t <= self._t:
      self._x, self._dx, self._t = x.copy(), np.zeros_like(x), float(t)
      return x.copy()
    dt = float(t) - self._t
    dx = (x - self._x) / dt
    self._dx = self._dx + self._alpha(self.d_cutoff, dt) * (dx - self._dx)
    speed = np.linalg.norm(self._dx, axis=-1, keepdims=True) / np.maximum(np.asarray(scale, np.float64), 1e-9)
    alpha = self._alpha(self.min_cutoff + self.beta * speed, dt)
    self._x = self._x + alpha * (x - self._x)
    self._t = float(t)
    return self._x.copy()


class LandmarkSmoother:
  """Temporal smoothing of one face's (N, 2) landmarks, pose and shape apart.

  Each frame's landmarks P are split into a pose, the similarity (centroid c, scale s, angle a) that
  best maps the previous smoothed shape onto P (least squares), and a shape, P brought back by that
  similarity into the face's own frame (units: the RMS distance of the landmarks from their centroid,
  about a third of the face). The shape is One-Euro-filtered with (min_cutoff, beta); the pose, which
  is averaged over all N points and so N times less noisy, with `pose_min_cutoff` and `pose_beta`
  (speeds: centroid in face radii per second, log-scale and angle per second). The rigid motion of a
  moving head then shows almost no lag while the jitter of the individual points is filtered out.
  """

  def __init__(self, min_cutoff: float = 1.0, beta: float = 0.5, pose_min_cutoff: float = 4.0,
               pose_beta: float = 5.0):
    self.shape_filter = OneEuroFilter(min_cutoff, beta)
    self.pose_filter = OneEuroFilter(pose_min_cutoff, pose_beta)
    self._shape = None     # (N,) complex: the smoothed shape, in the face's frame
    self._angle = 0.0

  def __call__(self, points: np.ndarray, t: float) -> np.ndarray:
    """The smoothed (N, 2) landmarks (image px) at time t (seconds)."""
    z = np.asarray(points, np.float64) @ np.array([1.0, 1j])
    centre = z.mean()
    if self._shape is None or len(self._shape) != len(z):
      radius = max(float(np.sqrt(np.mean(np.abs(z - centre) ** 2))), 1e-9)
      self._shape, self._angle = (z - centre) / radius, 0.0
      self.shape_filter.reset()
      self.pose_filter.reset()
      self.shape_filter(np.stack([self._shape.real, self._shape.imag], -1), t)
      self.pose_filter(np.array([[centre.real, centre.imag], [math.log(radius), 0.0]]), t)
      return np.asarray(points, np.float64).copy()
    ref = self._shape - self._shape.mean()
    # The similarity ref -> z as one complex factor (scale and rotation) and the centroid.
    factor = np.vdot(ref, z - centre) / np.vdot(ref, ref)
    scale = abs(factor)
    # Unwrapped next to the last angle, so that the filter never sees a 2 pi jump.
    angle = self._angle + math.remainder(np.angle(factor) - self._angle, 2 * math.pi)
    shape = (z - centre) / factor + self._shape.mean()
    pose = self.pose_filter(np.array([[centre.real, centre.imag], [math.log(scale), angle]]), t,
                            scale=np.array([[scale], [1.0]]))
    smooth = self.shape_filter(np.stack([shape.real, shape.imag], -1), t) @ np.array([1.0, 1j])
    self._shape, self._angle = smooth, float(pose[1, 1])
    factor_hat = math.exp(pose[1, 0]) * complex(math.cos(pose[1, 1]), math.sin(pose[1, 1]))
    out = factor_hat * (smooth - self._shape.mean()) + complex(pose[0, 0], pose[0, 1])
    return np.stack([out.real, out.imag], -1)


def jitter(predicted: np.ndarray, truth: np.ndarray) -> float:
  """Frame-to-frame landmark motion beyond the true motion: the RMS over frames t >= 1 and points of
  |(p_t - p_{t-1}) - (g_t - g_{t-1})|, in the points' unit. predicted, truth: (T, N, 2)."""
  p, g = np.asarray(predicted, np.float64), np.asarray(truth, np.float64)
  d = np.diff(p, axis=0) - np.diff(g, axis=0)
  return float(np.sqrt(np.mean(np.sum(d ** 2, axis=-1))))


# ---- Tracking -----------------------------------------------------------------------------------

@dataclasses.dataclass
class TrackedFace:
  """One face in one frame.

  track: the track's id (0, 1, ... in order of appearance). result: the network's output for the
  frame (raw landmarks and covariances, the crop's box in `result.box`, `result.box_source`:
  'detector' for a track's first frame, 'user' for a --box seed, 'track' when cropped by the previous
  frame's landmarks). landmarks: (N, 2) what to report: smoothed when smoothing is on, else the raw
  ones. detection: the detector's face matched to the track in this frame, if the detector ran.
  """
  track: int
  result: predictor.FaceResult
  landmarks: np.ndarray
  detection: face_detect.Face | None = None


@dataclasses.dataclass
class _Track:
  id: int
  landmarks: np.ndarray
  misses: int = 0
  smoother: LandmarkSmoother | None = None


def _side(box) -> float:
  return float(max(box[2] - box[0], box[3] - box[1]))


def _matches(face: face_detect.Face, landmarks: np.ndarray) -> bool:
  """A detection is a track's face when its centre lies in the landmarks' box and its side is 0.5-2x
  the landmarks box's side (a detector box is squarer and looser than a landmark box)."""
  box = crop_lib.landmarks_box(landmarks)
  cx, cy = (face.box[0] + face.box[2]) / 2, (face.box[1] + face.box[3]) / 2
  ratio = _side(face.box) / max(_side(box), 1e-9)
  return bool(box[0] <= cx <= box[2] and box[1] <= cy <= box[3] and 0.5 <= ratio <= 2.0)


def plausible(new: np.ndarray, old: np.ndarray, frame_shape) -> bool:
  """Whether `new` landmarks (N, 2) can be the same face as the previous frame's `old`: finite, box
  within MAX_SIZE_CHANGE in size and MAX_SHIFT of its side in position, centre inside the frame."""
  if new is None or not np.all(np.isfinite(new)):
    return False
  a, b = crop_lib.landmarks_box(old), crop_lib.landmarks_box(new)
  side_a, side_b = _side(a), _side(b)
  if side_b < 4.0 or not 1.0 / MAX_SIZE_CHANGE <= side_b / max(side_a, 1e-9) <= MAX_SIZE_CHANGE:
    return False
  ca, cb = (a[:2] + a[2:]) / 2, (b[:2] + b[2:]) / 2
  if np.hypot(*(cb - ca)) > MAX_SHIFT * side_a:
    return False
  h, w = frame_shape[:2]
  return bool(0 <= cb[0] < w and 0 <= cb[1] < h)


class FaceTracker:
  """Follows faces through the frames of a video (see the module docstring).

  landmarker: a `FaceLandmarker` (its detector finds the faces; with detector None, `box` is needed).
  mode: 'largest' or 'best' follow one face (the largest / best-scored detection when there is no
    track; a face that appears later does not take over), 'all' follows every detected face.
  redetect_every: the detector runs on every such frame (and whenever there is no track or one is lost).
  box: a face box (x_min, y_min, x_max, y_max) to start from (and restart from) instead of detecting.
  smooth: One Euro smoothing of the reported landmarks, with `min_cutoff` and `beta`.
  """

  def __init__(self, landmarker, *, mode: str = 'largest', redetect_every: int = 15, box=None,
               smooth: bool = False, min_cutoff: float = 1.0, beta: float = 0.5):
    if mode not in face_detect.FACE_MODES:
      raise ValueError(f'mode must be one of {", ".join(face_detect.FACE_MODES)}, got {mode!r}')
    if box is None and landmarker.detector is None:
      raise ValueError('a tracker needs a face detector or a box to start from')
    if redetect_every < 1:
      raise ValueError(f'redetect_every must be >= 1, got {redetect_every}')
    self.landmarker = landmarker
    self.mode = mode
    self.redetect_every = int(redetect_every)
    self.box = None if box is None else tuple(float(v) for v in box)
    self.smooth = bool(smooth)
    self.min_cutoff, self.beta = float(min_cutoff), float(beta)
    self.tracks: list[_Track] = []
    self._next_id = 0
    self._since_detection = 0
    # What the tracker did, for the report: detector runs, tracks lost, tracks started.
    self.stats = {'detections': 0, 'lost': 0, 'started': 0, 'dropped': 0}

  def _new_track(self, landmarks: np.ndarray) -> _Track:
    smoother = LandmarkSmoother(self.min_cutoff, self.beta) if self.smooth else None
    track = _Track(self._next_id, landmarks, smoother=smoother)
    self._next_id += 1
    self.stats['started'] += 1
    return track

  def __call__(self, frame: np.ndarray, t: float) -> list[TrackedFace]:
    """The faces of one frame (uint8 (H, W, 3) RGB) at time `t` (seconds), sorted by track id."""
    out: dict[int, TrackedFace] = {}
    lost = False
    # 1. Follow: crop every track by its previous landmarks, one pass.
    if self.tracks:
      boxes = [crop_lib.landmarks_box(tr.landmarks) for tr in self.tracks]
      results = self.landmarker.predict([frame], [boxes], refine=False, box_source='track')[0]
      kept = []
      for tr, r in zip(self.tracks, results):
        if plausible(r.landmarks, tr.landmarks, frame.shape):
          tr.landmarks = r.landmarks
          kept.append(tr)
          out[tr.id] = TrackedFace(tr.id, r, r.landmarks)
        else:
          lost = True
          self.stats['lost'] += 1
      self.tracks = kept
    # 2. Detect (or seed from the box): on schedule, or when there is nothing (left) to follow.
    self._since_detection += 1
    due = not self.tracks or lost or self._since_detection >= self.redetect_every
    if self.box is not None:
      if not self.tracks:
        self._start(frame, [face_detect.Face(self.box)], 'user', out)
    elif due:
      self._detect(frame, out)
    # 3. Smooth what is reported.
    for tr in self.tracks:
      face = out[tr.id]
      if tr.smoother is not None:
        face.landmarks = tr.smoother(face.result.landmarks, t).astype(np.float32)
    return [out[k] for k in sorted(out)]

  def _detect(self, frame: np.ndarray, out: dict[int, TrackedFace]) -> None:
    self._since_detection = 0
    self.stats['detections'] += 1
    detections = self.landmarker.detector.detect(frame)
    unmatched = list(detections)
    kept = []
    for tr in self.tracks:
      match = next((f for f in unmatched if _matches(f, tr.landmarks)), None)
      if match is None:
        tr.misses += 1
        if tr.misses >= MAX_MISSES:
          self.stats['dropped'] += 1
          out.pop(tr.id, None)
          continue
      else:
        tr.misses = 0
        unmatched.remove(match)
        face = out[tr.id]
        face.detection = match
        face.result.face = face_detect.Face(face.result.face.box, match.score)
      kept.append(tr)
    self.tracks = kept
    if self.mode == 'all':
      new = unmatched
    else:
      new = face_detect.select(unmatched, self.mode) if not self.tracks else []
    if new:
      self._start(frame, new, 'detector', out)

  def _start(self, frame: np.ndarray, faces: list[face_detect.Face], source: str,
             out: dict[int, TrackedFace]) -> None:
    results = self.landmarker.predict([frame], [faces], box_source=source)[0]
    for face, r in zip(faces, results):
      if r.landmarks is None or not np.all(np.isfinite(r.landmarks)):
        continue
      tr = self._new_track(r.landmarks)
      self.tracks.append(tr)
      out[tr.id] = TrackedFace(tr.id, r, r.landmarks, detection=face if source == 'detector' else None)


# ---- Reading and writing videos -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VideoInput:
  """A video to process: a file OpenCV reads, or a folder of frames (kind 'frames')."""
  path: pathlib.Path
  kind: str  # 'file' or 'frames'


def is_video_file(path: pathlib.Path) -> bool:
  return path.is_file() and path.suffix.lower() in VIDEO_EXTENSIONS


def split_inputs(inputs: Sequence[str], folders_are_videos: bool) -> tuple[list[VideoInput], list[str]]:
  """(videos, the other inputs): files with a video extension are videos; folders are videos (of
  frames) when `folders_are_videos`, else folders of photos."""
  videos, others = [], []
  for item in inputs:
    p = pathlib.Path(item)
    if is_video_file(p):
      videos.append(VideoInput(p, 'file'))
    elif p.is_dir() and folders_are_videos:
      videos.append(VideoInput(p, 'frames'))
    else:
      others.append(item)
  return videos, others


def _natural_key(path: pathlib.Path):
  return [int(part) if part.isdigit() else part.lower() for part in re.split(r'(\d+)', path.name)]


def frame_files(folder: pathlib.Path, extensions: Sequence[str]) -> list[pathlib.Path]:
  """The image files of a folder of frames, in the natural order of their names (frame2 < frame10)."""
  return sorted((p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions), key=_natural_key)


class FrameReader:
  """The frames of a `VideoInput`: iterate for (index, time in s, uint8 (H, W, 3) RGB frame).

  fps: the file's frame rate (`default_fps` when the file has none, and for a folder of frames).
  count: the number of frames (a file's count is the container's estimate; 0 when unknown).
  """

  def __init__(self, source: VideoInput, default_fps: float, warn: Callable[[str], None] = lambda m: None):
    self.source, self.warn = source, warn
    self._read_image = landmarker_lib.read_image
    if source.kind == 'frames':
      self.files = frame_files(source.path, landmarker_lib.IMAGE_EXTENSIONS)
      if not self.files:
        raise ValueError(f'{source.path}: no image files (frames) in this folder')
      self.fps, self.count, self._capture = float(default_fps), len(self.files), None
    else:
      self._capture = cv2.VideoCapture(str(source.path))
      if not self._capture.isOpened():
        raise ValueError(f'{source.path}: OpenCV cannot open this file as a video')
      fps = self._capture.get(cv2.CAP_PROP_FPS)
      self.fps = float(fps) if fps and np.isfinite(fps) and fps > 0 else float(default_fps)
      self.count = max(int(self._capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0), 0)

  def __iter__(self) -> Iterator[tuple[int, float, np.ndarray]]:
    if self._capture is None:
      for i, path in enumerate(self.files):
        frame = self._read_image(path)
        if frame is None:
          self.warn(f'{path}: cannot read this frame: skipped')
          continue
        yield i, i / self.fps, frame
      return
    i = 0
    try:
      while True:
        ok, bgr = self._capture.read()
        if not ok:
          break
        yield i, i / self.fps, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        i += 1
    finally:
      self._capture.release()


class VideoWriter:
  """Writes RGB frames to an MP4 file (MPEG-4 Part 2, which every OpenCV build can encode); frames of
  another size than the first are resized to it."""

  def __init__(self, path: pathlib.Path, fps: float):
    self.path, self.fps, self._writer, self._size = path, fps, None, None

  def write(self, frame_rgb: np.ndarray) -> None:
    if self._writer is None:
      self._size = (frame_rgb.shape[1], frame_rgb.shape[0])
      self._writer = cv2.VideoWriter(str(self.path), cv2.VideoWriter_fourcc(*'mp4v'), self.fps, self._size)
      if not self._writer.isOpened():
        raise OSError(f'{self.path}: OpenCV cannot write an MP4 video here')
    if (frame_rgb.shape[1], frame_rgb.shape[0]) != self._size:
      frame_rgb = cv2.resize(frame_rgb, self._size, interpolation=cv2.INTER_AREA)
    self._writer.write(cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2BGR))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.release()


def draw_frame(frame: np.ndarray, faces: Sequence[TrackedFace], show_ambiguity: bool) -> np.ndarray:
  """A frame with each face's detector box (frames where the detector ran), landmarks (as reported),
  ambiguity ellipses (optional) and track id."""
  out = frame
  for f in faces:
    shown = dataclasses.replace(f.result, landmarks=f.landmarks)
    if f.detection is not None:
      out = drawing.draw_box(out, f.detection.box)
    if show_ambiguity and shown.covariances is not None:
      out = drawing.draw_ellipses(out, shown.landmarks, shown.covariances)
    out = drawing.draw_landmarks(out, shown.landmarks)
    x, y = crop_lib.landmarks_box(f.landmarks)[:2]
    scale = max(0.4, min(out.shape[:2]) / 800)
    cv2.putText(out, f'#{f.track}', (int(x), max(int(y) - 6, 12)), cv2.FONT_HERSHEY_SIMPLEX, scale,
                drawing.BOX_COLOR, max(1, int(round(scale * 2))), cv2.LINE_AA)
  return out


def _round(a, digits: int):
  return np.round(np.asarray(a, np.float64), digits).tolist()


def face_record(f: TrackedFace, smoothed: bool) -> dict:
  """One face of one frame in the JSON output."""
  r = f.result
  out = {'track': f.track, 'box': _round(r.box, 2), 'box_source': r.box_source,
         'detector_box': None if f.detection is None else _round(f.detection.box, 2),
         'detector_score': None if r.score is None else round(float(r.score), 4),
         'landmarks': _round(f.landmarks, 3)}
  if smoothed:
    out['landmarks_raw'] = _round(r.landmarks, 3)
  if r.covariances is not None:
    out['covariances'] = _round(r.covariances, 4)
  return out


def csv_header(num_points: int) -> list[str]:
  return (['frame', 'time_s', 'track', 'box_source', 'detector_score', 'box_x_min', 'box_y_min', 'box_x_max',
           'box_y_max'] + [f'{c}{i}' for i in range(num_points) for c in ('x', 'y')])


@dataclasses.dataclass
class VideoOptions:
  """The predict command's video settings (its flags of the same names)."""
  faces: str = 'largest'
  redetect_every: int = 15
  smooth: bool = False
  smooth_min_cutoff: float = 1.0
  smooth_beta: float = 0.5
  fps: float = 25.0
  show_ambiguity: bool = False
  box: tuple | None = None
  progress: bool | None = None   # tqdm's `disable`: None shows a bar on a terminal only


def process_video(source: VideoInput, landmarker, out_dir: pathlib.Path, options: VideoOptions, stem: str,
                  warn: Callable[[str], None], record_info: dict | None = None) -> dict | None:
  """Tracks the faces of a video; writes OUT/<stem>_landmarks.mp4 (annotated), <stem>_landmarks.csv
  (one row per face and frame: frame, time, track, box, detector score, x0, y0, x1, ...) and
  <stem>_landmarks.json (every frame, with its faces). Returns the JSON's summary (without frames),
  or None when the video could not be read (after a warning)."""
  try:
    reader = FrameReader(source, options.fps, warn)
  except ValueError as e:
    warn(f'{e}: skipped')
    return None
  tracker = FaceTracker(landmarker, mode=options.faces, redetect_every=options.redetect_every, box=options.box,
                        smooth=options.smooth, min_cutoff=options.smooth_min_cutoff, beta=options.smooth_beta)
  paths = {k: out_dir / f'{stem}_landmarks.{k}' for k in ('mp4', 'csv', 'json')}
  writer = VideoWriter(paths['mp4'], reader.fps)
  frames, rows = [], []
  num_points = None
  size = None
  bar = tqdm.tqdm(total=reader.count or None, desc=stem, unit='frame', disable=options.progress)
  start = time.perf_counter()
  after_first = None   # when the first frame was done: it compiles the network, so the rate after it is the steady one
  try:
    for index, t, frame in reader:
      faces = tracker(frame, t)
      size = size or (frame.shape[1], frame.shape[0])
      writer.write(draw_frame(frame, faces, options.show_ambiguity))
      frames.append({'frame': index, 'time': round(t, 6), 'faces': [face_record(f, options.smooth) for f in faces]})
      for f in faces:
        num_points = num_points or len(f.landmarks)
        r = f.result
        rows.append([index, f'{t:.6f}', f.track, r.box_source, '' if r.score is None else f'{r.score:.4f}']
                    + [f'{v:.2f}' for v in r.box] + [f'{v:.3f}' for v in np.asarray(f.landmarks).reshape(-1)])
      bar.update(1)
      if after_first is None:
        after_first = time.perf_counter()
      elapsed = time.perf_counter() - start
      bar.set_postfix(fps=f'{len(frames) / max(elapsed, 1e-9):.1f}', faces=len(faces))
  finally:
    bar.close()
    writer.close()
  end = time.perf_counter()
  seconds = end - start
  if not frames:
    warn(f'{source.path}: no frame could be read: skipped')
    paths['mp4'].unlink(missing_ok=True)
    return None
  with open(paths['csv'], 'w', newline='') as fh:
    w = csv.writer(fh)
    w.writerow(csv_header(num_points or 0))
    w.writerows(rows)
  with_face = sum(1 for fr in frames if fr['faces'])
  summary = dict(record_info or {})
  summary.update({
      'video': str(source.path), 'kind': source.kind, 'fps': reader.fps, 'width': size[0], 'height': size[1],
      'num_frames': len(frames), 'frames_with_face': with_face, 'num_points': num_points,
      'tracking': {'faces': options.faces, 'redetect_every': options.redetect_every, **tracker.stats},
      'smoothing': ({'filter': 'one_euro', 'min_cutoff_hz': options.smooth_min_cutoff, 'beta': options.smooth_beta,
                     'd_cutoff_hz': 1.0, 'speed_unit': 'face sizes per second'} if options.smooth else None),
      'seconds': round(seconds, 3), 'frames_per_second': round(len(frames) / max(seconds, 1e-9), 2),
      'frames_per_second_after_first': (round((len(frames) - 1) / max(end - after_first, 1e-9), 2)
                                        if len(frames) > 1 else None),
      'coordinates': '0-based image pixels (x, y)',
      'outputs': {k: str(v) for k, v in paths.items()}})
  paths['json'].write_text(json.dumps(dict(summary, frames=frames)))
  return summary
