"""The official STAR code (a checkout of github.com/ZhenglinZhou/STAR), loaded for side-by-side runs.

A tool of the project (benchmarks and the generators of the test goldens), not part of the installed
library: it needs PyTorch, star_jax does not. The official `lib/__init__.py` imports the whole
training stack (torchvision, tensorboard, ...); these loaders register `lib` and its subpackages as
bare packages instead, so only the modules asked for (and what they import) are loaded.

  from benchmarks import official
  losses = official.losses('/path/to/STAR')          # lib.loss: STARLoss_v2, AWingLoss, ...
  net = official.network('/path/to/STAR', layouts.WFLW)  # StackedHGNetV1, random weights
"""

from __future__ import annotations

import importlib
import importlib.util
import pathlib
import sys
import types

import numpy as np

from star_jax import layouts as layouts_lib

_PACKAGES = ('lib', 'lib.dataset', 'lib.backbone', 'lib.loss', 'lib.metric', 'lib.utils')


def _register(path: str) -> pathlib.Path:
  """Registers the official `lib` packages of the checkout `path` without running their __init__."""
  root = pathlib.Path(path)
  if not (root / 'lib' / 'loss' / 'starLoss_v2.py').exists():
    raise FileNotFoundError(f'{path} is not a checkout of the official STAR code (no lib/loss/starLoss_v2.py)')
  for name in _PACKAGES:
    folder = root.joinpath(*name.split('.'))
    existing = sys.modules.get(name)
    if existing is not None and list(getattr(existing, '__path__', [])) == [str(folder)]:
      continue
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package
  return root


def losses(path: str) -> types.ModuleType:
  """The official `lib.loss` package (STARLoss_v2, STARLoss, AWingLoss, SmoothL1Loss, ...)."""
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


def alignment_dataset(path: str) -> types.ModuleType:
  """The official `lib.dataset.alignmentDataset` module. scikit-image is only needed for its 5-point
  alignment, which the crop pipeline never uses: a stub stands in when it is not installed."""
  _register(path)
  try:
    import skimage  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    stub = types.ModuleType('skimage')
    stub.transform = types.SimpleNamespace(SimilarityTransform=None)
    sys.modules.setdefault('skimage', stub)
  return importlib.import_module('lib.dataset.alignmentDataset')


def module(path: str, name: str) -> types.ModuleType:
  """Any official module by dotted name, e.g. 'lib.metric.nme' or 'lib.dataset.encoder.encoder_default'."""
  _register(path)
  return importlib.import_module(name)


def train_step(path: str, batch_np: dict, *, nstack: int = 4, layout: layouts_lib.Layout = layouts_lib.WFLW,
               image_size: int = 256, channels: int = 256, decay: float = 0.5 ** (128 / 10000.0)):
  """The official training step on `batch_np`: returns (run_one_step(anomaly: bool) -> loss, note).

  Follows the official trainer (utility.forward_backward, compute_loss, accumulate_net) with its
  config (conf/alignment.py): per stack i the weights 2^i / 2^(nstack - 1) x (1, 10, 10) for
  STARLoss_v2(w=1, smoothl1) on the fusion heatmaps and AWingLoss on the point and edge maps; Adam
  (lr 1e-3); EMA decay 0.5 ** (128 / 10000) over parameters and floating-point buffers (integer
  buffers copied). The labels are moved to float tensors once, outside the timing, as the batch is.
  `batch_np`: channels-last numpy arrays as our input pipeline makes them ('image' uint8 RGB).
  """
  import torch  # pylint: disable=import-outside-toplevel
  loss_pkg = losses(path)
  torch.manual_seed(0)

  def build():
    return network(path, layout, image_size=image_size, nstack=nstack, channels=channels)

  net = build().float().train()
  net_ema = build().float().eval()
  net_ema.load_state_dict(net.state_dict())
  criterions = []
  for _ in range(nstack):
    criterions += [loss_pkg.STARLoss_v2(dist='smoothl1', w=1), loss_pkg.AWingLoss(), loss_pkg.AWingLoss()]
  weights = [2.0 ** i / 2.0 ** (nstack - 1) * w for i in range(nstack) for w in (1.0, 10.0, 10.0)]
  optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
  # Official input: (pixel - 127.5) / 127.5, NCHW, BGR. Labels NCHW, one list entry per output.
  image = torch.from_numpy((batch_np['image'][..., ::-1].astype(np.float32) - 127.5) / 127.5)
  image = image.permute(0, 3, 1, 2).contiguous()
  per_stack = [torch.from_numpy(batch_np['landmarks']),
               torch.from_numpy(batch_np['pointmaps']).permute(0, 3, 1, 2).contiguous(),
               torch.from_numpy(batch_np['edgemaps']).permute(0, 3, 1, 2).contiguous()]
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
    return float(total.detach())

  note = f'torch {torch.__version__}, {torch.get_num_threads()} threads'
  return run_one_step, note
