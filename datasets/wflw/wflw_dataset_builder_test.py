"""Builds WFLW from a tiny manual folder in the real formats (extracted and tarballs)."""

import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from star_jax.data import crop
from star_jax_datasets.wflw import fake_data
from star_jax_datasets.wflw import wflw_dataset_builder as wflw


def build(raw, data):
  builder = wflw.Builder(data_dir=str(data))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  return builder


def tsv_line(path, landmarks, scale, center, tags='0,0,0,0,0,0'):
  five = ','.join(['0.0'] * 10)
  points = ','.join(f'{v:.4f}' for v in np.asarray(landmarks).reshape(-1))
  return '\t'.join([path, five, points, str(scale), str(center[0]), str(center[1]), tags])


@pytest.mark.parametrize('tar', [False, True], ids=['extracted', 'tarballs'])
def test_builds_records_in_list_order(tmp_path, tar):
  expected = fake_data.write(tmp_path / 'raw', num_train=4, num_test=3, tar=tar)
  builder = build(tmp_path / 'raw', tmp_path / 'data')
  source = builder.as_data_source()
  assert {k: len(v) for k, v in source.items()} == {'train': 4, 'test': 3}
  for split, faces in expected.items():
    for i, face in enumerate(faces):
      record = source[split][i]
      assert record['image_name'].decode() == f'WFLW_images/{face["path"]}'
      np.testing.assert_allclose(record['landmarks'], face['landmarks'], atol=1e-5)
      np.testing.assert_array_equal(record['box'], face['box'])
      np.testing.assert_array_equal(record['attributes'], face['attributes'])
      assert record['image'].dtype == np.uint8
      np.testing.assert_array_equal(record['image'], face['rgb'])   # RGB, pixels unchanged
      scale, center = crop.box_rule(face['box'])
      assert record['scale'] == pytest.approx(scale, rel=1e-6)
      np.testing.assert_allclose(record['center'], center)
  assert builder.info.metadata['crop_rule'] == {'train': 'box_rule', 'test': 'box_rule'}
  # The metadata survives a reload from disk.
  reloaded = tfds.builder_from_directory(builder.data_dir)
  assert reloaded.info.metadata['crop_rule']['test'] == 'box_rule'


def test_official_tsv_gives_scale_and_center(tmp_path):
  expected = fake_data.write(tmp_path / 'raw', num_train=2, num_test=3)
  faces = expected['test']
  lines = ['image_path\t5pts\tlandmarks\tscale\tcenter_w\tcenter_h\ttags']   # a header line
  # Official paths carry the authors' prefixes and backslashes; rows come in another order, and
  # the two faces of one image are told apart by their landmarks. The last face is left out.
  for i in (1, 0):
    path = './rawImages/' + faces[i]['path'].replace('/', '\\')
    lines.append(tsv_line(path, faces[i]['landmarks'], 1.5 + i, (10.0 + i, 20.0 + i)))
  (tmp_path / 'raw' / 'test.tsv').write_text('\n'.join(lines) + '\n')
  builder = build(tmp_path / 'raw', tmp_path / 'data')
  test = builder.as_data_source('test')
  for i in (0, 1):
    assert test[i]['scale'] == pytest.approx(1.5 + i)
    np.testing.assert_allclose(test[i]['center'], [10.0 + i, 20.0 + i])
  scale, center = crop.box_rule(faces[2]['box'])      # not in the file: the box rule
  assert test[2]['scale'] == pytest.approx(scale, rel=1e-6)
  np.testing.assert_allclose(test[2]['center'], center)
  meta = builder.info.metadata
  assert meta['crop_rule'] == {'train': 'box_rule', 'test': 'official_tsv'}
  assert meta['crop']['test']['matched'] == 2 and meta['crop']['test']['box_rule_fallbacks'] == 1


def test_missing_files_are_listed_with_download_page(tmp_path):
  (tmp_path / 'raw').mkdir()
  (tmp_path / 'raw' / 'notes.txt').write_text('not WFLW')
  with pytest.raises(FileNotFoundError) as e:
    build(tmp_path / 'raw', tmp_path / 'data')
  message = str(e.value)
  for text in (wflw.IMAGES_TAR, wflw.ANNOTATIONS_TAR, wflw.HOMEPAGE, 'train.tsv', '1.'):
    assert text in message


def test_empty_manual_dir_is_explained(tmp_path):
  with pytest.raises(FileNotFoundError, match='WFLW_images.tar.gz'):
    build(tmp_path / 'nowhere', tmp_path / 'data')


def test_malformed_line_names_file_and_line(tmp_path):
  fake_data.write(tmp_path / 'raw')
  path = tmp_path / 'raw/WFLW_annotations' / wflw.LIST_DIR / wflw.LIST_FILES['test']
  lines = path.read_text().splitlines()
  lines[1] = lines[1].replace(' ', ' x', 1)     # a non-number on line 2
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=rf'{wflw.LIST_FILES["test"]}:2: coordinates and box values must be finite'):
    build(tmp_path / 'raw', tmp_path / 'data')
  lines[1] = ' '.join(lines[1].split()[1:])      # a field short
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=rf'{wflw.LIST_FILES["test"]}:2: expected 207'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_corrupt_image_is_named(tmp_path):
  expected = fake_data.write(tmp_path / 'raw')
  bad = tmp_path / 'raw' / wflw.IMAGES_DIR / expected['train'][2]['path']
  bad.write_bytes(b'\xff\xd8\xff' + b'garbage' * 10)
  with pytest.raises(ValueError, match=f'{bad.name}: cannot decode the image'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_missing_image_names_list_line(tmp_path):
  expected = fake_data.write(tmp_path / 'raw', tar=True)
  # Rebuild the images tarball without the test image.
  with tarfile.open(tmp_path / 'raw' / wflw.IMAGES_TAR) as t:
    members = [(m, t.extractfile(m).read()) for m in t if expected['test'][0]['path'] not in m.name]
  with tarfile.open(tmp_path / 'raw' / wflw.IMAGES_TAR, 'w:gz') as t:
    for m, data in members:
      fake_data.add_to_tar(t, m.name, data)
  with pytest.raises(FileNotFoundError, match=rf'{wflw.LIST_FILES["test"]}:1: image .* not found'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_parse_line_reads_fields_in_order():
  landmarks = np.arange(196, dtype=np.float32).reshape(98, 2) / 4
  line = fake_data.line_of(landmarks, [1, 2, 30, 40], [1, 0, 0, 1, 0, 1], '7--Cheering/a b.jpg')
  got_landmarks, box, attributes, path = wflw.parse_line(line.replace('a b', 'ab'), 'f:1')
  np.testing.assert_array_equal(got_landmarks, landmarks)
  np.testing.assert_array_equal(box, [1, 2, 30, 40])
  np.testing.assert_array_equal(attributes, [1, 0, 0, 1, 0, 1])
  assert path == '7--Cheering/ab.jpg'
  with pytest.raises(ValueError, match='f:1: the six attribute flags'):
    wflw.parse_line(line.replace('a b', 'ab').replace(' 1 0 0 1 0 1 ', ' 1 0 0 2 0 1 '), 'f:1')
