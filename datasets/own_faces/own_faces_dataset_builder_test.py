"""Builds own_faces from folders of real photos in each annotation format it reads."""

import json
import pathlib

import cv2
import numpy as np
import pytest

from star_jax import layouts
from star_jax.data import build
from star_jax.data import crop
from star_jax_datasets.own_faces import fake_data
from star_jax_datasets.own_faces import own_faces_dataset_builder as own

REAL_FACES = pathlib.Path(__file__).resolve().parents[2] / 'tests' / 'testdata' / 'real_faces'


def make(tmp_path, name='default', layout='300W', **options):
  return build.build('own_faces', config=name, manual_dir=str(tmp_path / 'raw'), data_dir=str(tmp_path / 'data'),
                     layout=layout, options=options)


def records(builder, split):
  source = builder.as_data_source(split=split)
  return [source[i] for i in range(len(source))]


def names(builder, split):
  return [r['image_name'].decode() for r in records(builder, split)]


def test_pts_folder_with_a_seeded_random_split(tmp_path):
  written = {f['image_name']: f for f in fake_data.write_images(tmp_path / 'raw', REAL_FACES)}
  builder = make(tmp_path, test_fraction=0.34, split_seed=3)
  train, test = names(builder, 'train'), names(builder, 'test')
  assert len(test) == 2 and len(train) == 4 and not set(train) & set(test)
  assert train == sorted(train) and test == sorted(test)     # annotation (path) order
  assert set(train) | set(test) == set(written)
  # The same seed draws the same split; another seed (its own build name) another one.
  again = make(tmp_path, name='again', test_fraction=0.34, split_seed=3)
  assert names(again, 'test') == test
  assert names(make(tmp_path, name='other', test_fraction=0.34, split_seed=4), 'test') != test
  for split in ('train', 'test'):
    for record in records(builder, split):
      face = written[record['image_name'].decode()]
      np.testing.assert_allclose(record['landmarks'], face['landmarks'], atol=1e-3)   # .pts: 1-based on disk
      np.testing.assert_array_equal(record['image'], face['image'][..., ::-1])         # RGB
      box = crop.landmarks_box(record['landmarks'])
      np.testing.assert_allclose(record['box'], box)
      scale, center = crop.box_rule(box)
      assert record['scale'] == pytest.approx(scale, rel=1e-6)
      np.testing.assert_allclose(record['center'], center, rtol=1e-6)
      assert record['attributes'].shape == (0,)
  metadata = builder.info.metadata
  assert metadata['layout'] == '300W' and metadata['annotation_format'] == 'pts'
  assert metadata['options']['test_fraction'] == 0.34 and metadata['crop_rule'] == {'train': 'box_rule',
                                                                                    'test': 'box_rule'}


def test_train_and_test_folders_and_list_files(tmp_path):
  train = fake_data.write_images(tmp_path / 'raw', REAL_FACES, 'train', subset={'einstein.png', 'takeo.png',
                                                                               'breakingbad.png'})
  test = fake_data.write_images(tmp_path / 'raw', REAL_FACES, 'test', subset={'takeo_shifted.png'})
  builder = make(tmp_path)                                   # train/ and test/ are used when both exist
  assert names(builder, 'train') == sorted(f['image_name'] for f in train)
  assert names(builder, 'test') == [f['image_name'] for f in test] == ['test/takeo_shifted.png']
  # List files, one of them alone: the rest is the other split.
  (tmp_path / 'raw' / 'test.txt').write_text('# held out\ntrain/einstein.png\n\ntest/takeo_shifted.png\n')
  listed = make(tmp_path, name='listed', test='test.txt')
  assert names(listed, 'test') == ['test/takeo_shifted.png', 'train/einstein.png']
  assert names(listed, 'train') == ['train/breakingbad.png', 'train/takeo.png']
  with pytest.raises(ValueError, match=r'1 image\(s\) are in both the train and the test split'):
    make(tmp_path, name='folders', train='train', test='test.txt')
  (tmp_path / 'raw' / 'bad.txt').write_text('train/einstein.png\ntrain/nobody.png\n')
  with pytest.raises(ValueError, match=r"bad\.txt:2: no annotated face for image 'train/nobody\.png'"):
    make(tmp_path, name='bad', test='bad.txt')


def test_csv_and_tsv_files_give_the_pts_landmarks(tmp_path):
  written = fake_data.write_images(tmp_path / 'raw', REAL_FACES, 'photos', pts=False)
  fake_data.write_csv(tmp_path / 'raw' / 'labels.csv', written)                      # header, box
  fake_data.write_csv(tmp_path / 'raw' / 'labels.tsv', written, box=False, header=False, delimiter='\t')
  by_name = {f['image_name']: f for f in written}
  for name, file in (('csv', 'labels.csv'), ('tsv', 'labels.tsv')):
    builder = make(tmp_path, name=name, annotations=file, test_fraction=0.5)
    assert builder.info.metadata['annotation_format'] == name
    for split in ('train', 'test'):
      for record in records(builder, split):
        face = by_name[record['image_name'].decode()]
        np.testing.assert_allclose(record['landmarks'], face['landmarks'], atol=1e-3)   # 0-based as written
        box = (np.concatenate([face['landmarks'].min(0) - 5, face['landmarks'].max(0) + 5]) if name == 'csv'
               else crop.landmarks_box(face['landmarks']))
        np.testing.assert_allclose(record['box'], box, atol=1e-3)
        assert record['scale'] == pytest.approx(crop.box_rule(box)[0], rel=1e-4)


def test_adnet_metadata_file_keeps_its_crop(tmp_path):
  written = fake_data.write_images(tmp_path / 'raw', REAL_FACES, pts=False)
  fake_data.write_adnet_tsv(tmp_path / 'raw' / 'train.tsv', written, scale=0.42)
  builder = make(tmp_path, annotations='train.tsv', test_fraction=0.5)
  assert builder.info.metadata['annotation_format'] == 'adnet_tsv'
  assert builder.info.metadata['crop_rule'] == {'train': 'official_tsv', 'test': 'official_tsv'}
  record = records(builder, 'test')[0]
  face = next(f for f in written if f['image_name'] == record['image_name'].decode())
  assert record['scale'] == pytest.approx(0.42)
  np.testing.assert_allclose(record['center'], face['landmarks'].mean(0), atol=1e-3)


def test_a_layout_file_of_ten_points(tmp_path):
  points = (36, 39, 42, 45, 30, 48, 54, 8, 19, 24)         # eye corners, nose tip, mouth corners, chin, brows
  layout_file = tmp_path / 'ten.json'
  layout_file.write_text(json.dumps({
      'num_points': 10, 'edges': [{'points': [0, 1]}, {'points': [2, 3]}, {'points': [5, 7, 6], 'closed': True}],
      'flip_pairs': [[0, 3], [1, 2], [5, 6], [8, 9]], 'ocular': [0, 3]}))
  written = fake_data.write_images(tmp_path / 'raw', REAL_FACES, pts=False)
  fake_data.write_csv(tmp_path / 'raw' / 'ten.csv', written, points=points)
  builder = make(tmp_path, layout=str(layout_file), annotations='ten.csv')
  record = records(builder, 'train')[0]
  face = next(f for f in written if f['image_name'] == record['image_name'].decode())
  np.testing.assert_allclose(record['landmarks'], face['landmarks'][list(points)], atol=1e-3)
  # The build keeps the layout itself, not the file's path.
  assert layouts.get_layout(builder.builder_config.layout).num_points == 10
  assert builder.info.metadata['layout'] == 'ten'


def test_malformed_annotations_name_the_file_and_line(tmp_path):
  written = fake_data.write_images(tmp_path / 'raw', REAL_FACES)
  pts = tmp_path / 'raw' / 'takeo.pts'
  lines = pts.read_text().splitlines()
  lines[10] = '12.5 oops'
  pts.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=r"takeo\.pts:11: point coordinates must be finite numbers, got 'oops'"):
    make(tmp_path)
  # The point count against the layout: 68-point files with the 29-point COFW layout.
  pts.write_text('\n'.join(lines[:10] + ['1 2'] + lines[11:]) + '\n')
  with pytest.raises(ValueError, match=r'breakingbad\.pts:2: n_points is 68, expected 29 \(the COFW layout\)'):
    make(tmp_path, name='cofw', layout='COFW')
  labels = tmp_path / 'raw' / 'labels.csv'
  fake_data.write_csv(labels, written)
  rows = labels.read_text().splitlines()
  rows[2] = rows[2].rsplit(',', 2)[0]                       # a row one point short
  labels.write_text('\n'.join(rows) + '\n')
  with pytest.raises(ValueError, match=r'labels\.csv:3: expected the image path and 136 coordinates \(68 points '
                                       r'of the 300W layout\).* got 138 numbers'):
    make(tmp_path, name='csv1', annotations='labels.csv')
  rows[2] = rows[1].replace(',', ',x', 1)
  labels.write_text('\n'.join(rows) + '\n')
  with pytest.raises(ValueError, match=r"labels\.csv:3: 'x.*' is not a number"):
    make(tmp_path, name='csv2', annotations='labels.csv')
  rows[2] = 'nowhere.png' + rows[1][rows[1].index(','):]
  labels.write_text('\n'.join(rows) + '\n')
  with pytest.raises(FileNotFoundError, match=r"labels\.csv:3: image 'nowhere\.png' does not exist"):
    make(tmp_path, name='csv3', annotations='labels.csv')


def test_pts_without_image_and_corrupt_image_are_named(tmp_path):
  fake_data.write_images(tmp_path / 'raw', REAL_FACES)
  image = tmp_path / 'raw' / 'einstein.png'
  image.write_bytes(image.read_bytes()[:30])
  with pytest.raises(ValueError, match=r'einstein\.png: cannot decode the image'):
    make(tmp_path)
  image.unlink()
  with pytest.raises(FileNotFoundError, match=r'einstein\.pts: no image beside it'):
    make(tmp_path)


def test_a_build_name_remembers_its_options(tmp_path):
  fake_data.write_images(tmp_path / 'raw', REAL_FACES)
  make(tmp_path, test_fraction=0.5)
  assert len(make(tmp_path, test_fraction=0.5).as_data_source(split='test')) == 3   # reused
  with pytest.raises(ValueError, match="test_fraction: built with 0.5, now 0.2.*another name"):
    make(tmp_path, test_fraction=0.2)
  # Without a manual folder (evaluation of a built dataset), only the build is opened.
  cfg = {'name': 'own_faces', 'config': 'default', 'data_dir': str(tmp_path / 'data'), 'manual_dir': ''}
  assert len(build.load_source(cfg, 'train', layout='300W')) == 3
  with pytest.raises(ValueError, match="layout: built with '300W', now 'WFLW'"):
    build.load_source(cfg, 'train', layout='WFLW')


def test_build_command_line(tmp_path, capsys):
  fake_data.write_images(tmp_path / 'raw', REAL_FACES)
  argv = ['build', '--dataset', 'own_faces', '--manual_dir', str(tmp_path / 'raw'), '--data_dir',
          str(tmp_path / 'data'), '--config', 'mine']
  assert build.main(argv) == 2
  assert '--layout is required for own_faces' in capsys.readouterr().err
  assert build.main(argv + ['--layout', '300W', '--test_fraction', '0.5']) == 0
  assert f'own_faces: wrote test 3, train 3 records to {tmp_path / "data" / "own_faces" / "mine"}' in (
      capsys.readouterr().out)
  assert build.main(argv + ['--layout', 'nope']) == 1
  assert "unknown landmark layout 'nope'" in capsys.readouterr().err
  assert build.main(['build', '--dataset', 'cofw', '--manual_dir', str(tmp_path), '--layout', '300W']) == 2
  assert '--layout: only for --dataset own_faces' in capsys.readouterr().err


def test_images_are_read_like_the_official_loader(tmp_path):
  # A greyscale JPEG (einstein) and a photo under a sub-folder, as the official loader reads them.
  fake_data.write_images(tmp_path / 'raw', REAL_FACES, 'a/b', subset={'einstein.png', 'takeo.png'})
  grey = cv2.cvtColor(cv2.imread(str(tmp_path / 'raw' / 'a' / 'b' / 'einstein.png')), cv2.COLOR_BGR2GRAY)
  cv2.imwrite(str(tmp_path / 'raw' / 'a' / 'b' / 'einstein.png'), grey)
  builder = make(tmp_path, test_fraction=0.5)
  record = next(r for s in ('train', 'test') for r in records(builder, s)
                if r['image_name'].decode() == 'a/b/einstein.png')
  np.testing.assert_array_equal(record['image'], np.repeat(grey[..., None], 3, axis=-1))
  assert own.OPTION_DEFAULTS == {'annotations': '', 'train': '', 'test': '', 'test_fraction': 0.1,
                                 'split_seed': 0}


@pytest.mark.parametrize('text, message', [
    ('version: 1\n{\n1 2\n3 4\n}\n', r'a\.pts:5: expected 3 points \(the toy layout\) between \{ \(line 2\) and \}, got 2'),
    ('version: 1\n{\n1 2\nnan 4\n5 6\n}\n', r'a\.pts:4: point coordinates must be finite numbers'),
    ('version: 1\n{\n1 2\n3 4\n5 6\n', r'a\.pts:5: the file ends, but the point list opened at line 2 is not closed'),
    ('version: 1\nn_points: 3\n', r'a\.pts:2: the file ends with no point list'),
])
def test_read_pts_names_the_line(tmp_path, text, message):
  from star_jax_datasets import common
  (tmp_path / 'a.pts').write_text(text)
  with pytest.raises(ValueError, match=message):
    common.read_pts(tmp_path / 'a.pts', 3, 'toy')
