"""The Python API: facial landmarks and their ambiguity on images, in a few lines.

  import star_jax
  landmarker = star_jax.FaceLandmarker.from_pretrained('wflw')          # the released model, fetched once
  landmarker = star_jax.FaceLandmarker.from_checkpoint('ckpt/wflw')     # or yours, or an official 'WFLW.pkl'
  for face in landmarker('photo.jpg'):                                  # or an RGB uint8 array
    print(face.box, face.score, face.landmarks.shape, face.covariances.shape)   # (98, 2), (98, 2, 2)

Conventions: images are uint8 (H, W, 3) RGB (a path is read from disk; grey and RGBA arrays are
converted); boxes are (x_min, y_min, x_max, y_max), landmarks (N, 2) (x, y) and covariances
(N, 2, 2) over (x, y), all in 0-based image pixels (px^2 for covariances). The covariance of a point
is the second moment of the network's heatmap around it: the semantic ambiguity that STAR models
(its principal axes are the directions along which the point is uncertain).

The network runs on JAX's default device (a GPU when the CUDA build of JAX is installed, else the
CPU), or, for an ONNX file written by `python -m star_jax.export`, in onnxruntime without JAX:

  landmarker = star_jax.FaceLandmarker.from_onnx('wflw.onnx')   # or from_checkpoint('wflw.onnx')

This module and what it imports at module level need no JAX (numpy, OpenCV); JAX is imported only
when a checkpoint is loaded. `FaceLandmarker` itself only needs a function from crops to normalised
landmarks, so another backend (a test oracle) plugs in through its constructor.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
from typing import Any, Callable, Sequence

import numpy as np

from star_jax import config_lib
from star_jax import home
from star_jax import layouts
from star_jax.inference import face_detect
from star_jax.inference import image_io
from star_jax.inference import onnx_model
from star_jax.inference import predictor

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.pbm', '.tif', '.tiff', '.webp')
# The config an official checkpoint is converted with when none is given, by its number of points.
DEFAULT_CONFIGS = {98: 'configs/wflw.py', 68: 'configs/300w.py', 29: 'configs/cofw.py'}
# Short names accepted for `config=`.
CONFIG_NAMES = {'wflw': 'configs/wflw.py', '300w': 'configs/300w.py', 'cofw': 'configs/cofw.py'}
# Images of more pixels than this are refused (from their header, before decoding): image_io.
DEFAULT_MAX_PIXELS = image_io.DEFAULT_MAX_PIXELS
# Faces are detected on a copy of the photo whose longer side is at most this; the landmarks are
# predicted on crops of the full-resolution photo. The detector's work grows with the pixels (a
# 12000 x 9000 photo took 90 s); 2048 keeps photos up to 2048 px (and HD video frames) as they are.
DETECT_MAX_SIDE = 2048


# ---- Images -------------------------------------------------------------------------------------

def read_image(path: os.PathLike | str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
  """uint8 (H, W, 3) RGB (grey images are converted to 3 channels), or None if unreadable or over
  `max_pixels` (`image_io.read` says why)."""
  try:
    return image_io.read(path, max_pixels)
  except (FileNotFoundError, image_io.ImageError):
    return None


def as_rgb(image, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """An image argument as uint8 (H, W, 3) RGB: a path is read (FileNotFoundError when it does not
  exist, image_io.ImageError when it cannot be read, ImageTooLargeError over `max_pixels`, read from
  its header before decoding), a grey (H, W) or (H, W, 1) array gets 3 channels, an RGBA array loses
  its alpha."""
  if isinstance(image, (str, os.PathLike)):
    return image_io.read(image, max_pixels)
  array = np.asarray(image)
  if array.dtype != np.uint8:
    raise ValueError(f'images must be uint8 RGB arrays (or paths), got dtype {array.dtype}')
  if array.ndim == 3 and array.shape[2] == 1:
    array = array[..., 0]
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=2)
  if array.ndim == 3 and array.shape[2] == 4:
    array = array[..., :3]
  if array.ndim != 3 or array.shape[2] != 3 or min(array.shape[:2]) < 1:
    raise ValueError(f'images must be (H, W, 3) RGB arrays (or paths), got shape {array.shape}')
  return np.ascontiguousarray(array)


class BoxOutsideImageError(ValueError):
  """A given face box that does not overlap the image at all."""


def check_box(box, width: int, height: int, name: str = 'the image') -> None:
  """Raises BoxOutsideImageError when `box` (x_min, y_min, x_max, y_max) lies wholly outside a
  width x height image (a box that reaches past the border, a face cut by it, is fine)."""
  x1, y1, x2, y2 = (float(v) for v in box)
  if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
    raise BoxOutsideImageError(f'box ({x1:g}, {y1:g}, {x2:g}, {y2:g}) lies outside {name} ({width} x {height} '
                               'pixels); boxes are x_min, y_min, x_max, y_max in image pixels')


def _is_box(entry) -> bool:
  if isinstance(entry, face_detect.Face):
    return True
  try:
    array = np.asarray(entry, np.float64)
  except (TypeError, ValueError):
    return False
  return array.shape == (4,)


def _as_faces(entry) -> list[face_detect.Face] | None:
  """One image's boxes: None (detect), one box, or a sequence of boxes (4 numbers or `Face`s)."""
  if entry is None:
    return None
  entries = [entry] if _is_box(entry) else list(entry)
  faces = []
  for e in entries:
    if isinstance(e, face_detect.Face):
      faces.append(e)
      continue
    if not _is_box(e):
      raise ValueError(f'a box is 4 numbers (x_min, y_min, x_max, y_max) or a Face, got {e!r}')
    box = tuple(float(v) for v in np.asarray(e, np.float64))
    if not (np.all(np.isfinite(box)) and box[2] > box[0] and box[3] > box[1]):
      raise ValueError(f'box {box} has no area (need x_min < x_max and y_min < y_max)')
    faces.append(face_detect.Face(box))
  return faces


def _is_single_image(images) -> bool:
  if isinstance(images, (str, os.PathLike)):
    return True
  return isinstance(images, np.ndarray) and images.ndim in (2, 3)


# ---- Loading networks ---------------------------------------------------------------------------

def _resolve_config(config, num_points: int):
  """`config=` of an official checkpoint (None, a short name, a config file 'path.py[:arg]', or a
  ConfigDict) -> a ConfigDict whose layout has `num_points` points."""
  if config is None:
    if num_points not in DEFAULT_CONFIGS:
      raise ValueError(f'the checkpoint predicts {num_points} points; no default config for that (98: WFLW, '
                       '68: 300W, 29: COFW): pass config=')
    config = DEFAULT_CONFIGS[num_points]
  if isinstance(config, (str, os.PathLike)):
    name, colon, arg = str(config).partition(':')
    spec = CONFIG_NAMES.get(name.lower(), name) + colon + arg
    config = config_lib.load_config(spec)
  have = layouts.get_layout(config.layout).num_points
  if have != num_points:
    raise ValueError(f'the checkpoint predicts {num_points} points but the config\'s {config.layout} layout has '
                     f'{have}')
  return config


def load_official(path: os.PathLike | str, config=None, weights: str = 'net'):
  """An official STAR PyTorch checkpoint (.pkl), converted in memory: (model in eval mode, config).

  weights: 'net' (what the official tester and demo run) or 'net_ema'. config: see `_resolve_config`;
  by default the official config of the checkpoint's number of points.
  """
  from star_jax import convert_pytorch  # lazy: JAX-free ONNX path (converting needs JAX)

  obj = convert_pytorch.read_official(os.fspath(path))
  if weights not in obj:
    raise ValueError(f'{path}: has no {weights!r} weights (it has {sorted(obj)})')
  state_dict = obj[weights]
  config = _resolve_config(config, convert_pytorch.state_dict_points(state_dict))
  try:
    model = convert_pytorch.to_model(state_dict, config)
  except ValueError as e:
    raise ValueError(f'{path} [{weights}] does not fit the model of its config (pass the right config=): '
                     f'{e}') from None
  return model, config


@contextlib.contextmanager
def _quiet_orbax_skips():
  """Drops Orbax's warning, for each item of a training checkpoint that a reader does not ask for
  (optimizer state, data iterator), that it 'could not be restored': expected, and noise to a user."""
  def keep(record):
    return 'could not be restored' not in record.getMessage()
  logger = logging.getLogger('absl')
  logger.addFilter(keep)
  try:
    yield
  finally:
    logger.removeFilter(keep)


# ---- The landmarker -----------------------------------------------------------------------------

class FaceLandmarker:
  """Finds faces (or takes given boxes) and predicts each face's landmarks and their covariances.

  Args:
    network: `fn(crops uint8 (B, S, S, 3) RGB) -> dict` with 'landmarks' (B, N, 2) as (x, y) in [-1, 1]
      of the crop (the align_corners=False frame the official tester reads the network in) and,
      optionally, 'covariances' (B, N, 2, 2) in the same frame (`star_jax.models.network_fn` of a model).
    image_size: S, the network's input side in pixels.
    layout: the landmark layout's name ('WFLW', '300W', 'COFW'), for the record only.
    detector: 'blazeface' (default), 'haar', an object with `detect(image) -> list[Face]`, or None
      (boxes must then be given to every call).
    faces: which detected faces to keep per image: 'largest' (default: the box of largest area, the
      subject of a portrait; also the fastest, see `BlazeFaceDetector.detect_largest`), 'best' (the
      best detector score) or 'all' (a group photo). The same default as `predict` and the demo.
    min_face_size, min_face_score: the detector's smallest face (px) and least score.
    refine: crop each face a second time by the bounding box of its first-pass landmarks, the way
      the official demo crops (by a landmark box, not a detector box), and predict again.
    batch_size: most crops per forward pass. Calls pad their crops to a power of two up to this, so
      a network compiles for at most log2(batch_size) + 1 shapes.
    max_pixels: image files (paths) of more pixels than this are refused, from their header before
      decoding (`image_io.ImageTooLargeError`); None: no limit. Default 200 million.
    detect_max_side: faces are detected on a copy of the image shrunk to this longer side (default
      2048 px; None: at full resolution), so detection takes the same time on any photo; the crops
      are still cut from the full-resolution image. On a photo larger than that, the smallest face
      found is min_face_size times the shrink factor (about 190 px on a 12000 px wide photo).
    points: the layout of the landmarks returned: None (the network's own), or another layout the
      network's points map onto (`layouts.point_mapping`): '300W' gives a WFLW network's 98 points as
      the 68 iBUG points. Covariances follow the points; the refinement still uses all of them.

  Errors of the calls, all ValueErrors but FileNotFoundError (a path that does not exist):
  `image_io.ImageError` (a file that cannot be read as an image, naming it), its subclass
  `image_io.ImageTooLargeError` (over max_pixels), `BoxOutsideImageError` (a given box wholly
  outside its image), and ValueError for malformed arguments.

  Attributes set by `from_checkpoint` for the record: config (the model's ConfigDict), checkpoint
  (the path), step and weights (which stored weights were read: 'ema', 'model', 'net', 'net_ema'),
  selection (how they were chosen and whether they are the best by the official protocol). `layout`
  is the layout of the landmarks returned, `network_layout` the network's own.
  """

  def __init__(self, network: Callable[[np.ndarray], dict], image_size: int, *, layout: str | None = None,
               detector: Any = 'blazeface', faces: str = 'largest',
               min_face_size: float = face_detect.DEFAULT_MIN_FACE_SIZE,
               min_face_score: float = face_detect.DEFAULT_SCORE_THRESHOLD, refine: bool = True,
               batch_size: int = 8, max_pixels: int | None = DEFAULT_MAX_PIXELS,
               detect_max_side: int | None = DETECT_MAX_SIDE, points: str | None = None):
    if faces not in face_detect.FACE_MODES:
      raise ValueError(f'faces must be one of {", ".join(face_detect.FACE_MODES)}, got {faces!r}')
    if int(batch_size) < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    for name, value in (('max_pixels', max_pixels), ('detect_max_side', detect_max_side)):
      if value is not None and int(value) < 1:
        raise ValueError(f'{name} must be a positive number of pixels or None, got {value!r}')
    self.network = network
    self.image_size = int(image_size)
    self.network_layout = layout
    self.layout = layout
    # Indices of the returned points among the network's (None: all of them, as they are).
    self.point_indices = None
    if points is not None:
      if layout is None:
        raise ValueError('points= needs the network\'s layout (layout=) to map its points from')
      self.point_indices = layouts.point_mapping(layout, points)
      self.layout = layouts.get_layout(points).name
    self.max_pixels = None if max_pixels is None else int(max_pixels)
    self.detect_max_side = None if detect_max_side is None else int(detect_max_side)
    self.faces = faces
    self.refine = bool(refine)
    self.batch_size = int(batch_size)
    if isinstance(detector, str):
      detector = face_detect.make_detector(detector, min_face_size, min_face_score)
    self.detector = detector
    self.config = None
    self.checkpoint: str | None = None
    self.step: int | None = None
    self.weights: str | None = None
    # How the checkpoint's step and weights were chosen (checkpoints.LoadedModel.describe()): step,
    # weights, best_by_protocol, chosen_by, best.
    self.selection: dict | None = None

  @classmethod
  def from_checkpoint(cls, path: os.PathLike | str, *, config=None, step: int | None = None,
                      weights: str | None = None, covariances: bool = True, **options) -> FaceLandmarker:
    """A landmarker running a checkpoint.

    path: a star_jax checkpoint directory or training workdir (trained here, or written by
      `python -m star_jax.convert_pytorch`), or an official STAR `.pkl` file, converted in memory.
    config: for a `.pkl` only: 'wflw', '300w', 'cofw', a config file ('configs/wflw.py[:arg]') or a
      ConfigDict; by default the official config of the state dict's number of points (98 WFLW,
      68 300W, 29 COFW).
    step: a directory's checkpoint step: 'best' (the default: the best checkpoint by the official
      protocol, the lower NME of the weights and their EMA at each evaluation), 'latest' or a number.
    weights: for a directory 'ema' or 'model' (default: the weights that won the step's evaluation,
      see `star_jax.checkpoints.load_model`); for a `.pkl` 'net' (default, what the official tester runs) or
      'net_ema'.
    covariances: also predict each point's covariance (the ambiguity); cheap, on by default.
    options: the constructor's keyword arguments (detector, faces, refine, batch_size, ...).
    A `.onnx` file goes to `from_onnx` (config=, step= and weights= do not apply to it).
    Raises FileNotFoundError for a missing path and ValueError for a checkpoint that cannot be read.
    """
    p = pathlib.Path(path)
    if not p.exists():
      raise FileNotFoundError(f'checkpoint {p} does not exist')
    if p.is_file() and p.suffix.lower() == '.onnx':
      given = [name for name, value in (('config', config), ('step', step), ('weights', weights)) if value is not None]
      if given:
        raise ValueError(f'{", ".join(given)}= do not apply to an ONNX model: it holds one network, exported '
                         'with its weights')
      return cls.from_onnx(p, covariances=covariances, **options)
    if p.is_dir():
      from star_jax import checkpoints  # lazy: JAX-free ONNX path (reading a checkpoint needs JAX)

      if config is not None:
        raise ValueError('config= is for official .pkl files; a checkpoint directory carries its own config')
      with _quiet_orbax_skips():
        loaded = checkpoints.load_model(p, step='best' if step is None else step, weights=weights)
      model, cfg, step, weights = loaded.model, loaded.config, loaded.step, loaded.weights
      selection = loaded.describe()
    else:
      if step is not None:
        raise ValueError('step= is for checkpoint directories; an official .pkl holds one network')
      weights = weights or 'net'
      if weights not in ('net', 'net_ema'):
        raise ValueError(f"weights of an official .pkl are 'net' or 'net_ema', got {weights!r}")
      model, cfg = load_official(p, config, weights)
      selection = {'step': None, 'weights': weights, 'best_by_protocol': weights == 'net',
                   'chosen_by': "the .pkl's net, what the official tester runs" if weights == 'net' else
                   "the .pkl's net_ema, as asked", 'best': None}
    from star_jax import models  # lazy: JAX-free ONNX path (running a checkpoint needs JAX)

    home.enable_compilation_cache()
    network = models.network_fn(model, with_covariance=covariances, decode=cfg.model.get('decode', 'landmarks'))
    out = cls(network, int(cfg.data.image_size), layout=layouts.get_layout(cfg.layout).name, **options)
    out.config, out.checkpoint, out.step, out.weights = cfg, str(path), step, weights
    out.selection = selection
    return out

  @classmethod
  def from_pretrained(cls, name, *, progress: bool | None = None, **options) -> FaceLandmarker:
    """A landmarker running a released official model: 'wflw' (98 points), '300w' (68) or 'cofw' (29).

    The first call downloads the official file into the cache folder ($STAR_JAX_HOME, by default
    ~/.cache/star_jax), checks and converts it; later calls load the converted checkpoint (see
    `star_jax.pretrained.fetch`, also for $STAR_JAX_MIRROR). The weights are the file's `net`, what
    the official tester ran for the published figures. name may also be a `pretrained.Release`.
    progress: the download's progress bar (default: when stderr is a terminal). options: those of
    `from_checkpoint` and the constructor (covariances, detector, faces, points, ...).
    Raises pretrained.DownloadError (an OSError) when the file cannot be fetched, naming what was
    tried and how to install it by hand, and pretrained.ReleaseFileError (a ValueError) for a file
    that is not the released model.
    """
    from star_jax import pretrained  # lazy: JAX-free ONNX path (converting a release needs JAX)

    out = cls.from_checkpoint(pretrained.fetch(name, progress=progress), **options)
    out.selection = dict(out.selection, best_by_protocol=True, chosen_by=pretrained.chosen_by(name),
                         pretrained=pretrained.get(name).name)
    return out

  @classmethod
  def from_onnx(cls, path: os.PathLike | str, *, covariances: bool = True, providers=None, threads: int | None = None,
                **options) -> FaceLandmarker:
    """A landmarker running an ONNX file of `python -m star_jax.export` in onnxruntime (no JAX needed).

    The file's metadata gives the input size, the number of points and the layout; the record's step
    and weights are the exported ones. providers: onnxruntime's execution providers (default the
    CPU's); threads: its intra-op threads (default one per core). options: the constructor's keyword
    arguments. Raises FileNotFoundError for a missing file and ValueError (`onnx_model.OnnxModelError`)
    for a file that is not an exported landmark model.
    """
    network = onnx_model.OnnxNetwork(path, with_covariance=covariances, providers=providers, threads=threads)
    out = cls(network, network.image_size, layout=network.layout, **options)
    meta = network.metadata
    step = meta.get('step')
    out.checkpoint, out.weights = str(path), meta.get('weights')
    out.step = int(step) if step and step.isdigit() else None
    # What the export recorded of how its weights were chosen (files of older versions say less).
    out.selection = {'step': out.step, 'weights': out.weights,
                     'best_by_protocol': {'true': True, 'false': False}.get(meta.get('best_by_protocol', '')),
                     'chosen_by': meta.get('chosen_by') or 'the weights it was exported with'}
    return out

  # ---- Calls ------------------------------------------------------------------------------------

  def detect(self, image) -> list[face_detect.Face]:
    """The faces the detector finds in `image`, filtered by the `faces` mode (best score first for 'all').

    A photo whose longer side exceeds `detect_max_side` is searched on a copy shrunk to that side;
    the boxes are in the photo's pixels."""
    if self.detector is None:
      raise ValueError('this FaceLandmarker has no detector: give the face boxes')
    small, sx, sy = image_io.reduced(as_rgb(image, self.max_pixels), self.detect_max_side)
    if self.faces == 'largest' and hasattr(self.detector, 'detect_largest'):
      faces = self.detector.detect_largest(small)  # stops once no finer level can find a larger face
    else:
      faces = self.detector.detect(small)
    if (sx, sy) != (1.0, 1.0):
      faces = [face_detect.Face((f.box[0] * sx, f.box[1] * sy, f.box[2] * sx, f.box[3] * sy), f.score)
               for f in faces]
    return face_detect.select(faces, self.faces)

  def __call__(self, images, boxes=None, *, refine: bool | None = None):
    """Landmarks of the faces in one image or a list of images.

    images: one image (uint8 (H, W, 3) RGB array, or a path) or a list of them.
    boxes: None to detect the faces; else, for one image, a box (x_min, y_min, x_max, y_max), a `Face`
      or a sequence of them; for a list of images, one such entry (or None) per image.
    refine: overrides the landmarker's `refine` for this call.
    Returns, for one image, a list of `FaceResult` (one per face: `.box`, `.score` (None for a given
    box), `.landmarks` (N, 2), `.covariances` (N, 2, 2) or None); for a list, one such list per image.
    """
    if _is_single_image(images):
      return self.predict([images], None if boxes is None else [boxes], refine=refine)[0]
    images = list(images)
    if boxes is not None and len(boxes) != len(images):
      raise ValueError(f'boxes must have one entry per image: {len(boxes)} for {len(images)} images')
    return self.predict(images, boxes, refine=refine)

  def predict(self, images: Sequence, boxes: Sequence | None = None, *, refine: bool | None = None,
              box_source: str = 'user') -> list[list[predictor.FaceResult]]:
    """`__call__` on a list of images, always returning one list of faces per image.

    box_source: what a given box is called in the results ('user'; the video tracker says 'track').
    """
    # Every image is read (and every box checked) before any work, so a bad one costs nothing.
    rgb = [as_rgb(im, self.max_pixels) for im in images]
    given_faces = [_as_faces(boxes[i]) if boxes is not None else None for i in range(len(rgb))]
    for image, source, given in zip(rgb, images, given_faces):
      for face in given or ():
        name = str(source) if isinstance(source, (str, os.PathLike)) else 'the image'
        check_box(face.box, image.shape[1], image.shape[0], name)
    results = []
    for image, given in zip(rgb, given_faces):
      if given is None:
        results.append([predictor.FaceResult(f, 'detector') for f in self.detect(image)])
      else:
        results.append([predictor.FaceResult(f, box_source) for f in given])
    count = sum(len(r) for r in results)
    if count:
      # Power-of-two padding: one face costs one crop's compute, not batch_size crops'. A network
      # with a dynamic batch (ONNX) takes any batch as it is, without padding.
      dynamic = getattr(self.network, 'dynamic_batch', False)
      bucket = min(self.batch_size, count if dynamic else 1 << (count - 1).bit_length())
      predictor.predict_faces(rgb, results, self.network, self.image_size, bucket,
                              self.refine if refine is None else bool(refine), pad=not dynamic)
      if self.point_indices is not None:
        for r in (r for faces in results for r in faces):
          r.landmarks = r.landmarks[self.point_indices]
          r.covariances = None if r.covariances is None else r.covariances[self.point_indices]
    return results

  def draw(self, image, faces: Sequence[predictor.FaceResult], show_ambiguity: bool = True) -> np.ndarray:
    """`image` (RGB) with each face's box, landmarks and (optionally) 1-sigma ambiguity ellipses."""
    return predictor.draw(as_rgb(image, self.max_pixels), faces, show_ambiguity)

  def describe(self) -> dict:
    """What this landmarker runs, for output records: checkpoint, step, weights and, when known, how
    they were chosen (best_by_protocol, chosen_by, and pretrained for a released model), layout (of the points returned;
    with `mapped_from`, the network's own, when they are mapped), image size."""
    chosen = {k: v for k, v in (self.selection or {}).items() if k in ('best_by_protocol', 'chosen_by', 'pretrained')}
    out = {'checkpoint': self.checkpoint, 'step': self.step, 'weights': self.weights, **chosen,
           'layout': self.layout, 'image_size': self.image_size}
    if self.point_indices is not None:
      out['mapped_from'] = self.network_layout
    return out

  def summary(self) -> str:
    """One line saying what runs: the checkpoint, its step and weights, and why those."""
    chosen = (self.selection or {}).get('chosen_by')
    step = '' if self.step is None else f'step {self.step}, '
    if self.checkpoint is None:
      return f'a network given in Python, {self.layout or "unnamed"} layout'
    return (f'{self.checkpoint} ({step}{self.weights} weights' + (f': {chosen}' if chosen else '')
            + f'), {self.layout} layout')
