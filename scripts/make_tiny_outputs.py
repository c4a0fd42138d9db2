"""Makes tests/data/tiny_outputs.npz (run once by hand; needs PyTorch and the official STAR code).

  /work/torchvenv/bin/python scripts/make_tiny_outputs.py /tmp/star_ref /work/shared/reference

Contents, for D in WFLW, COFW (tiny StackedHGNetV1: input 64, nstack 4, nlevels 4, 32 channels):
- `input_nchw` (2, 3, 64, 64): the official test input (BGR order as the official net sees it).
- `D/f32/{eval,train}/...`: a subset of the official float32 goldens of ../shared/reference/
  tiny_model.npz: landmarks of every stack; point / fusion maps (every 12th channel for WFLW, 7th
  for COFW) and edge maps (every 3rd), NCHW, of stacks 0 and 3 in eval mode and of stack 0 in train
  mode.
- `D/f64/{eval,train}/...`: outputs recomputed by the official network in float64 with the weights
  of tiny_{d}_checkpoint.pkl: landmarks (float64) of every stack and, in train mode, the maps of
  stack 1 (the same channel subset, rounded to float32 to keep the file small). With these random
  weights, train mode (batch statistics) is ill-conditioned: the official float32 and float64
  results differ by 2e-5 at stack 0 and up to 2e-2 at stack 3, so float32 goldens cannot check it
  tightly; the official code's float64 run can (see tests/test_model.py).
"""

import sys
import types

import numpy as np
import torch

POINT_STEP = {'WFLW': 12, 'COFW': 7}


def official_net(ref):
  # Import lib/backbone without lib/__init__ (which pulls in torchvision, skimage, ...).
  for name, path in (('lib', f'{ref}/lib'), ('lib.dataset', f'{ref}/lib/dataset'),
                     ('lib.backbone', f'{ref}/lib/backbone')):
    m = types.ModuleType(name)
    m.__path__ = [path]
    sys.modules[name] = m
  import lib.dataset.decoder as dec  # pylint: disable=import-outside-toplevel
  sys.modules['lib.dataset'].get_decoder = dec.get_decoder
  from lib.backbone.stackedHGNetV1 import StackedHGNetV1  # pylint: disable=import-outside-toplevel
  return StackedHGNetV1


def subset(d, name, array, keep_maps):
  if name == 'landmarks':
    return array
  if not keep_maps:
    return None
  return array[:, ::3 if name == 'edgemaps' else POINT_STEP[d]].astype(np.float32)


def main(ref, shared):
  net_cls = official_net(ref)
  from star_jax import convert_pytorch, layouts  # pylint: disable=import-outside-toplevel
  gold = np.load(f'{shared}/tiny_model.npz')
  out = {'input_nchw': gold['WFLW/input_nchw']}
  assert np.array_equal(gold['WFLW/input_nchw'], gold['COFW/input_nchw'])
  for d in ('WFLW', 'COFW'):
    layout = layouts.get_layout(d)
    cfg = types.SimpleNamespace(width=64, height=64, use_AAM=True)
    edge_info = [(closed, list(idx)) for closed, idx in layout.edges]
    net = net_cls(cfg, [layout.num_points, layout.num_edges, layout.num_points], edge_info,
                  nstack=4, nlevels=4, in_channel=32)
    sd = convert_pytorch.read_torch_checkpoint(f'{shared}/tiny_{d.lower()}_checkpoint.pkl')['net']
    net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})
    net = net.double()
    x = torch.from_numpy(gold[f'{d}/input_nchw']).double()
    for mode in ('eval', 'train'):
      getattr(net, mode)()
      with torch.no_grad():
        y, fusion, _ = net(x)
      for i in range(4):
        f64 = {'landmarks': y[3 * i], 'pointmaps': y[3 * i + 1], 'edgemaps': y[3 * i + 2],
               'fusion_heatmaps': fusion[i]}
        keep32 = i == 0 or (mode == 'eval' and i == 3)
        keep64 = mode == 'train' and i == 1
        for name, value in f64.items():
          a = subset(d, name, value.numpy(), keep64)
          if a is not None:
            out[f'{d}/f64/{mode}/stack{i}/{name}'] = a
          a = subset(d, name, gold[f'{d}/{mode}/stack{i}/{name}'], keep32)
          if a is not None:
            out[f'{d}/f32/{mode}/stack{i}/{name}'] = a
      net.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()})  # undo BN updates
      net = net.double()
  np.savez_compressed('tests/data/tiny_outputs.npz', **out)
  for k, v in out.items():
    print(k, v.shape, v.dtype)


if __name__ == '__main__':
  main(*sys.argv[1:3])
