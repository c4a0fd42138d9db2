"""Crop-parameter rules (star_jax/data/crop.py) and the build command (star_jax/data/build.py)."""

import io

import cv2
import ml_collections
import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from star_jax.data import build
from star_jax.data import crop
from star_jax_datasets import common
from star_jax_datasets.cofw import fake_data as cofw_fake


def tsv_row(path, landmarks, scale, center, tags=None):
  fields = [path, ','.join(['1.0'] * 10), ','.join(f'{v:g}' for v in np.ravel(landmarks)),
            f'{scale:g}', f'{center[0]:g}', f'{center[1]:g}']
  return '\t'.join(fields + ([tags] if tags else []))


# ---- crop rules ------------------------------------------------------------------------------

def test_box_rule_values():
  scale, center = crop.box_rule([10, 20, 110, 220])           # w 100, h 200
  assert scale == pytest.approx(100 / 200 * 1.05)
  np.testing.assert_allclose(center, [60, 120])
  assert center.dtype == np.float32
  with pytest.raises(ValueError, match='no area'):
    crop.box_rule([5, 5, 5, 9])


def test_landmarks_box():
  np.testing.assert_array_equal(crop.landmarks_box([[3, 9], [1, 4], [7, 5]]), [1, 4, 7, 9])


def test_read_metadata_tsv_round_trip(tmp_path):
  a = np.arange(6, dtype=np.float32).reshape(3, 2) + 0.25
  path = tmp_path / 'test.tsv'
  path.write_text('\n'.join([
      'path\t5pts\tpts\tscale\tcw\tch',                      # header: skipped
      tsv_row('.\\rawImages\\1--x\\a.jpg', a, 1.25, (30.5, 40)),
      '',
      tsv_row('b.jpg', a + 1, 2, (1, 2), tags='0,1,0,0,0,1'),
  ]) + '\n')
  rows = crop.read_metadata_tsv(path, num_points=3)
  assert [r.image_path for r in rows] == ['./rawImages/1--x/a.jpg', 'b.jpg']
  assert [r.line for r in rows] == [2, 4]
  np.testing.assert_array_equal(rows[0].landmarks, a)
  assert rows[0].scale == 1.25 and rows[1].scale == 2
  np.testing.assert_array_equal(rows[0].center, [30.5, 40])


@pytest.mark.parametrize('line, message', [
    ('a.jpg\t1,2\t1,2,3,4\t1.0\t2', r'test\.tsv:2: expected at least 6 tab-separated fields'),
    ('a.jpg\t1,2\t1,2,3\t1.0\t2\t3', r'test\.tsv:2: expected 6 landmark coordinates'),
    ('a.jpg\t1,2\t1,2,3,x,5,6\t1.0\t2\t3', r'test\.tsv:2: the 3 landmarks must be'),
    ('a.jpg\t1,2\t1,2,3,4,5,6\tbig\t2\t3', r'test\.tsv:2: scale, center_w and center_h'),
    ('a.jpg\t1,2\t1,2,3,4,5,6\t-1\t2\t3', r'test\.tsv:2: scale must be positive'),
])
def test_read_metadata_tsv_names_file_and_line(tmp_path, line, message):
  path = tmp_path / 'test.tsv'
  path.write_text(tsv_row('ok.jpg', np.zeros((3, 2)), 1, (0, 0)) + '\n' + line + '\n')
  with pytest.raises(ValueError, match=message):
    crop.read_metadata_tsv(path, num_points=3)


def test_crop_table_matches_by_name_and_landmarks():
  face = np.array([[10, 10], [30, 10], [20, 30]], np.float32)
  rows = [crop.MetadataRow('./rawImages/e/a.jpg', face, 1.0, np.array([1, 1], np.float32), 1),
          crop.MetadataRow('x/a.jpg', face + 100, 2.0, np.array([2, 2], np.float32), 2),
          crop.MetadataRow('b.jpg', face, 3.0, np.array([3, 3], np.float32), 3)]
  table = crop.CropTable(rows, 'm.tsv')
  assert table.lookup('WFLW_images/e/a.jpg', face + 0.5).scale == 1.0     # same name, nearest face
  assert table.lookup('a.jpg', face + 99).scale == 2.0
  assert table.lookup('b.jpg', face).scale == 3.0
  assert table.lookup('a.jpg', face + 50) is None                         # too far from both
  assert table.lookup('unknown.jpg', face + 101).scale == 2.0             # no name: landmarks only


def test_crop_rule_counts_and_summary():
  face = np.array([[10, 10], [30, 10], [20, 30]], np.float32)
  table = crop.CropTable([crop.MetadataRow('a.jpg', face + 1, 1.5, np.array([5, 6], np.float32), 1)],
                         'dir/test.tsv')
  rule = crop.CropRule(table)
  scale, center = rule('a.jpg', face, crop.landmarks_box(face))
  assert scale == 1.5 and center.tolist() == [5, 6]
  scale, center = rule('c.jpg', face + 60, [0, 0, 20, 40])           # not in the file: box rule
  assert scale == pytest.approx(20 / 200 * 1.05) and center.tolist() == [10, 20]
  assert rule.summary() == {'rule': 'official_tsv', 'metadata_file': 'test.tsv', 'matched': 1,
                            'box_rule_fallbacks': 1, 'metadata_minus_raw_median_offset': [1.0, 1.0],
                            'metadata_minus_raw_max_mean_distance': pytest.approx(np.sqrt(2), abs=1e-4),
                            'landmarks': crop.RAW_LANDMARKS}   # the crop alone was asked for
  assert crop.CropRule(None).summary() == {'rule': 'box_rule', 'landmarks': crop.RAW_LANDMARKS}


def test_rule_for_split_uses_the_split_file(tmp_path):
  (tmp_path / 'test.tsv').write_text(tsv_row('a.jpg', np.zeros((2, 2)), 1, (0, 0)) + '\n')
  assert crop.rule_for_split(tmp_path, 'test', 2).name == 'official_tsv'
  assert crop.rule_for_split(tmp_path, 'train', 2).name == 'box_rule'


# ---- images stored in records -------------------------------------------------------------------

def decode_as_tfds(data):
  """What tfds.data_source gives for the stored bytes (OpenCV, IMREAD_UNCHANGED, BGR -> RGB)."""
  return tfds.features.Image(shape=(None, None, 3)).decode_example_np(data)


def pil_bytes(array, fmt, **kwargs):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, fmt, **kwargs)
  return buffer.getvalue()


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)


def test_record_image_keeps_colour_jpeg_and_png_bytes():
  for data in (pil_bytes(RGB, 'JPEG'), pil_bytes(RGB, 'PNG')):
    assert common.record_image(data, 'x') is data


@pytest.mark.parametrize('kind', ['grey_jpeg', 'rgba_png', 'grey16_png', 'gif', 'ppm'])
def test_record_image_converts_to_rgb_like_the_official_loader(kind):
  grey = RGB[..., 0]
  data = {
      'grey_jpeg': lambda: pil_bytes(grey, 'JPEG'),
      'rgba_png': lambda: pil_bytes(np.dstack([RGB, RGB[..., :1]]), 'PNG'),
      'grey16_png': lambda: cv2.imencode('.png', grey.astype(np.uint16) * 257)[1].tobytes(),
      'gif': lambda: pil_bytes(grey, 'GIF'),
      'ppm': lambda: pil_bytes(RGB, 'PPM'),
  }[kind]()
  stored = common.record_image(data, 'x')
  assert stored.startswith(b'\x89PNG')
  # The official loader: cv2.imread(IMREAD_COLOR), imageio for GIF; BGR there, RGB here.
  official = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
  official = official[..., ::-1] if official is not None else np.asarray(
      Image.open(io.BytesIO(data)).convert('RGB'))
  np.testing.assert_array_equal(decode_as_tfds(stored), official)


def test_record_image_applies_exif_rotation_as_opencv_does():
  exif = Image.Exif()
  exif[0x0112] = 6                                   # rotate 90 degrees clockwise to display
  data = pil_bytes(RGB, 'JPEG', exif=exif.tobytes())
  official = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
  assert official.shape[:2] == (20, 12)
  np.testing.assert_array_equal(decode_as_tfds(common.record_image(data, 'x')), official)


def test_record_image_names_a_corrupt_file():
  with pytest.raises(ValueError, match=r'dir/a\.jpg: cannot decode the image'):
    common.record_image(b'\xff\xd8\xff not really', 'dir/a.jpg')
  with pytest.raises(ValueError, match=r'empty\.png: cannot decode'):
    common.record_image(b'', 'empty.png')


# ---- build command and sources ------------------------------------------------------------------

def data_config(**kwargs):
  cfg = ml_collections.ConfigDict({'name': 'cofw', 'config': '', 'data_dir': '', 'manual_dir': ''})
  cfg.update(kwargs)
  return cfg


def test_registry_and_lazy_imports(monkeypatch):
  assert set(build.BUILDERS) == {'wflw', 'the300w', 'the300vw', 'cofw', 'synthetic_faces', 'own_faces'}
  for name in ('wflw', 'the300w', 'the300vw', 'cofw', 'own_faces'):
    assert build.builder_class(name).name == name
    assert build.needs_manual_download(name)
  with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
    build.builder_class('mnist')
  monkeypatch.setitem(build.BUILDERS, 'synthetic_faces', 'star_jax_datasets.nope.nope_builder')
  with pytest.raises(ImportError, match="builder of 'synthetic_faces'.*cannot be imported"):
    build.builder_class('synthetic_faces')
  assert build.builder_class('cofw').name == 'cofw'        # the others still work


def test_load_source_without_manual_dir_gives_the_build_command(tmp_path):
  cfg = data_config(data_dir=str(tmp_path / 'data'))
  with pytest.raises(FileNotFoundError) as e:
    build.load_source(cfg, 'test')
  command = (f'python -m star_jax.data.build --dataset cofw --manual_dir /path/to/raw/files '
             f'--data_dir {tmp_path / "data"}')
  assert command in str(e.value) and 'data.manual_dir' in str(e.value)
  cfg.manual_dir = str(tmp_path / 'raw')
  with pytest.raises(FileNotFoundError, match='--manual_dir ' + str(tmp_path / 'raw')):
    build.load_source(cfg, 'test', build_if_missing=False)


def test_load_source_builds_then_reuses(tmp_path, monkeypatch):
  expected = cofw_fake.write(tmp_path / 'raw', num_train=2, num_test=3)
  cfg = data_config(data_dir=str(tmp_path / 'data'), manual_dir=str(tmp_path / 'raw'))
  test = build.load_source(cfg, 'test')
  assert len(test) == 3
  record = test[0]
  assert record['image'].dtype == np.uint8 and record['image'].ndim == 3
  np.testing.assert_array_equal(record['image'], expected['test'][0]['image'])   # colour, RGB
  assert len(build.load_source(cfg, 'train[:1]')) == 1
  # Built: no manual folder needed any more, nothing is rebuilt.
  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare',
                      lambda *a, **k: pytest.fail('rebuilt'))
  assert len(build.load_source(data_config(data_dir=str(tmp_path / 'data')), 'test')) == 3
  # The plain TFDS reader finds it too, with no TensorFlow.
  source = tfds.data_source('cofw', split='test', data_dir=str(tmp_path / 'data'), download=False)
  np.testing.assert_array_equal(source[0]['landmarks'], test[0]['landmarks'])


def test_load_source_builds_generated_datasets_without_manual_dir(tmp_path, monkeypatch):
  built = []

  class Generated:                       # stands in for the synthetic builder
    MANUAL_DOWNLOAD_INSTRUCTIONS = None

    def __init__(self, **kwargs):
      self.kwargs = kwargs
      self.data_dir = kwargs['data_dir']
      self.data_path = tmp_path / 'synthetic_faces' / 'small' / '1.0.0'

    def is_prepared(self):
      return bool(built)

    def download_and_prepare(self, download_config):
      built.append(download_config.manual_dir)

    def as_data_source(self, split):
      return [split]

  monkeypatch.setattr(build, 'builder_class', lambda name: Generated)
  cfg = data_config(name='synthetic_faces', config='small', data_dir=str(tmp_path))
  assert build.load_source(cfg, 'train') == ['train']
  assert built == [None]
  assert build.get_builder('synthetic_faces', config='small').kwargs == {
      'data_dir': None, 'file_format': 'array_record', 'config': 'small'}


def test_command_line_builds_and_reports(tmp_path, capsys):
  cofw_fake.write(tmp_path / 'raw', num_train=2, num_test=1)
  assert build.main(['build', '--dataset', 'cofw', '--manual_dir', str(tmp_path / 'raw'),
                     '--data_dir', str(tmp_path / 'data')]) == 0
  out = capsys.readouterr().out
  assert f'cofw: wrote test 1, train 2 records to {tmp_path / "data" / "cofw" / "1.0.0"}' in out
  assert "{'train': 'box_rule', 'test': 'box_rule'}" in out
  assert build.main(['build', '--dataset', 'cofw']) == 2
  assert '--manual_dir is required for cofw' in capsys.readouterr().err
