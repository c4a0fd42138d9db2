"""The official STAR code (a checkout of github.com/ZhenglinZhou/STAR), loaded for side-by-side runs.

A tool of the project (benchmarks and the generators of the test goldens), not part of the installed
library: it needs PyTorch, star_jax does not. The official `lib/__init__.py` imports the whole
training stack (torchvision, tensorboard, ...); these loaders register `lib` and its subpackages as
bare packages instead, so only the modules asked for (and what they import) are loaded.

  from benchmarks import official
  losses = official.losses('/path/to/STAR')          # lib.loss: STARLoss_v2, AWingLoss, ...
  net = official.network('/path/to/STAR', layouts.WFLW)  # StackedHGNetV1, random weights
  utility = official.utility('/path/to/STAR')        # lib.utility: compute_loss, accumulate_net, ...
  cfg = official.config('/path/to/STAR', 'COFW', norm_type='ocular')  # conf.alignment.Alignment
  nme, fr_auc = official.metrics('/path/to/STAR')    # lib.metric: NME, FR_AUC

Some official modules import packages that only the code paths we do not run need (pandas, imageio,
scikit-image, tensorboardX), or names that newer releases removed (scipy's `simps`, PyTorch's
`Tensor.symeig`): where one is missing, a stand-in is put in its place while the module loads (see
`_stand_ins`), or around the call (`legacy_symeig`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import pathlib
import sys
import types

import numpy as np

from star_jax import layouts as layouts_lib

_PACKAGES = ('lib', 'lib.dataset', 'lib.backbone', 'lib.loss', 'lib.metric', 'lib.utils', 'conf')


def check_checkout(path: str) -> pathlib.Path:
  """`path` as a Path; FileNotFoundError unless it is a checkout of the official STAR code."""
  root = pathlib.Path(path)
  if not (root / 'lib' / 'loss' / 'starLoss_v2.py').exists():
    raise FileNotFoundError(f'{path} is not a checkout of the official STAR code (no lib/loss/starLoss_v2.py)')
  return root


def _register(path: str) -> pathlib.Path:
  """Registers the official `lib` and `conf` packages of the checkout `path` without running their __init__."""
  root = check_checkout(path)
  for name in _PACKAGES:
    folder = root.joinpath(*name.split('.'))
    existing = sys.modules.get(name)
    if existing is not None and list(getattr(existing, '__path__', [])) == [str(folder)]:
      continue
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package
  return root


@contextlib.contextmanager
def _stand_ins(modules=(), attributes=()):
  """While the block runs: each of `modules` (name -> module) that cannot be imported is in
  sys.modules, and each of `attributes` ((object, name, value)) that `object` lacks is set on it.
  Afterwards both are taken away again; a module imported meanwhile keeps what it bound."""
  added_modules, added_attributes = [], []
  for name, stand_in in dict(modules).items():
    try:
      importlib.import_module(name)
    except ImportError:
      sys.modules[name] = stand_in
      added_modules.append(name)
  for owner, name, value in attributes:
    if not hasattr(owner, name):
      setattr(owner, name, value)
      added_attributes.append((owner, name))
  try:
    yield
  finally:
    for name in added_modules:
      sys.modules.pop(name, None)
    for owner, name in added_attributes:
      delattr(owner, name)


def _missing(name: str, why: str) -> types.ModuleType:
  """A stand-in module for the package `name`: any of its names can be imported, and calling one
  raises ImportError saying `why` the package was not needed."""
  stand_in = types.ModuleType(name)

  def __getattr__(attribute):  # noqa: N807
    if attribute.startswith('__'):
      raise AttributeError(attribute)

    def unavailable(*args, **kwargs):
      raise ImportError(f'{name} is not installed ({why}); {name}.{attribute} is not available')
    return unavailable

  stand_in.__getattr__ = __getattr__
  return stand_in


def losses(path: str) -> types.ModuleType:
  """The official `lib.loss` package (STARLoss_v2, STARLoss, AWingLoss, SmoothL1Loss, ...).

  STARLoss (v1) calls `Tensor.symeig`, which PyTorch has removed: call it `with legacy_symeig():`."""
  root = _register(path)
  # lib.loss's own __init__ only imports its loss modules: run it for the usual names.
  spec = importlib.util.spec_from_file_location('lib.loss', root / 'lib' / 'loss' / '__init__.py',
                                                submodule_search_locations=[str(root / 'lib' / 'loss')])
  module = importlib.util.module_from_spec(spec)
  sys.modules['lib.loss'] = module
  spec.loader.exec_module(module)
  return module


def network_class(path: str):
  """The official StackedHGNetV1 class."""
  _register(path)
  decoder = importlib.import_module('lib.dataset.decoder')
  sys.modules['lib.dataset'].get_decoder = decoder.get_decoder   # what lib/dataset/__init__ exports
  return importlib.import_module('lib.backbone.stackedHGNetV1').StackedHGNetV1


def network(path: str, layout: layouts_lib.Layout, *, image_size: int = 256, nstack: int = 4,
            nlevels: int = 4, channels: int = 256, use_aam: bool = True):
  """An official StackedHGNetV1 for `layout` (random weights, the official initialisation)."""
  cls = network_class(path)
  config = types.SimpleNamespace(width=image_size, height=image_size, use_AAM=use_aam)
  edge_info = [(closed, list(indices)) for closed, indices in layout.edges]
  return cls(config, [layout.num_points, layout.num_edges, layout.num_points], edge_info,
             nstack=nstack, nlevels=nlevels, in_channel=channels)


@contextlib.contextmanager
def legacy_symeig():
  """While the block runs, `Tensor.symeig(eigenvectors=True)` (deprecated in PyTorch 1.9, since
  removed), which the official STARLoss (v1) calls, is `torch.linalg.eigh(A, UPLO='U')`: symeig read
  the upper triangle by default (PyTorch's own message on the removal gives this replacement)."""
  import torch  # pylint: disable=import-outside-toplevel
  saved = torch.Tensor.__dict__.get('symeig')
  torch.Tensor.symeig = lambda self, eigenvectors=False, upper=True: torch.linalg.eigh(
      self, UPLO='U' if upper else 'L')
  try:
    yield
  finally:
    if saved is None:
      del torch.Tensor.symeig
    else:
      torch.Tensor.symeig = saved


def alignment_dataset(path: str) -> types.ModuleType:
  """The official `lib.dataset.alignmentDataset` module. scikit-image is only needed for its 5-point
  alignment, which the crop pipeline never uses, pandas for reading a TSV file and imageio for images
  OpenCV cannot read: stand-ins take their place when they are not installed."""
  _register(path)
  skimage = types.ModuleType('skimage')
  skimage.transform = types.SimpleNamespace(SimilarityTransform=None)
  with _stand_ins({'skimage': skimage, 'pandas': _missing('pandas', 'AlignmentDataset reads its TSV with it'),
                   'imageio': _missing('imageio', 'for images OpenCV cannot read')}):
    return importlib.import_module('lib.dataset.alignmentDataset')


def config(path: str, dataset: str, **settings):
  """The official configuration `conf.alignment.Alignment` for `dataset` ('WFLW', '300W' or 'COFW'),
  with `settings` given as its command-line arguments are (e.g. norm_type='ocular'): edge_info,
  flip_mapping, classes_num, nme_left_index / nme_right_index, ... tensorboardX is only needed for the
  writer of a training run: a stand-in takes its place when it is not installed."""
  _register(path)
  with _stand_ins({'tensorboardX': _missing('tensorboardX', 'only a training run writes its logs')}):
    alignment = importlib.import_module('conf.alignment')
  return alignment.Alignment(types.SimpleNamespace(data_definition=dataset, **settings))


def metrics(path: str) -> tuple[type, type]:
  """The official (NME, FR_AUC) classes of lib/metric. fr_and_auc.py imports scipy's `simps`, which
  scipy 1.14 removed: `simpson` stands in under that name while it loads where it is missing. (For an
  even number of points, scipy >= 1.11 ends Simpson's rule with Cartwright's correction; the older
  `simps` averaged two trapezoid-ended variants.)"""
  _register(path)
  import scipy.integrate  # pylint: disable=import-outside-toplevel
  nme = importlib.import_module('lib.metric.nme')
  with _stand_ins(attributes=[(scipy.integrate, 'simps', scipy.integrate.simpson)]):
    fr_and_auc = importlib.import_module('lib.metric.fr_and_auc')
  return nme.NME, fr_and_auc.FR_AUC


def module(path: str, name: str) -> types.ModuleType:
  """Any official module by dotted name, e.g. 'lib.metric.nme' or 'lib.dataset.encoder.encoder_default'."""
  _register(path)
  return importlib.import_module(name)


def _run_package_init(root: pathlib.Path, name: str) -> types.ModuleType:
  """Runs the official package `name`'s own __init__ (for packages whose __init__ imports nothing we lack)."""
  folder = root.joinpath(*name.split('.'))
  spec = importlib.util.spec_from_file_location(name, folder / '__init__.py', submodule_search_locations=[str(folder)])
  package = importlib.util.module_from_spec(spec)
  sys.modules[name] = package
  spec.loader.exec_module(package)
  return package


def utility(path: str) -> types.ModuleType:
  """The official `lib.utility` module: `compute_loss`, `accumulate_net`, `forward_backward`, ...

  Its imports are satisfied as the packages' own __init__ files would (StackedHGNetV1, AlignmentDataset,
  the decoders and encoders, NME, FR_AUC, the loss classes, lib.utils); torchvision (for the data loader's
  transforms) and the data set's optional packages get stand-ins when they are not installed."""
  root = _register(path)
  net_class = network_class(path)
  sys.modules['lib.backbone'].StackedHGNetV1 = net_class
  dataset = sys.modules['lib.dataset']
  dataset.AlignmentDataset = alignment_dataset(path).AlignmentDataset
  dataset.get_encoder = importlib.import_module('lib.dataset.encoder').get_encoder
  dataset.Augmentation = importlib.import_module('lib.dataset.augmentation').Augmentation
  nme, fr_auc = metrics(path)
  sys.modules['lib.metric'].NME, sys.modules['lib.metric'].FR_AUC = nme, fr_auc
  losses(path)
  _run_package_init(root, 'lib.utils')
  why = 'only the data loader of a training run uses it'
  with _stand_ins({'torchvision': _missing('torchvision', why), 'torchvision.transforms': _missing('torchvision', why),
                   'tensorboardX': _missing('tensorboardX', 'only a training run writes its logs')}):
    return importlib.import_module('lib.utility')


def train_step(path: str, batch_np: dict, *, nstack: int = 4, layout: layouts_lib.Layout = layouts_lib.WFLW,
               image_size: int = 256, channels: int = 256, decay: float = 0.5 ** (128 / 10000.0),
               device: str = 'cpu'):
  """The official training step on `batch_np`: returns (run_one_step(anomaly: bool) -> loss, note).

  Follows the official trainer (utility.forward_backward, compute_loss, accumulate_net) with its
  config (conf/alignment.py): per stack i the weights 2^i / 2^(nstack - 1) x (1, 10, 10) for
  STARLoss_v2(w=1, smoothl1) on the fusion heatmaps and AWingLoss on the point and edge maps; Adam
  (lr 1e-3); EMA decay 0.5 ** (128 / 10000) over parameters and floating-point buffers (integer
  buffers copied). The labels are moved to float tensors once, outside the timing, as the batch is.
  `batch_np`: channels-last numpy arrays as our input pipeline makes them ('image' uint8 RGB).
  `device`: the torch device of the networks, the batch, Adam and the EMA ('cpu', 'cuda', 'cuda:1'...),
  as the official trainer puts them on its GPU (STARLoss_v2 still takes its eigendecomposition on the
  CPU there, as shipped). On a CUDA device each step ends with `torch.cuda.synchronize`, so that the
  caller's clock around `run_one_step` times the whole step; the official per-term `.item()` calls sync
  too. The note names the device, and `run_one_step.peak_bytes()` is torch's peak CUDA memory (0 on a
  CPU).
  """
  import torch  # pylint: disable=import-outside-toplevel
  loss_pkg = losses(path)
  torch.manual_seed(0)
  device = torch.device(device)
  cuda = device.type == 'cuda'
  if cuda:
    torch.backends.cudnn.benchmark = True   # as the official set_environment (lib/utility.py) does

  def build():
    return network(path, layout, image_size=image_size, nstack=nstack, channels=channels)

  net = build().float().to(device).train()
  net_ema = build().float().to(device).eval()
  net_ema.load_state_dict(net.state_dict())
  criterions = []
  for _ in range(nstack):
    criterions += [loss_pkg.STARLoss_v2(dist='smoothl1', w=1), loss_pkg.AWingLoss(), loss_pkg.AWingLoss()]
  weights = [2.0 ** i / 2.0 ** (nstack - 1) * w for i in range(nstack) for w in (1.0, 10.0, 10.0)]
  optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
  # Official input: (pixel - 127.5) / 127.5, NCHW, BGR. Labels NCHW, one list entry per output.
  image = torch.from_numpy((batch_np['image'][..., ::-1].astype(np.float32) - 127.5) / 127.5)
  image = image.permute(0, 3, 1, 2).contiguous().to(device)
  per_stack = [torch.from_numpy(batch_np['landmarks']).to(device),
               torch.from_numpy(batch_np['pointmaps']).permute(0, 3, 1, 2).contiguous().to(device),
               torch.from_numpy(batch_np['edgemaps']).permute(0, 3, 1, 2).contiguous().to(device)]
  labels = nstack * per_stack
  ema_params = dict(net_ema.named_parameters())
  ema_buffers = dict(net_ema.named_buffers())

  def run_one_step(anomaly: bool) -> float:
    with torch.autograd.set_detect_anomaly(anomaly):
      output, fusion_maps, _ = net(image)
      total = 0.0
      for k, criterion in enumerate(criterions):
        # The official compute_loss: STAR sees the stack's fusion heatmaps, AWing the maps in `output`.
        pred = fusion_maps[k // 3] if k % 3 == 0 else output[k]
        loss = criterion(pred, labels[k])
        total = total + weights[k] * loss
        float(loss.detach())          # the official logs every term with .item() each step
      optimizer.zero_grad()
      total.backward()
      optimizer.step()
    with torch.no_grad():             # the official accumulate_net(net_ema, net, decay)
      for key, p in net.named_parameters():
        ema_params[key].mul_(decay).add_(p, alpha=1 - decay)
      for key, b in net.named_buffers():
        if b.is_floating_point():
          ema_buffers[key].mul_(decay).add_(b, alpha=1 - decay)
        else:
          ema_buffers[key].copy_(b)
    loss = float(total.detach())
    if cuda:
      # Reading the loss already waited for the EMA kernels queued before it on the same stream; the
      # explicit sync makes the end of the step independent of that.
      torch.cuda.synchronize(device)
    return loss

  def peak_bytes() -> int:
    return int(torch.cuda.max_memory_allocated(device)) if cuda else 0

  run_one_step.peak_bytes = peak_bytes
  if cuda:
    note = (f'torch {torch.__version__}, {torch.cuda.get_device_name(device)} (cuda), cudnn.benchmark, '
            f'cudnn.allow_tf32 {torch.backends.cudnn.allow_tf32}, matmul.allow_tf32 '
            f'{torch.backends.cuda.matmul.allow_tf32}')
  else:
    note = f'torch {torch.__version__}, {torch.get_num_threads()} threads'
  return run_one_step, note


@contextlib.contextmanager
def pure64():
  """While the block runs, `Tensor.float()` returns float64: the official code's float32 islands (the
  coordinate grids of the losses and the decoder, the CoordConv channels, the encoders' target maps,
  which it builds with `.float()` whatever the network's dtype) run in float64 too, so a float64 run
  is float64 throughout."""
  import torch  # pylint: disable=import-outside-toplevel
  saved = torch.Tensor.float
  torch.Tensor.float = lambda self, memory_format=torch.preserve_format: self.double(memory_format=memory_format)
  try:
    yield
  finally:
    torch.Tensor.float = saved


class Trainer:
  """The official training step, run by the official pieces as `lib.utility.forward_backward` runs them.

  Per step: the network's forward pass in train mode, `compute_loss` with the criterions of
  `get_criterions` (STARLoss_v2 on the fusion heatmaps, AWingLoss on point and edge maps, weighted
  2^i / 2^(nstack - 1) x (1, 10, 10) by the official config), `optimizer.zero_grad()`, `backward()`
  (without the anomaly detection the official loop wraps it in: it checks, it does not change values),
  the Adam of `get_optimizer` (lr 1e-3), then `accumulate_net(net_ema, net, 0.5 ** (batch_size / 10000))`.
  The EMA network starts as a copy of the network, as the official trainer makes it (`accumulate_net`
  with decay 0). The learning rate stays at its initial value (the official scheduler steps per epoch).

  `state_dict`: the initial weights (official layout). `dtype`: torch.float32 (as shipped) or
  torch.float64 (`net.double()`; the float32 islands stay float32 unless the steps run inside
  `pure64()`).
  """

  def __init__(self, path: str, state_dict, *, layout_name: str = 'WFLW', image_size: int = 64, nstack: int = 4,
               nlevels: int = 4, channels: int = 16, batch_size: int = 4, dtype=None):
    import torch  # pylint: disable=import-outside-toplevel
    self.torch = torch
    self.utility = utility(path)
    self.dtype = dtype or torch.float32
    cfg = config(path, layout_name, width=image_size, height=image_size, batch_size=batch_size, nstack=nstack)
    self.config = cfg

    def build():
      net = network_class(path)(config=cfg, classes_num=cfg.classes_num, edge_info=cfg.edge_info, nstack=nstack,
                                nlevels=nlevels, in_channel=channels, add_coord=cfg.add_coord,
                                decoder_type=cfg.decoder_type)
      net.load_state_dict(state_dict)
      return net.to(self.dtype)

    self.net = build().train()
    self.net_ema = build().eval()
    self.utility.accumulate_net(self.net_ema, self.net, 0)
    self.criterions = self.utility.get_criterions(cfg)
    self.optimizer = self.utility.get_optimizer(cfg, self.net)
    self.decay = 0.5 ** (cfg.batch_size / 10000.0)

  def inputs(self, image_rgb_uint8: np.ndarray):
    """(B, S, S, 3) uint8 RGB -> the network's input (B, 3, S, S) BGR, (pixel - 127.5) / 127.5, in
    the network's dtype (computed in float64 and rounded once)."""
    bgr = image_rgb_uint8[..., ::-1].astype(np.float64).transpose(0, 3, 1, 2)
    return self.torch.from_numpy(np.ascontiguousarray((bgr - 127.5) / 127.5)).to(self.dtype)

  def labels(self, landmarks: np.ndarray, pointmaps: np.ndarray, edgemaps: np.ndarray) -> list:
    """The per-stack labels of compute_loss from (B, N, 2) landmarks in [-1, 1] and NCHW point / edge maps."""
    per_stack = [self.torch.from_numpy(np.ascontiguousarray(a)).to(self.dtype) for a in (landmarks, pointmaps, edgemaps)]
    return self.config.nstack * per_stack

  def step(self, inputs, labels) -> tuple[list[float], float]:
    """One training step; returns (the 12 unweighted loss terms as compute_loss logs them, the total)."""
    output, heatmaps, landmarks = self.net(inputs)
    losses, total = self.utility.compute_loss(self.config, self.criterions, output, labels, heatmaps, landmarks)
    self.optimizer.zero_grad()
    total.backward()
    self.optimizer.step()
    self.utility.accumulate_net(self.net_ema, self.net, self.decay)
    return losses, float(total.detach())

  def gradients(self) -> dict[str, np.ndarray]:
    """The last step's gradient of every parameter (zeros for those that got none), official keys."""
    return {k: (p.grad if p.grad is not None else self.torch.zeros_like(p)).detach().double().numpy().copy()
            for k, p in self.net.named_parameters()}

  def adam_moments(self) -> tuple[dict, dict]:
    """Adam's (exp_avg, exp_avg_sq) per parameter that has them, official keys."""
    names = {id(p): k for k, p in self.net.named_parameters()}
    mu, nu = {}, {}
    for p, s in self.optimizer.state.items():
      mu[names[id(p)]] = s['exp_avg'].detach().double().numpy().copy()
      nu[names[id(p)]] = s['exp_avg_sq'].detach().double().numpy().copy()
    return mu, nu
