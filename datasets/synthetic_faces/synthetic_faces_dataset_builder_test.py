"""Builds tiny synthetic_faces configs and reads them back with tfds.data_source (no TensorFlow)."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from star_jax import layouts
from star_jax.data import synthetic
from star_jax_datasets.synthetic_faces import synthetic_faces_dataset_builder as sf


def build(data_dir, name='tiny', **kwargs):
  config = sf.SyntheticFacesConfig(name=name, **{'num_train': 8, 'num_test': 8, **kwargs})
  builder = sf.Builder(config=config, data_dir=str(data_dir))
  builder.download_and_prepare()
  return builder


def test_builder_name_and_configs():
  assert sf.Builder.name == 'synthetic_faces'
  names = {c.name for c in sf.Builder.BUILDER_CONFIGS}
  # The names configs/synthetic.py asks for.
  assert {'wflw98', 'wflw98_amb0', 'wflw98_amb1', 'wflw98_amb2', 'wflw98_amb4', '300w68', 'cofw29'} <= names
  by_name = {c.name: c for c in sf.Builder.BUILDER_CONFIGS}
  assert [by_name[f'wflw98_amb{k}'].ambiguity for k in (0, 1, 2, 4)] == [0, 1, 2, 4]
  assert by_name['300w68'].layout == '300W' and by_name['cofw29'].layout == 'COFW'
  assert sf.Builder(data_dir='/nonexistent').builder_config.name == 'wflw98'
  assert not sf.Builder.MANUAL_DOWNLOAD_INSTRUCTIONS   # built without a download


def test_build_and_read_back(tmp_path):
  build(tmp_path, ambiguity=2.0)
  source = tfds.data_source('synthetic_faces/tiny', data_dir=str(tmp_path))
  assert {k: len(v) for k, v in source.items()} == {'train': 8, 'test': 8}
  names = set()
  for split in ('train', 'test'):
    for i in range(8):
      r = source[split][i]
      assert r['image'].dtype == np.uint8 and r['image'].shape == (256, 256, 3)
      assert r['landmarks'].shape == r['clean_landmarks'].shape == (98, 2)
      assert np.all((r['landmarks'] >= 0) & (r['landmarks'] <= 255))
      assert r['attributes'].shape == (6,) and r['attributes'].dtype == np.int32
      assert r['box'].shape == (4,) and r['center'].shape == (2,)
      names.add(r['image_name'].decode())
      # Record i is generator sample i (the image went through JPEG).
      s = synthetic.generate(0, split, i, ambiguity=2.0)
      assert r['image_name'].decode() == s.name == f'{split}/{i:06d}'
      np.testing.assert_array_equal(r['landmarks'], s.landmarks)
      assert np.abs(r['image'].astype(int) - s.image.astype(int)).mean() < 6   # JPEG q95 of a noisy image
      assert r['scale'] == pytest.approx(s.scale)
      if split == 'test':
        np.testing.assert_array_equal(r['landmarks'], r['clean_landmarks'])
      else:
        assert np.abs(r['landmarks'] - r['clean_landmarks']).max() > 0.5
  assert len(names) == 16
  info = tfds.builder_from_directory(str(tmp_path / 'synthetic_faces' / 'tiny' / '1.0.0')).info
  assert info.metadata['layout'] == 'WFLW' and info.metadata['ambiguity'] == 2.0
  assert 'min(w, h) / 200 * 1.05' in info.metadata['box_rule']
  assert info.metadata['crop_rule'] == {'train': 'box_rule', 'test': 'box_rule'}


def test_builds_are_deterministic(tmp_path):
  a = build(tmp_path / 'a', num_train=3, num_test=1).as_data_source('train')
  b = build(tmp_path / 'b', num_train=3, num_test=1).as_data_source('train')
  for i in range(3):
    for key in ('image', 'landmarks', 'box', 'attributes'):
      np.testing.assert_array_equal(a[i][key], b[i][key])


@pytest.mark.parametrize('layout', ['300W', 'COFW'])
def test_other_layouts(tmp_path, layout):
  lay = layouts.get_layout(layout)
  train = build(tmp_path, name=f'tiny_{layout.lower()}', layout=layout, num_train=2, num_test=1,
                image_format='png').as_data_source('train')
  r = train[1]
  assert r['landmarks'].shape == (lay.num_points, 2)
  assert r['attributes'].shape == (len(lay.attributes),)
  s = synthetic.generate(0, 'train', 1, layout=layout)
  np.testing.assert_array_equal(r['image'], s.image)   # PNG is lossless
  np.testing.assert_array_equal(r['landmarks'], s.landmarks)


def test_bad_config_is_rejected(tmp_path):
  with pytest.raises(ValueError, match='image_format'):
    sf.Builder(config=sf.SyntheticFacesConfig(name='bad', image_format='gif'), data_dir=str(tmp_path))
  with pytest.raises(ValueError, match='layout'):
    sf.Builder(config=sf.SyntheticFacesConfig(name='bad2', layout='AFLW'), data_dir=str(tmp_path))
