"""Builds 300W from a 300W-style folder of real photos (tests/testdata/real_faces)."""

import pathlib

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from star_jax.data import crop
from star_jax_datasets.the300w import fake_data
from star_jax_datasets.the300w import the300w_dataset_builder as the300w

REAL_FACES = pathlib.Path(__file__).resolve().parents[2] / 'tests' / 'testdata' / 'real_faces'


def build(raw, data):
  builder = the300w.Builder(data_dir=str(data))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  return builder


def pts_points(path):
  lines = pathlib.Path(path).read_text().splitlines()
  return np.array([[float(v) for v in line.split()] for line in lines[3:-1]], np.float32)


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('the300w')
  placed = fake_data.write(root / 'raw', REAL_FACES)
  return build(root / 'raw', root / 'data'), placed


def test_counts_order_and_subset_labels(built):
  builder, placed = built
  source = builder.as_data_source()
  assert {k: len(v) for k, v in source.items()} == {'train': 4, 'test': 3}
  names = {split: [source[split][i]['image_name'].decode() for i in range(len(source[split]))]
           for split in source}
  assert names == {split: [p['image_name'] for p in faces] for split, faces in placed.items()}
  labels = {source['test'][i]['image_name'].decode().split('/')[0]:
            source['test'][i]['attributes'].tolist() for i in range(3)}
  assert labels == {'helen': [1, 0], 'lfpw': [1, 0], 'ibug': [0, 1]}   # (common, challenge)
  assert all(source['train'][i]['attributes'].tolist() == [0, 0] for i in range(4))


def test_landmarks_images_and_box_rule(built):
  builder, placed = built
  source = builder.as_data_source()
  for split, faces in placed.items():
    for i, face in enumerate(faces):
      record = source[split][i]
      landmarks = pts_points(face['pts']) - 1          # iBUG files are 1-based
      np.testing.assert_allclose(record['landmarks'], landmarks, atol=1e-5)
      box = np.concatenate([landmarks.min(0), landmarks.max(0)])
      np.testing.assert_allclose(record['box'], box, atol=1e-5)
      scale, center = crop.box_rule(box)
      assert record['scale'] == pytest.approx(scale, rel=1e-6)
      np.testing.assert_allclose(record['center'], center, rtol=1e-6)
      # RGB with 3 channels, the pixels of the source (greyscale einstein repeated 3 times).
      bgr = cv2.imread(str(face['source']), cv2.IMREAD_COLOR)
      assert record['image'].shape == bgr.shape
      np.testing.assert_array_equal(record['image'], bgr[..., ::-1])
  assert builder.info.metadata['crop_rule'] == {'train': 'box_rule', 'test': 'box_rule'}


def test_missing_folders_are_listed(tmp_path):
  fake_data.write(tmp_path / 'raw', REAL_FACES)
  for pts in (tmp_path / 'raw' / 'ibug').iterdir():
    pts.unlink()
  (tmp_path / 'raw' / 'ibug').rmdir()
  with pytest.raises(FileNotFoundError) as e:
    build(tmp_path / 'raw', tmp_path / 'data')
  assert '  - ibug/' in str(e.value) and the300w.HOMEPAGE in str(e.value)
  assert 'helen/testset/ (' not in str(e.value)   # only what is missing


def test_malformed_pts_names_file_and_line(tmp_path):
  fake_data.write(tmp_path / 'raw', REAL_FACES)
  pts = tmp_path / 'raw' / 'lfpw' / 'testset' / 'image_0001.pts'
  lines = pts.read_text().splitlines()
  lines[10] = '12.5 oops'
  pts.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=r'image_0001\.pts:11: point coordinates must be finite numbers'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_read_pts_checks_point_count(tmp_path):
  pts = tmp_path / 'a.pts'
  pts.write_text('version: 1\nn_points: 68\n{\n1 2\n3 4\n}\n')
  with pytest.raises(ValueError, match=r'a\.pts:6: expected 68 points .* got 2'):
    the300w.read_pts(pts)
  pts.write_text('version: 1\nn_points: 49\n{\n1 2\n}\n')
  with pytest.raises(ValueError, match=r'a\.pts:2: n_points is 49'):
    the300w.read_pts(pts)


def test_corrupt_image_and_missing_image_are_named(tmp_path):
  fake_data.write(tmp_path / 'raw', REAL_FACES)
  image = tmp_path / 'raw' / 'helen' / 'testset' / '2968560214_1.jpg'
  image.write_bytes(image.read_bytes()[:20])
  with pytest.raises(ValueError, match=r'2968560214_1\.jpg: cannot decode the image'):
    build(tmp_path / 'raw', tmp_path / 'data')
  image.unlink()
  with pytest.raises(FileNotFoundError, match=r'2968560214_1\.pts: no image beside it'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_official_tsv_gives_crop_and_landmarks(tmp_path):
  placed = fake_data.write(tmp_path / 'raw', REAL_FACES)
  faces = placed['test']
  rows = []
  for i in (2, 0):   # another order; the middle face is not in the file
    # As 1-based as the .pts files: one pixel off our 0-based records, within the match distance.
    points = pts_points(faces[i]['pts'])
    rows.append('\t'.join(['./300W/' + faces[i]['image_name'], ','.join(['0'] * 10),
                           ','.join(f'{v:.3f}' for v in points.reshape(-1)), str(1.25 + i), str(50.0 + i),
                           str(60.0 + i)]))
  (tmp_path / 'raw' / 'test.tsv').write_text('\n'.join(rows) + '\n')
  builder = build(tmp_path / 'raw', tmp_path / 'data')
  test = builder.as_data_source('test')
  for i in (0, 2):
    assert test[i]['scale'] == pytest.approx(1.25 + i)
    np.testing.assert_allclose(test[i]['center'], [50.0 + i, 60.0 + i])
    np.testing.assert_allclose(test[i]['landmarks'], pts_points(faces[i]['pts']), atol=1e-3)   # the file's
  np.testing.assert_allclose(test[1]['landmarks'], pts_points(faces[1]['pts']) - 1, atol=1e-5)   # the .pts'
  meta = builder.info.metadata
  assert meta['crop']['test']['matched'] == 2 and meta['crop']['test']['box_rule_fallbacks'] == 1
  assert meta['landmarks'] == {'train': crop.RAW_LANDMARKS, 'test': crop.TSV_LANDMARKS}
