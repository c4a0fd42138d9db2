"""The Python API: facial landmarks and their ambiguity on images, in a few lines.

  import star_jax
  landmarker = star_jax.FaceLandmarker.from_checkpoint('ckpt/wflw')     # or an official 'WFLW.pkl'
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

import cv2
import numpy as np

from star_jax import config_lib
from star_jax import layouts
from star_jax.inference import face_detect
from star_jax.inference import onnx_model
from star_jax.inference import predictor

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.ppm', '.pgm', '.pbm', '.tif', '.tiff', '.webp')
# The config an official checkpoint is converted with when none is given, by its number of points.
DEFAULT_CONFIGS = {98: 'configs/wflw.py', 68: 'configs/300w.py', 29: 'configs/cofw.py'}
# Short names accepted for `config=`.
CONFIG_NAMES = {'wflw': 'configs/wflw.py', '300w': 'configs/300w.py', 'cofw': 'configs/cofw.py'}


# ---- Images -------------------------------------------------------------------------------------

def read_image(path: os.PathLike | str) -> np.ndarray | None:
  """uint8 (H, W, 3) RGB (grey images are converted to 3 channels), or None if unreadable."""
  path = pathlib.Path(path)
  data = np.fromfile(str(path), np.uint8) if path.is_file() else None
  image = cv2.imdecode(data, cv2.IMREAD_COLOR) if data is not None and data.size else None
  if image is None:
    return None
  return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def as_rgb(image) -> np.ndarray:
  """An image argument as uint8 (H, W, 3) RGB: a path is read (FileNotFoundError / ValueError when it
  cannot be), a grey (H, W) or (H, W, 1) array gets 3 channels, an RGBA array loses its alpha."""
  if isinstance(image, (str, os.PathLike)):
    if not pathlib.Path(image).is_file():
      raise FileNotFoundError(f'image {image} does not exist')
    out = read_image(image)
    if out is None:
      raise ValueError(f'{image}: cannot read this file as an image (corrupt or unsupported format)')
    return out
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
    faces: which detected faces to keep per image: 'all' (default), 'largest' or 'best' (score).
    min_face_size, min_face_score: the detector's smallest face (px) and least score.
    refine: crop each face a second time by the bounding box of its first-pass landmarks, the way
      the official demo crops (by a landmark box, not a detector box), and predict again.
    batch_size: most crops per forward pass. Calls pad their crops to a power of two up to this, so
      a network compiles for at most log2(batch_size) + 1 shapes.

  Attributes set by `from_checkpoint` for the record: config (the model's ConfigDict), checkpoint
  (the path), step and weights (which stored weights were read: 'ema', 'model', 'net', 'net_ema'),
  selection (how they were chosen and whether they are the best by the official protocol).
  """

  def __init__(self, network: Callable[[np.ndarray], dict], image_size: int, *, layout: str | None = None,
               detector: Any = 'blazeface', faces: str = 'all',
               min_face_size: float = face_detect.DEFAULT_MIN_FACE_SIZE,
               min_face_score: float = face_detect.DEFAULT_SCORE_THRESHOLD, refine: bool = True,
               batch_size: int = 8):
    if faces not in face_detect.FACE_MODES:
      raise ValueError(f'faces must be one of {", ".join(face_detect.FACE_MODES)}, got {faces!r}')
    if int(batch_size) < 1:
      raise ValueError(f'batch_size must be >= 1, got {batch_size}')
    self.network = network
    self.image_size = int(image_size)
    self.layout = layout
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

    network = models.network_fn(model, with_covariance=covariances, decode=cfg.model.get('decode', 'landmarks'))
    out = cls(network, int(cfg.data.image_size), layout=layouts.get_layout(cfg.layout).name, **options)
    out.config, out.checkpoint, out.step, out.weights = cfg, str(path), step, weights
    out.selection = selection
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
    step = network.metadata.get('step')
    out.checkpoint, out.weights = str(path), network.metadata.get('weights')
    out.step = int(step) if step and step.isdigit() else None
    return out

  # ---- Calls ------------------------------------------------------------------------------------

  def detect(self, image) -> list[face_detect.Face]:
    """The faces the detector finds in `image`, filtered by the `faces` mode (best score first for 'all')."""
    if self.detector is None:
      raise ValueError('this FaceLandmarker has no detector: give the face boxes')
    return face_detect.select(self.detector.detect(as_rgb(image)), self.faces)

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
    rgb = [as_rgb(im) for im in images]
    results = []
    for i, image in enumerate(rgb):
      given = _as_faces(boxes[i]) if boxes is not None else None
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
    return results

  def draw(self, image, faces: Sequence[predictor.FaceResult], show_ambiguity: bool = True) -> np.ndarray:
    """`image` (RGB) with each face's box, landmarks and (optionally) 1-sigma ambiguity ellipses."""
    return predictor.draw(as_rgb(image), faces, show_ambiguity)

  def describe(self) -> dict:
    """What this landmarker runs, for output records: checkpoint, step, weights, layout, image size."""
    return {'checkpoint': self.checkpoint, 'step': self.step, 'weights': self.weights, 'layout': self.layout,
            'image_size': self.image_size}
