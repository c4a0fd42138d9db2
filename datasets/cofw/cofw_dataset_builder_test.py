"""Builds COFW from tiny .mat files written as MATLAB writes them (v7.3 HDF5, and v5)."""

import h5py
import numpy as np
import pytest
import tensorflow_datasets as tfds

from star_jax.data import crop
from star_jax_datasets.cofw import cofw_dataset_builder as cofw
from star_jax_datasets.cofw import fake_data


def build(raw, data):
  builder = cofw.Builder(data_dir=str(data))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  return builder


@pytest.mark.parametrize('version', ['v7.3', 'v5'])
def test_round_trip(tmp_path, version):
  expected = fake_data.write(tmp_path / 'raw', num_train=4, num_test=2, version=version)
  if version == 'v7.3':
    assert h5py.is_hdf5(tmp_path / 'raw' / cofw.MAT_FILES['train'])
  builder = build(tmp_path / 'raw', tmp_path / 'data')
  source = builder.as_data_source()
  assert {k: len(v) for k, v in source.items()} == {'train': 4, 'test': 2}
  for split, faces in expected.items():
    for i, face in enumerate(faces):
      record = source[split][i]
      # The image in MATLAB's (H, W[, 3]) orientation (the faces are not square), RGB, 3 channels.
      image = face['image'] if face['image'].ndim == 3 else np.repeat(face['image'][..., None], 3, -1)
      np.testing.assert_array_equal(record['image'], image)
      phis = face['phis']
      landmarks = np.stack([phis[:29], phis[29:58]], -1) - 1           # 1-based -> 0-based
      np.testing.assert_allclose(record['landmarks'], landmarks, atol=1e-4)
      occluded = phis[58:] != 0
      np.testing.assert_array_equal(record['occluded'], occluded)
      assert record['attributes'].tolist() == [int(occluded.any())]
      x, y, w, h = face['box']
      np.testing.assert_allclose(record['box'], [x - 1, y - 1, x - 1 + w, y - 1 + h], atol=1e-4)
      scale, center = crop.box_rule(record['box'])
      assert record['scale'] == pytest.approx(scale, rel=1e-6)
      np.testing.assert_allclose(record['center'], center, rtol=1e-6)
      assert record['image_name'].decode() == f'{cofw.MAT_FILES[split]}/{i:04d}'
  # Both the occluded and the unoccluded case occur in the data.
  assert {source['train'][i]['attributes'][0] for i in range(4)} == {0, 1}


def test_official_tsv_matched_by_landmarks(tmp_path):
  expected = fake_data.write(tmp_path / 'raw', num_train=2, num_test=3)
  rows = []
  for i in (2, 0, 1):   # another order; paths that name no .mat file
    phis = expected['test'][i]['phis']
    points = np.stack([phis[:29], phis[29:58]], -1)   # as 1-based as MATLAB: offset +1
    rows.append('\t'.join([f'test/{i}.jpg', ','.join(['0'] * 10),
                           ','.join(f'{v:.3f}' for v in points.reshape(-1)),
                           str(0.5 + i), str(3.0 * i), str(4.0 * i)]))
  (tmp_path / 'raw' / 'test.tsv').write_text('\n'.join(rows) + '\n')
  builder = build(tmp_path / 'raw', tmp_path / 'data')
  test = builder.as_data_source('test')
  for i in range(3):
    assert test[i]['scale'] == pytest.approx(0.5 + i)
    np.testing.assert_allclose(test[i]['center'], [3.0 * i, 4.0 * i])
    # The file's landmarks, 1-based as written, as the official code trains and tests on them.
    phis = expected['test'][i]['phis']
    np.testing.assert_allclose(test[i]['landmarks'], np.round(np.stack([phis[:29], phis[29:58]], -1), 3), atol=1e-3)
  summary = builder.info.metadata['crop']['test']
  assert summary['rule'] == 'official_tsv' and summary['matched'] == 3
  assert builder.info.metadata['landmarks']['test'] == crop.TSV_LANDMARKS
  np.testing.assert_allclose(summary['metadata_minus_raw_median_offset'], [1, 1], atol=1e-3)


def test_tsv_of_another_dataset_is_refused(tmp_path):
  fake_data.write(tmp_path / 'raw', num_train=2, num_test=2)
  row = '\t'.join(['x.jpg', ','.join(['0'] * 10), ','.join(['500'] * 58), '1', '2', '3'])
  (tmp_path / 'raw' / 'train.tsv').write_text(row + '\n')
  with pytest.raises(ValueError, match=r'train\.tsv: none of the 2 faces .* matched'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_transposed_image_is_detected(tmp_path):
  faces = fake_data.make_faces(1)
  phis = faces[0]['phis']
  height, width = faces[0]['image'].shape[:2]           # 30 x 44: points up to x ~ 41
  assert width > height
  landmarks = np.stack([phis[:29], phis[29:58]], -1) - 1
  landmarks[0] = [width - 2, 2]                         # a point beyond the transposed width
  cofw.check_orientation(landmarks, faces[0]['image'], 'ok')
  with pytest.raises(ValueError, match='f.mat:IsTr.0.: the landmarks fit the image only'):
    cofw.check_orientation(landmarks, np.transpose(faces[0]['image'], (1, 0, 2)), 'f.mat:IsTr[0]')


def test_missing_file_and_variable_errors(tmp_path):
  fake_data.write(tmp_path / 'raw')
  (tmp_path / 'raw' / cofw.MAT_FILES['test']).unlink()
  with pytest.raises(FileNotFoundError) as e:
    build(tmp_path / 'raw', tmp_path / 'data')
  assert f'  - {cofw.MAT_FILES["test"]}, from {cofw.HOMEPAGE}' in str(e.value)
  assert f'  - {cofw.MAT_FILES["train"]}' not in str(e.value)
  with h5py.File(tmp_path / 'raw' / cofw.MAT_FILES['test'], 'w') as f:
    f.create_dataset('phisT', data=np.zeros((87, 1)))
  with pytest.raises(ValueError, match=r"COFW_test_color\.mat: missing MATLAB variables \['IsT', 'bboxesT'\]"):
    build(tmp_path / 'raw', tmp_path / 'data')
  (tmp_path / 'raw' / cofw.MAT_FILES['test']).write_bytes(b'not a mat file')
  with pytest.raises(ValueError, match=r'COFW_test_color\.mat: not a readable MATLAB file'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_wrong_phis_shape_is_named(tmp_path):
  fake_data.write(tmp_path / 'raw')
  with h5py.File(tmp_path / 'raw' / cofw.MAT_FILES['train'], 'r+') as f:
    del f['phisTr']
    f.create_dataset('phisTr', data=np.zeros((58, 3)))   # no occlusion flags
  with pytest.raises(ValueError, match=r'COFW_train_color\.mat:phisTr: expected a MATLAB array of shape \(3, 87\)'):
    build(tmp_path / 'raw', tmp_path / 'data')
