"""The PyTorch checkpoint converter (without PyTorch) and model checkpoints (save / load).

tests/testdata/tiny_{wflw,cofw}_checkpoint.pkl are official-format checkpoints (torch.save zip) of the
tiny reference models; tiny_outputs.npz their official outputs (see test_model.py). The full-size
official state-dict layouts (every key and shape of the released WFLW / 300W / COFW models) are in
tests/testdata/tiny_official_layouts.json.gz, from ../shared/reference/pytorch_state_dict_layout.json
(scripts/make_test_data.py rebuilds it, and the other goldens, from the official code).
"""

import collections
import gzip
import json
import os
import pickle
import subprocess
import sys
import types
import zipfile

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from conftest import DATA, OFFICIAL_TINY_FLAGS, OFFICIAL_TINY_MODEL, REPO, load_config
from star_jax import convert_pytorch, layouts
from star_jax import checkpoints
from star_jax.models import create_model

TINY_FLAGS = [*OFFICIAL_TINY_FLAGS, '--config.data.image_size=64']


def config_for(name, arg=''):
  return load_config(name, arg)


def tiny_config(name='wflw'):
  c = config_for(name)
  c.model.update(OFFICIAL_TINY_MODEL)
  c.data.image_size = 64
  return c


@pytest.fixture(scope='module')
def wflw_checkpoint():
  return convert_pytorch.read_torch_checkpoint(str(DATA / 'tiny_wflw_checkpoint.pkl'))


@pytest.fixture(scope='module')
def golden():
  return dict(np.load(DATA / 'tiny_outputs.npz'))


# ---- Reading torch.save archives -----------------------------------------------------------


def test_reads_official_checkpoint_without_torch(wflw_checkpoint):
  # Reading never imports PyTorch, installed or not (here another test may have imported it): a fresh
  # interpreter reads the file and has not loaded torch.
  code = ('import sys; from star_jax import convert_pytorch; '
          f'convert_pytorch.read_torch_checkpoint({str(DATA / "tiny_wflw_checkpoint.pkl")!r}); '
          "assert 'torch' not in sys.modules, 'torch was imported'")
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert proc.returncode == 0, proc.stderr[-2000:]
  ckpt = wflw_checkpoint
  assert set(ckpt) == {'net', 'net_ema', 'epoch'} and ckpt['epoch'] == 7
  net = ckpt['net']
  assert isinstance(net, collections.OrderedDict) and len(net) == 1450
  assert net['pre.0.conv.weight'].shape == (64, 6, 7, 7) and net['pre.0.conv.weight'].dtype == np.float32
  assert net['pre.0.bn.num_batches_tracked'].dtype == np.int64
  assert net['e2h_transform.weight'].shape == (98, 9, 1, 1)
  np.testing.assert_array_equal(net['e2h_transform.weight'][:, :, 0, 0], layouts.WFLW.edge_membership())


# A tiny torch.save writer: fake `torch` / `torch._utils` modules make pickle emit the same globals
# and persistent ids that PyTorch does, so the reader can be tested on hand-made archives.
def _fake_rebuild(*args):
  raise AssertionError('never called: only its name is pickled')


class _FakeFloatStorage:
  pass


class _Storage:
  def __init__(self, key, numel):
    self.key, self.numel = key, numel


class _Tensor:
  def __init__(self, storage, offset, size, stride):
    self.args = (storage, offset, size, stride, False, collections.OrderedDict())

  def __reduce__(self):
    return _fake_rebuild, self.args


class _TorchPickler(pickle.Pickler):
  def persistent_id(self, obj):
    if isinstance(obj, _Storage):
      return ('storage', _FakeFloatStorage, obj.key, 'cpu', obj.numel)
    return None


@pytest.fixture
def fake_torch(monkeypatch):
  torch = types.ModuleType('torch')
  utils = types.ModuleType('torch._utils')
  _fake_rebuild.__module__, _fake_rebuild.__qualname__ = 'torch._utils', '_rebuild_tensor_v2'
  _FakeFloatStorage.__module__, _FakeFloatStorage.__qualname__ = 'torch', 'FloatStorage'
  torch.FloatStorage, utils._rebuild_tensor_v2 = _FakeFloatStorage, _fake_rebuild
  monkeypatch.setitem(sys.modules, 'torch', torch)
  monkeypatch.setitem(sys.modules, 'torch._utils', utils)


def write_archive(path, obj, storages, pickler=_TorchPickler):
  with open(path.with_suffix('.tmp'), 'wb') as f:
    pickler(f, protocol=2).dump(obj)
  with zipfile.ZipFile(path, 'w') as z:
    z.writestr('archive/data.pkl', path.with_suffix('.tmp').read_bytes())
    z.writestr('archive/byteorder', 'little')
    for key, array in storages.items():
      z.writestr(f'archive/data/{key}', np.asarray(array, '<f4').tobytes())


def test_rebuilds_strided_tensors(tmp_path, fake_torch):
  del fake_torch
  storage = _Storage('0', 8)
  obj = {'net': collections.OrderedDict(t=_Tensor(storage, 1, (3, 2), (1, 3)), s=_Tensor(storage, 0, (), ()))}
  write_archive(tmp_path / 'ok.pkl', obj, {'0': np.arange(8)})
  sys.modules.pop('torch')
  got = convert_pytorch.read_torch_checkpoint(str(tmp_path / 'ok.pkl'))['net']
  np.testing.assert_array_equal(got['t'], np.arange(8, dtype=np.float32)[1:7].reshape(2, 3).T)
  assert got['s'].shape == () and got['s'] == 0


def test_rejects_out_of_bounds_tensor_and_missing_storage(tmp_path, fake_torch):
  del fake_torch
  write_archive(tmp_path / 'oob.pkl', {'t': _Tensor(_Storage('0', 4), 2, (10,), (1,))}, {'0': np.zeros(4)})
  with pytest.raises(pickle.UnpicklingError, match='runs past its storage'):
    convert_pytorch.read_torch_checkpoint(str(tmp_path / 'oob.pkl'))
  write_archive(tmp_path / 'missing.pkl', {'t': _Tensor(_Storage('5', 4), 0, (4,), (1,))}, {})
  with pytest.raises(pickle.UnpicklingError, match='missing from the archive'):
    convert_pytorch.read_torch_checkpoint(str(tmp_path / 'missing.pkl'))


class _Evil:
  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return os.system, (f'touch {self.target}',)


def test_refuses_malicious_pickle(tmp_path, monkeypatch):
  sentinel = tmp_path / 'pwned'
  write_archive(tmp_path / 'evil.pkl', {'net': _Evil(sentinel)}, {}, pickler=pickle.Pickler)
  with pytest.raises(convert_pytorch.UnsafeCheckpointError, match=r'system.*refusing'):
    convert_pytorch.read_torch_checkpoint(str(tmp_path / 'evil.pkl'))
  assert not sentinel.exists()
  with pytest.raises(FileNotFoundError, match='does not exist'):
    convert_pytorch.read_torch_checkpoint(str(tmp_path / 'absent.pkl'))
  # The same pickle outside a zip: without PyTorch it is refused as an unknown format, unread.
  (tmp_path / 'evil_raw.pkl').write_bytes(pickle.dumps(_Evil(sentinel), protocol=2))
  monkeypatch.setitem(sys.modules, 'torch', None)  # PyTorch not importable
  with pytest.raises(ValueError, match='needs PyTorch'):
    convert_pytorch.read_torch_checkpoint(str(tmp_path / 'evil_raw.pkl'))
  assert not sentinel.exists()


# ---- Mapping state dicts onto the model ------------------------------------------------------


@pytest.mark.parametrize('name', ['wflw', '300w', 'cofw'])
def test_full_size_official_layouts_map_onto_our_model(name):
  with gzip.open(DATA / 'tiny_official_layouts.json.gz', 'rt') as f:
    official = json.load(f)
  config = config_for(name)
  entry = official[config.layout]
  layout = layouts.get_layout(config.layout)
  assert entry['classes_num'] == [layout.num_points, layout.num_edges, layout.num_points]
  # Concrete build (numpy initialisation, ~1 s); nnx.eval_shape takes longer for this model.
  model = create_model(config, nnx.Rngs(0))
  state_dict = {key: np.zeros(shape, dtype) for key, shape, dtype in entry['state_dict']}
  m = layout.edge_membership()
  state_dict['e2h_transform.weight'] = m[:, :, None, None]
  state_dict['e2h_transform.bias'] = (m.sum(1) == 0).astype(np.float32)
  pure = convert_pytorch.convert_state_dict(state_dict, model)   # raises on any unmapped key
  entries, unused = convert_pytorch.torch_key_map(model)
  paths = [path for path, _, _ in entries]
  ours = [tuple(p) for p, _ in nnx.to_flat_state(nnx.state(model))]
  assert sorted(map(str, paths)) == sorted(map(str, ours)) and len(set(paths)) == len(paths)
  # Parameter count: the official count less the never-used skip projections.
  shapes = {key: shape for key, shape, _ in entry['state_dict']}
  unused_params = sum(int(np.prod(shapes[k])) for k in unused)
  ours_params = sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert ours_params == entry['num_params'] - unused_params
  assert pure['stem']['conv']['kernel'].shape == (7, 7, 6, 64)


def test_converter_names_missing_unexpected_and_misshapen_keys(wflw_checkpoint):
  config = tiny_config()
  model = create_model(config, nnx.Rngs(0))
  good = dict(wflw_checkpoint['net'])
  bad = dict(good)
  del bad['hgs.1.up1.bn1.weight']
  bad['bogus.weight'] = np.zeros(3, np.float32)
  with pytest.raises(ValueError, match=r"missing 1 keys \['hgs.1.up1.bn1.weight'\].*unexpected 1 keys \['bogus.weight'\]"):
    convert_pytorch.convert_state_dict(bad, model)
  bad = dict(good, **{'out_heatmaps.0.conv.weight': np.zeros((97, 32, 1, 1), np.float32)})
  with pytest.raises(ValueError, match=r'out_heatmaps.0.conv.weight: checkpoint shape \(97, 32, 1, 1\).*\(1, 1, 32, 98\)'):
    convert_pytorch.convert_state_dict(bad, model)
  cofw = create_model(tiny_config('cofw'), nnx.Rngs(0))
  with pytest.raises(ValueError, match='edge-to-point transform'):
    convert_pytorch.convert_state_dict(good, cofw)
  # A DataParallel 'module.' prefix is accepted; the skip projections and counters are ignored.
  pure = convert_pytorch.convert_state_dict({f'module.{k}': v for k, v in good.items()}, model)
  np.testing.assert_array_equal(pure['out_heatmaps'][0]['kernel'][0, 0],
                                good['out_heatmaps.0.conv.weight'][:, :, 0, 0].T)
  # Stem: OIHW -> HWIO with the colour input channels reversed, coordinate channels kept.
  np.testing.assert_array_equal(pure['stem']['conv']['kernel'][..., 0, :],
                                good['pre.0.conv.weight'][:, 2].transpose(1, 2, 0))
  np.testing.assert_array_equal(pure['stem']['conv']['kernel'][..., 3:, :],
                                good['pre.0.conv.weight'][:, 3:].transpose(2, 3, 1, 0))


# ---- Command line and checkpoints ------------------------------------------------------------


def test_command_line_converts_tiny_checkpoint(tmp_path, wflw_checkpoint, capsys):
  out = tmp_path / 'converted'
  assert convert_pytorch.main(['convert_pytorch', f'--checkpoint={DATA / "tiny_wflw_checkpoint.pkl"}',
                               f'--config={REPO / "configs" / "wflw.py"}', f'--output={out}', *TINY_FLAGS]) == 0
  assert '(official epoch 7): model <- net; written to' in capsys.readouterr().out   # no EMA item
  loaded = checkpoints.load_model(out)
  model, config = loaded.model, loaded.config
  assert config.model.channels == 32 and config.model.nstack == 4 and config.layout == 'WFLW'
  assert model.stem.bn.use_running_average  # eval mode
  # The stored weights are the converted official ones (test_model.py checks those give the
  # official outputs, so no forward pass here).
  want = convert_pytorch.convert_state_dict(wflw_checkpoint['net'], create_model(config, nnx.Rngs(0)))
  jax.tree.map(np.testing.assert_array_equal, _weights(model), want)
  both = tmp_path / 'both'
  assert convert_pytorch.main(['convert_pytorch', f'--checkpoint={DATA / "tiny_cofw_checkpoint.pkl"}',
                               f'--config={REPO / "configs" / "cofw.py"}', f'--output={both}',
                               '--weights=both', *TINY_FLAGS]) == 0
  assert (both / '0' / 'ema').is_dir() and (both / '0' / 'model').is_dir()
  capsys.readouterr()
  assert convert_pytorch.main(['convert_pytorch', f'--checkpoint={DATA / "tiny_wflw_checkpoint.pkl"}',
                               f'--config={REPO / "configs" / "cofw.py"}', f'--output={tmp_path / "x"}',
                               *TINY_FLAGS]) == 1                 # WFLW weights, COFW config
  assert 'edge-to-point transform' in capsys.readouterr().err
  assert not (tmp_path / 'x').exists()


def _weights(model):
  return nnx.to_pure_dict(nnx.state(model))


def _assert_same(a, b):
  jax.tree.map(np.testing.assert_array_equal, _weights(a), _weights(b))


def test_checkpoint_round_trip_ema_steps_and_extra_items(tmp_path):
  config = config_for('cofw', 'tiny')
  model, ema, other = (create_model(config, nnx.Rngs(s)) for s in (0, 1, 2))
  checkpoints.save_model_checkpoint(tmp_path, model=model, config=config, ema=nnx.state(ema), step=3)
  read = checkpoints.load_model(tmp_path)
  loaded, loaded_config = read.model, read.config
  _assert_same(loaded, ema)                                    # EMA preferred
  assert (read.step, read.weights, read.directory) == (3, 'ema', tmp_path.absolute())  # and said so
  assert loaded_config.to_dict() == config.to_dict()           # tuples come back as tuples
  _assert_same(checkpoints.load_model(tmp_path, weights='model').model, model)
  # A later step written the trainer's way, with items the loader does not know about.
  items = checkpoints.model_save_args(model=other, config=config)
  items['meta'] = ocp.args.JsonSave({'epoch': 9})
  with ocp.CheckpointManager(tmp_path) as manager:
    manager.save(7, args=ocp.args.Composite(**items))
    manager.wait_until_finished()
  latest = checkpoints.load_model(tmp_path)
  _assert_same(latest.model, other)                            # latest step, no ema there
  assert (latest.step, latest.weights) == (7, 'model')
  with pytest.raises(FileNotFoundError, match="no 'ema' weights"):
    checkpoints.load_model(tmp_path, weights='ema')
  _assert_same(checkpoints.load_model(tmp_path, step=3, weights='model').model, model)


def test_checkpoint_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='does not exist'):
    checkpoints.load_model(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match='no checkpoint in'):
    checkpoints.load_model(tmp_path / 'empty')
  config = config_for('cofw', 'tiny')
  model = create_model(config, nnx.Rngs(0))
  wrong = ml_collections.ConfigDict(config.to_dict())
  wrong.model.channels = 16                                     # the stored config lies
  checkpoints.save_model_checkpoint(tmp_path / 'c', model=model, config=wrong, step=1)
  with pytest.raises(FileNotFoundError, match='no step 2'):
    checkpoints.load_model(tmp_path / 'c', step=2)
  with pytest.raises(ValueError, match=r'key .*: stored shape \(.*32.*\) does not fit .* needs \(.*16.*\)'):
    checkpoints.load_model(tmp_path / 'c')
