"""An exported ONNX landmark model (`python -m star_jax.export`) run by onnxruntime, without JAX.

  network = OnnxNetwork('wflw.onnx')          # checks the file against the export contract
  out = network(crops)                        # crops uint8 (B, S, S, 3) RGB -> dict of numpy arrays

`OnnxNetwork` is the network function `FaceLandmarker` takes (`FaceLandmarker.from_onnx` builds one):
it returns 'landmarks' (B, P, 2) as (x, y) in [-1, 1] of the crop (the normalised align_corners=False
frame of `star_jax.models.network_fn`) and 'covariances' (B, P, 2, 2) in the same frame, converted from the
exported model's crop pixels by the inverse of `export.to_crop_pixels`.

What the file must carry (the export writes it): input 'image' float32 (N, S, S, 3) and outputs
'landmarks' (N, P, 2) and 'covariances' (N, P, 2, 2), and the metadata_props 'contract', 'image_size'
(S) and 'num_points' (P), plus 'layout' (a name), optionally 'layout_spec' (a layout file's JSON),
'weights' and 'step' for the record. Imports only numpy and onnxruntime (`pip install onnxruntime`).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

# The names of the export contract (star_jax.export.INPUT_NAME / OUTPUT_NAMES; not imported from
# there, since that module is the JAX side).
INPUT_NAME = 'image'
OUTPUT_NAMES = ('landmarks', 'covariances')
REQUIRED_METADATA = ('contract', 'image_size', 'num_points')


class OnnxModelError(ValueError):
  """The file is not an ONNX landmark model of star_jax's export contract (or cannot be read)."""


def _dims(value) -> list:
  """An onnxruntime NodeArg's shape: ints for fixed dimensions, str or None for symbolic ones."""
  return list(value.shape) if value.shape is not None else []


def to_normalized(landmarks_px: np.ndarray, covariances_px: np.ndarray | None, image_size: int):
  """Crop pixels (the export's outputs) -> the normalised frame of the network in [-1, 1].

  The inverse of `star_jax.export.to_crop_pixels`: l = (2 p + 1) / S - 1, covariances / (S / 2)^2.
  """
  half = image_size / 2.0
  landmarks = (np.asarray(landmarks_px, np.float32) + 0.5) / half - 1.0
  cov = None if covariances_px is None else np.asarray(covariances_px, np.float32) / (half * half)
  return landmarks, cov


class OnnxNetwork:
  """An exported model in an onnxruntime session, as a `FaceLandmarker` network function.

  Args:
    path: the .onnx file written by `python -m star_jax.export`.
    with_covariance: also return 'covariances' (the ambiguity); the model computes them in any case.
    providers: onnxruntime execution providers (default: the CPU's).
    threads: onnxruntime's intra-op threads (default: onnxruntime's choice, one per core).

  Attributes: image_size (S), num_points (P), layout (its name, or None), metadata (all the file's
  metadata_props), dynamic_batch (True: any batch size runs without padding or recompiling).
  Raises FileNotFoundError for a missing file, OnnxModelError for a file that is not such a model
  (with a one-line reason), ImportError (worded) when onnxruntime is not installed.
  """

  dynamic_batch = True

  def __init__(self, path: os.PathLike | str, *, with_covariance: bool = True, providers=None,
               threads: int | None = None):
    path = pathlib.Path(path)
    if not path.is_file():
      raise FileNotFoundError(f'ONNX model {path} does not exist')
    try:
      import onnxruntime  # lazy: optional extra (the 'onnx' extra; the rest of the module needs numpy only)
    except ImportError:
      raise ImportError('running an ONNX model needs onnxruntime: pip install onnxruntime '
                        "(or pip install 'star_jax[onnx]')") from None
    options = onnxruntime.SessionOptions()
    if threads:
      options.intra_op_num_threads = int(threads)
    try:
      session = onnxruntime.InferenceSession(str(path), options, providers=providers or ['CPUExecutionProvider'])
    except Exception as e:  # onnxruntime raises its own exception types for unreadable files
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise OnnxModelError(f'{path}: onnxruntime cannot load it as an ONNX model: {first}') from None
    self.path, self.session, self.with_covariance = path, session, bool(with_covariance)
    self.metadata = dict(session.get_modelmeta().custom_metadata_map)
    self.image_size, self.num_points = self._check_contract()
    self.layout = self.metadata.get('layout') or None
    self.outputs = list(OUTPUT_NAMES) if self.with_covariance else [OUTPUT_NAMES[0]]

  def _check_contract(self) -> tuple[int, int]:
    """(S, P) from the metadata, checked against the graph's input and outputs."""
    where = f'{self.path}: not a star_jax landmark model (export it with python -m star_jax.export)'
    missing = [k for k in REQUIRED_METADATA if k not in self.metadata]
    if missing:
      raise OnnxModelError(f'{where}: its metadata lacks {", ".join(missing)}')
    try:
      size, points = int(self.metadata['image_size']), int(self.metadata['num_points'])
    except ValueError:
      raise OnnxModelError(f'{where}: metadata image_size {self.metadata["image_size"]!r} and num_points '
                           f'{self.metadata["num_points"]!r} must be integers') from None
    inputs = {v.name: v for v in self.session.get_inputs()}
    outputs = {v.name: v for v in self.session.get_outputs()}
    expected = {INPUT_NAME: ([size, size, 3], inputs), OUTPUT_NAMES[0]: ([points, 2], outputs),
                OUTPUT_NAMES[1]: ([points, 2, 2], outputs)}
    if sorted(inputs) != [INPUT_NAME]:
      raise OnnxModelError(f"{where}: its inputs are {sorted(inputs)}, the contract has one, '{INPUT_NAME}'")
    for name, (tail, values) in expected.items():
      if name not in values:
        raise OnnxModelError(f"{where}: it has no output '{name}' (outputs: {sorted(outputs)})")
      value = values[name]
      dims = _dims(value)
      if value.type != 'tensor(float)' or len(dims) != len(tail) + 1 or dims[1:] != tail:
        shape = ', '.join(str(d) for d in dims)
        want = ', '.join(['N'] + [str(d) for d in tail])
        raise OnnxModelError(f"{where}: '{name}' is {value.type} ({shape}); the contract with the metadata's "
                             f'image_size {size} and num_points {points} is tensor(float) ({want})')
    return size, points

  def __call__(self, images: np.ndarray) -> dict:
    """images uint8 (or float) (B, S, S, 3) RGB 0-255 -> {'landmarks': (B, P, 2) in [-1, 1],
    'covariances': (B, P, 2, 2) (with `with_covariance`)}, float32 numpy arrays."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f'crops must be (B, {self.image_size}, {self.image_size}, 3), got {images.shape}')
    out = self.session.run(self.outputs, {INPUT_NAME: images.astype(np.float32)})
    landmarks, cov = to_normalized(out[0], out[1] if self.with_covariance else None, self.image_size)
    result = {'landmarks': landmarks}
    if cov is not None:
      result['covariances'] = cov
    return result
