"""Fine-tuning: `config.init_from` starts a run from an official .pkl or one of our checkpoints (model
and EMA weights; fresh optimizer, step 0), checking that the weights fit the config."""

import jax
import numpy as np
import pytest
from flax import nnx

from conftest import DATA, OFFICIAL_TINY_MODEL, load_config, train_tiny
from star_jax import checkpoints
from star_jax import convert_pytorch
from star_jax.checkpoints import init_from
from star_jax.models import create_model
from star_jax.training import state as state_lib

PKL = str(DATA / 'tiny_wflw_checkpoint.pkl')   # the official tiny WFLW net: input 64, 4 stacks, 32 channels


def _config(name='synthetic', **model):
  config = load_config(name, 'tiny')
  config.model.update(OFFICIAL_TINY_MODEL, **model)
  return config


def _fresh(config):
  tx = state_lib.make_optimizer(config, 10)
  return state_lib.create_train_state(config, tx, config.seed)[1]


def _tree(params, batch_stats):
  return nnx.to_pure_dict(nnx.merge_state(params, batch_stats))


def _equal(a, b):
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_init_from_an_official_pkl_takes_net_and_net_ema():
  config = _config()
  fresh = _fresh(config)
  state, summary = init_from.initialize_from(PKL, config, fresh)
  obj = convert_pytorch.read_torch_checkpoint(PKL)
  want = convert_pytorch.convert_state_dict(obj['net'], create_model(config, nnx.Rngs(0)))
  _equal(_tree(state.params, state.batch_stats), want)
  want_ema = convert_pytorch.convert_state_dict(obj['net_ema'], create_model(config, nnx.Rngs(0)))
  _equal(_tree(state.ema_params, state.ema_batch_stats), want_ema)
  # A fresh start: step 0, Adam's moments zero.
  assert int(state.step) == 0
  assert all(float(np.abs(x).max()) == 0 for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
  assert summary == {'source': PKL, 'format': 'official', 'epoch': 7, 'kept_fresh': []}


def test_init_from_our_checkpoint_takes_model_and_ema(tmp_path):
  config = _config()
  model, ema = create_model(config, nnx.Rngs(11)), create_model(config, nnx.Rngs(12))
  checkpoints.save_model_checkpoint(tmp_path / 'ckpt', model=model, config=config, ema=ema, step=5)
  state, summary = init_from.initialize_from(str(tmp_path / 'ckpt'), config, _fresh(config))
  _equal(_tree(state.params, state.batch_stats), nnx.to_pure_dict(nnx.state(model)))
  _equal(_tree(state.ema_params, state.ema_batch_stats), nnx.to_pure_dict(nnx.state(ema)))
  assert (summary['format'], summary['step'], summary['kept_fresh']) == ('star_jax', 5, [])


def test_init_from_names_the_misfits_and_can_load_what_fits(tmp_path):
  cofw = _config('cofw')                       # 29 points: the WFLW heads do not fit
  with pytest.raises(init_from.InitFromError, match='edge-to-point transform|does not fit'):
    init_from.initialize_from(PKL, cofw, _fresh(cofw))
  cofw.init_from_strict = False
  fresh = _fresh(cofw)
  state, summary = init_from.initialize_from(PKL, cofw, fresh)
  kept = summary['kept_fresh']
  # The per-point heads and the layers fed by them keep their fresh values; the body is loaded.
  assert 'out_heatmaps/0/kernel' in kept and 'merge_heatmaps/0/kernel' in kept and 'stem/conv/kernel' not in kept
  got, before = _tree(state.params, state.batch_stats), _tree(fresh.params, fresh.batch_stats)
  np.testing.assert_array_equal(got['out_heatmaps'][0]['kernel'], before['out_heatmaps'][0]['kernel'])
  assert not np.array_equal(got['stem']['conv']['kernel'], before['stem']['conv']['kernel'])
  # The EMA has arrays of its own, the kept ones too: the train step donates the state, and one
  # buffer cannot be donated twice.
  ema_ids = {id(x) for x in jax.tree.leaves(_tree(state.ema_params, state.ema_batch_stats))}
  assert not ema_ids & {id(x) for x in jax.tree.leaves(got)}
  # Our checkpoint of another layout: refused with both layouts named, unless not strict.
  wflw = _config()
  checkpoints.save_model_checkpoint(tmp_path / 'w', model=create_model(wflw, nnx.Rngs(1)), config=wflw, step=1)
  cofw.init_from_strict = True
  with pytest.raises(init_from.InitFromError, match='WFLW layout, this config is COFW'):
    init_from.initialize_from(str(tmp_path / 'w'), cofw, _fresh(cofw))
  cofw.init_from_strict = False
  _, summary = init_from.initialize_from(str(tmp_path / 'w'), cofw, _fresh(cofw))
  assert 'out_heatmaps/0/kernel' in summary['kept_fresh'] and 'stem/conv/kernel' not in summary['kept_fresh']
  with pytest.raises(init_from.InitFromError, match='does not exist'):
    init_from.initialize_from(str(tmp_path / 'nothing'), cofw, _fresh(cofw))


def test_train_command_fine_tunes_from_a_pkl_and_resumes_its_own(tmp_path, tiny_tfds_dir):
  # The tiny config's network (2 stacks of 2 hourglass levels, 32 channels) takes what fits of the
  # .pkl's four stacks of four levels (not strict; the strict fit is tested above) and keeps the rest
  # fresh: the outer levels' layers are in the file, the innermost ResBlock is not (the file has two
  # more levels there). Its train step is the one the other tests of the tiny config compile.
  workdir, partial = tmp_path / 'run', ['--config.init_from_strict=False']
  bad = train_tiny(workdir, tiny_tfds_dir, *partial, f'--config.init_from={tmp_path / "missing.pkl"}',
                   '--config.total_steps=1')
  assert bad.returncode == 1 and 'error: init_from' in bad.stderr and 'Traceback' not in bad.stderr
  first = train_tiny(workdir, tiny_tfds_dir, *partial, f'--config.init_from={PKL}', '--config.total_steps=1')
  assert first.returncode == 0, first.stderr[-3000:]
  assert f'initialised from {PKL} (official)' in first.stderr
  fresh = first.stderr.split('kept freshly initialised:')[1].splitlines()[0]
  assert 'hourglasses/0/low2/low2/conv1/kernel' in fresh and 'hourglasses/0/up1/' not in fresh, fresh
  # A second invocation resumes the run's own checkpoint: init_from is not applied again.
  again = train_tiny(workdir, tiny_tfds_dir, *partial, f'--config.init_from={PKL}', '--config.total_steps=2')
  assert again.returncode == 0, again.stderr[-3000:]
  assert 'resumed from step 1' in again.stderr and 'initialised from' not in again.stderr


def test_init_from_the_same_points_under_another_layout_name(tmp_path):
  # A 300W model starts a 300VW run (the same points and edges) strictly, everything loaded.
  w300, vw = _config('300w'), _config('300vw')
  model = create_model(w300, nnx.Rngs(3))
  checkpoints.save_model_checkpoint(tmp_path / 'w', model=model, config=w300, step=1)
  state, summary = init_from.initialize_from(str(tmp_path / 'w'), vw, _fresh(vw))
  assert summary['kept_fresh'] == []
  _equal(_tree(state.params, state.batch_stats), nnx.to_pure_dict(nnx.state(model)))
