"""The Grain input pipelines (star_jax/data/pipeline.py), on small fabricated records."""

import cv2
import jax
import ml_collections
import numpy as np
import pytest

from star_jax.data import pipeline as ip
from star_jax import layouts
from star_jax.data import targets as TG
from star_jax.data import transforms as T
from star_jax import mesh as mesh_lib


def make_config(layout='WFLW', batch_size=4, eval_batch_size=4):
  """The fields the pipeline reads, with the smoke-test sizes (configs/base.py shrink_for_smoke_test)."""
  c = ml_collections.ConfigDict()
  c.layout = layout
  c.batch_size = batch_size
  c.eval_batch_size = eval_batch_size
  c.data = ml_collections.ConfigDict(dict(image_size=64, heatmap_size=16, sigma=1.5 * 64 / 256, num_workers=0,
                                          prefetch=2, max_eval_examples=0))
  c.aug = ml_collections.ConfigDict(dict(prob=1.0, flip=0.5, shift_sigma=0.05, rot_sigma_deg=18.0, scale_sigma=0.1,
                                         occlusion=0.4, blur=0.3, gamma=0.2, noise=0.2, gray=0.2))
  return c


def make_records(n, layout='WFLW', seed=0, encode=False):
  """`n` records in the TFDS builders' format: random smooth images of varied sizes, points around
  the middle, the crop parameters, attributes and names."""
  rng = np.random.default_rng(seed)
  num_points = layouts.get_layout(layout).num_points
  records = []
  for i in range(n):
    h, w = int(rng.integers(90, 140)), int(rng.integers(100, 160))
    image = cv2.resize(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), (w, h))
    center = np.array([w / 2, h / 2], np.float32) + rng.normal(0, 3, 2).astype(np.float32)
    landmarks = (center + rng.normal(0, 12, (num_points, 2))).astype(np.float32)
    records.append({
        'image': cv2.imencode('.png', image[..., ::-1])[1].tobytes() if encode else image,
        'landmarks': landmarks, 'box': np.array([0, 0, w, h], np.float32), 'scale': np.float32(0.35),
        'center': center, 'attributes': rng.integers(0, 2, 3).astype(np.int32), 'image_name': f'img{i:03d}.jpg'})
  return records


def take(iterator, k):
  return [next(iterator) for _ in range(k)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_train_batches_shapes_dtypes_and_ranges():
  config = make_config()
  batch = next(iter(ip.train_dataset(config, make_records(6), seed=0, process_index=0, process_count=1)))
  assert batch['image'].shape == (4, 64, 64, 3) and batch['image'].dtype == np.uint8
  assert batch['landmarks'].shape == (4, 98, 2) and batch['landmarks'].dtype == np.float32
  assert batch['pointmaps'].shape == (4, 16, 16, 98) and batch['pointmaps'].dtype == np.float32
  assert batch['edgemaps'].shape == (4, 16, 16, 9) and batch['edgemaps'].dtype == np.float32
  assert np.abs(batch['landmarks']).max() <= 1.0
  assert 0 < batch['pointmaps'].max() <= 1.0 and 0 < batch['edgemaps'].max() <= 1.0
  # The targets are the targets of the batch's landmarks (pointmaps from crop px = denormalised).
  crop_px = T.denormalize(batch['landmarks'][0], 64)
  inside = np.all((crop_px > 0) & (crop_px < 63), axis=1)
  np.testing.assert_allclose(TG.point_maps(crop_px, 64, 16, config.data.sigma)[..., inside],
                             batch['pointmaps'][0][..., inside], atol=1e-5)


def test_same_seed_same_batches_other_seed_other_batches():
  config, records = make_config(), make_records(6)
  run = lambda seed: take(iter(ip.train_dataset(config, records, seed=seed, process_index=0, process_count=1)), 3)
  first = run(5)
  assert_batches_equal(first, run(5))
  assert not np.array_equal(first[0]['landmarks'], run(6)[0]['landmarks'])


def test_epochs_cover_the_split_and_are_reshuffled():
  config = make_config(batch_size=2)
  records = make_records(6)
  for i, r in enumerate(records):
    r['attributes'] = np.array([i], np.int32)
  # Recover each example's record from its image: no augmentation at all.
  config.aug.prob = 0.0
  plain = [T.center_crop(r['image'], r['landmarks'], float(r['scale']), r['center'], 64).image for r in records]
  which = lambda image: next(i for i, p in enumerate(plain) if np.array_equal(p, image))
  batches = take(iter(ip.train_dataset(config, records, seed=0, process_index=0, process_count=1)), 6)
  order = [which(im) for b in batches for im in b['image']]
  assert sorted(order[:6]) == sorted(order[6:]) == list(range(6))   # each epoch sees every record once
  assert order[:6] != order[6:]                                     # in a new order


def test_resume_from_iterator_state_is_exact():
  config, records = make_config(), make_records(7)
  make = lambda: iter(ip.train_dataset(config, records, seed=1, process_index=0, process_count=1))
  it = make()
  take(it, 2)
  state = it.get_state()
  expected = take(it, 3)
  restored = make()
  restored.set_state(state)
  assert_batches_equal(take(restored, 3), expected)


def test_process_shards_form_the_global_batch():
  """Two processes' local batches together hold the examples of the one-process global batch."""
  config, records = make_config(batch_size=4), make_records(9)
  whole = take(iter(ip.train_dataset(config, records, seed=2, process_index=0, process_count=1)), 2)
  parts = [take(iter(ip.train_dataset(config, records, seed=2, process_index=p, process_count=2)), 2)
           for p in range(2)]
  for k in range(2):
    assert parts[0][k]['image'].shape[0] == 2
    for key in whole[k]:
      got = np.concatenate([parts[0][k][key], parts[1][k][key]])
      want = whole[k][key][[0, 2, 1, 3]]   # process p holds global positions p, p + 2, ...
      np.testing.assert_array_equal(got, want, err_msg=key)


def test_encoded_images_give_the_same_batches():
  config = make_config()
  a = next(iter(ip.train_dataset(config, make_records(5), seed=3, process_index=0, process_count=1)))
  b = next(iter(ip.train_dataset(config, make_records(5, encode=True), seed=3, process_index=0, process_count=1)))
  assert_batches_equal([a], [b])


@pytest.mark.parametrize('layout', ['300W', 'COFW'])
def test_other_layouts(layout):
  config = make_config(layout)
  n = layouts.get_layout(layout)
  batch = next(iter(ip.train_dataset(config, make_records(4, layout), seed=0, process_index=0, process_count=1)))
  assert batch['pointmaps'].shape[-1] == n.num_points and batch['edgemaps'].shape[-1] == n.num_edges


def test_bad_records_raise_clear_errors():
  config = make_config()
  records = make_records(4)
  records[2]['landmarks'] = records[2]['landmarks'][:10]
  with pytest.raises(ValueError, match=r"img002\.jpg.*'landmarks'.*\(98, 2\)"):
    list(ip.eval_batches(config, records, process_index=0, process_count=1))
  records = make_records(4)
  del records[0]['scale']
  with pytest.raises(ValueError, match=r"img000\.jpg.*'scale'"):
    next(iter(ip.eval_batches(config, records, process_index=0, process_count=1)))
  with pytest.raises(ValueError, match='multiple of the process count'):
    ip.train_dataset(make_config(batch_size=3), make_records(4), seed=0, process_index=0, process_count=2)


def test_eval_batches_order_padding_and_map_back():
  config = make_config(eval_batch_size=4)
  records = make_records(6)
  batches = list(ip.eval_batches(config, records, process_index=0, process_count=1))
  assert len(batches) == 2
  index = np.concatenate([b['index'] for b in batches])
  valid = np.concatenate([b['valid'] for b in batches])
  assert index.tolist() == [0, 1, 2, 3, 4, 5, -1, -1] and valid.tolist() == [True] * 6 + [False] * 2
  b = batches[0]
  assert b['image'].shape == (4, 64, 64, 3) and b['matrix'].shape == (4, 3, 3)
  assert b['attributes'].shape == (4, 3) and b['attributes'].dtype == np.int32
  np.testing.assert_array_equal(b['landmarks_px'][1], records[1]['landmarks'])
  r = records[2]
  crop = T.center_crop(r['image'], r['landmarks'], float(r['scale']), r['center'], 64)
  np.testing.assert_array_equal(b['image'][2], crop.image)
  # Unclipped normalised landmarks map back onto the original pixels.
  inside = np.all(np.abs(b['landmarks']) < 1, axis=-1)
  back = T.map_back(b['landmarks'], b['matrix'], 64)
  np.testing.assert_allclose(back[inside], b['landmarks_px'][inside], atol=1e-3)
  # max_eval_examples: only the first N.
  config.data.max_eval_examples = 3
  limited = list(ip.eval_batches(config, records, process_index=0, process_count=1))
  assert len(limited) == 1 and limited[0]['index'].tolist() == [0, 1, 2, -1]


def test_eval_batches_split_over_processes():
  config = make_config(eval_batch_size=4)
  records = make_records(5)
  shares = [list(ip.eval_batches(config, records, process_index=p, process_count=2)) for p in range(2)]
  assert [len(s) for s in shares] == [2, 2]
  # Global batch k = process 0's rows then process 1's rows = split positions [4k, 4k + 4).
  global_index = [np.concatenate([shares[0][k]['index'], shares[1][k]['index']]).tolist() for k in range(2)]
  assert global_index == [[0, 1, 2, 3], [4, -1, -1, -1]]


def test_to_global_on_a_one_device_mesh():
  mesh = jax.make_mesh((1,), ('data',))
  config = make_config()
  batch = next(iter(ip.train_dataset(config, make_records(4), seed=0, process_index=0, process_count=1)))
  out = mesh_lib.to_global(batch, mesh)
  assert set(out) == set(batch)
  for key, value in out.items():
    assert isinstance(value, jax.Array) and value.shape == batch[key].shape and value.dtype == batch[key].dtype
    assert value.sharding.spec == jax.sharding.PartitionSpec('data')
    np.testing.assert_array_equal(np.asarray(value), batch[key])


def test_synthetic_faces_dataset_end_to_end(tmp_path):
  """A tiny built synthetic_faces dataset, read back with tfds.data_source, through both pipelines."""
  sf = pytest.importorskip('star_jax_datasets.synthetic_faces.synthetic_faces_dataset_builder')
  tfds = pytest.importorskip('tensorflow_datasets')
  config = sf.SyntheticFacesConfig(name='pipeline_test', num_train=4, num_test=3, image_size=128)
  sf.Builder(config=config, data_dir=str(tmp_path)).download_and_prepare()
  source = tfds.data_source('synthetic_faces/pipeline_test', data_dir=str(tmp_path))
  cfg = make_config()
  cfg.aug.gray = 0.0
  it = iter(ip.train_dataset(cfg, source['train'], seed=0, process_index=0, process_count=1))
  batch = next(it)
  assert batch['image'].shape == (4, 64, 64, 3) and batch['pointmaps'].shape == (4, 16, 16, 98)
  # The face fills the crop: most points inside, images not blank.
  assert np.mean(np.abs(batch['landmarks']) < 1) > 0.9 and batch['image'].std() > 10
  evals = list(ip.eval_batches(cfg, source['test'], process_index=0, process_count=1))
  assert [b['valid'].sum() for b in evals] == [3]
  back = T.map_back(evals[0]['landmarks'], evals[0]['matrix'], 64)
  ok = evals[0]['valid'][:, None] & np.all(np.abs(evals[0]['landmarks']) < 1, -1)
  np.testing.assert_allclose(back[ok], evals[0]['landmarks_px'][ok], atol=1e-3)
