"""Builds 300VW from a tiny 300VW-style folder: MJPG videos made from real photos, with annot/*.pts."""

import json
import pathlib

import cv2
import numpy as np
import pytest
import tensorflow_datasets as tfds

from star_jax.data import crop
from star_jax_datasets.the300vw import fake_data
from star_jax_datasets.the300vw import the300vw_dataset_builder as the300vw

REAL_FACES = pathlib.Path(__file__).resolve().parents[2] / 'tests' / 'testdata' / 'real_faces'


def build(raw, data):
  builder = the300vw.Builder(data_dir=str(data))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(raw)))
  return builder


@pytest.fixture(scope='module')
def built(tmp_path_factory):
  root = tmp_path_factory.mktemp('the300vw')
  videos = fake_data.write(root / 'raw', REAL_FACES)
  return build(root / 'raw', root / 'data'), videos, root / 'raw'


def test_benchmark_lists():
  assert [len(the300vw.SPLITS[s]) for s in ('train', 'test_category1', 'test_category2', 'test_category3')] == [
      50, 31, 19, 14]
  every = [v for ids in the300vw.SPLITS.values() for v in ids]
  assert len(every) == len(set(every)) == 114 and all(len(v) == 3 and v.isdigit() for v in every)
  assert the300vw.video_id(7) == '007' and the300vw.video_id('114') == '114'


def test_splits_order_categories_and_keys(built):
  builder, videos, _ = built
  source = builder.as_data_source()
  assert {k: len(v) for k, v in source.items()} == {'train': 5, 'test_category1': 3, 'test_category2': 3,
                                                    'test_category3': 2}
  for split, flags in (('train', [0, 0, 0]), ('test_category1', [1, 0, 0]), ('test_category2', [0, 1, 0]),
                       ('test_category3', [0, 0, 1])):
    keys = [(source[split][i]['video'].decode(), int(source[split][i]['frame'])) for i in range(len(source[split]))]
    want = [(vid, f) for vid, info in videos.items() if info['split'] == split for f in range(1, info['frames'] + 1)]
    assert keys == want                                            # one record per annotated frame, in order
    assert all(source[split][i]['attributes'].tolist() == flags for i in range(len(source[split])))
    assert source[split][0]['image_name'].decode() == f'{want[0][0]}/000001.jpg'
  # The three test categories read as one split, in category order.
  test = builder.as_data_source(split=the300vw.TEST_SPLIT)
  assert [test[i]['video'].decode() for i in range(len(test))] == ['114'] * 3 + ['203'] * 3 + ['410'] * 2
  assert builder.info.metadata['frame_check'] == {}


def test_landmarks_crop_and_face_window(built):
  builder, videos, raw = built
  source = builder.as_data_source(split='test_category1')
  capture = cv2.VideoCapture(str(raw / '114' / 'vid.avi'))
  for i in range(3):
    record = source[i]
    ok, frame = capture.read()
    assert ok
    offset = record['frame_offset']
    truth = videos['114']['landmarks'][i]                               # 0-based frame pixels
    np.testing.assert_allclose(record['landmarks'] + offset, truth, atol=1e-3)
    box = crop.landmarks_box(truth)
    np.testing.assert_allclose(record['box'] + np.tile(offset, 2), box, atol=1e-3)
    scale, center = crop.box_rule(box)
    assert record['scale'] == pytest.approx(scale, rel=1e-4)          # .pts keep 3 decimals
    np.testing.assert_allclose(record['center'] + offset, center, atol=1e-3)
    # The image is the frame's window around the face, WINDOW_CROP_SIDES crop sides wide (clipped to
    # the frame), JPEG-compressed once more.
    x0, y0, x1, y1 = the300vw.face_window(center, scale, frame.shape[1], frame.shape[0])
    assert tuple(offset) == (x0, y0) and record['image'].shape == (y1 - y0, x1 - x0, 3)
    assert np.abs(record['image'].astype(int) - frame[y0:y1, x0:x1, ::-1]).mean() < 2.5
  capture.release()


def test_frame_count_disagreement_is_reported(tmp_path, caplog):
  videos = {'001': ('train', 'takeo', 3), '114': ('test_category1', 'takeo', 2), '203': ('test_category2', 'takeo', 2),
            '410': ('test_category3', 'takeo', 2)}
  fake_data.write(tmp_path / 'raw', REAL_FACES, videos)
  annot = tmp_path / 'raw' / '114' / 'annot'
  (annot / '000003.pts').write_text((annot / '000002.pts').read_text())  # an annotation with no frame
  (annot / '000001.pts').unlink()                                          # a frame with no annotation
  with caplog.at_level('WARNING'):
    builder = build(tmp_path / 'raw', tmp_path / 'data')
  assert builder.info.splits['test_category1'].num_examples == 1
  assert builder.info.metadata['frame_check'] == {'114': {
      'frames_read': 2, 'frame_count_property': 2, 'annotations': 2, 'annotations_without_frame': 1,
      'frames_without_annotation': 1}}
  assert any('114/vid.avi: OpenCV read 2 frames, 2 annotations' in r.getMessage() for r in caplog.records)


def test_official_metadata_gives_the_crop(tmp_path):
  videos = fake_data.write(tmp_path / 'raw', REAL_FACES)
  rows = []
  for vid, info in videos.items():
    for frame, points in enumerate(info['landmarks'], start=1):
      five = ','.join(f'{v:.3f}' for v in points[[36, 45, 30, 48, 54]].reshape(-1))
      rows.append((info['split'], '\t'.join([f'frames/{vid}/{frame:06d}.jpg', five,
                                              ','.join(f'{v:.3f}' for v in points.reshape(-1)),
                                              f'{0.3 + frame / 100}', f'{100 + frame}', '90'])))
  (tmp_path / 'raw' / 'train.tsv').write_text('\n'.join(r for s, r in rows if s == 'train') + '\n')
  (tmp_path / 'raw' / 'test.tsv').write_text('\n'.join(r for s, r in rows if s != 'train') + '\n')
  builder = build(tmp_path / 'raw', tmp_path / 'data')
  assert set(builder.info.metadata['crop_rule'].values()) == {'official_tsv'}
  # The crop alone: no official metadata exists for 300VW, its records keep the .pts landmarks.
  assert set(builder.info.metadata['landmarks'].values()) == {crop.RAW_LANDMARKS}
  record = builder.as_data_source(split='test_category3')[1]
  assert record['scale'] == pytest.approx(0.32)
  np.testing.assert_allclose(record['center'] + record['frame_offset'], [102, 90])


def test_missing_videos_use_the_benchmark_lists(tmp_path):
  fake_data.write(tmp_path / 'raw', REAL_FACES)
  (tmp_path / 'raw' / the300vw.SPLITS_FILE).unlink()                  # the built-in lists: 114 videos
  with pytest.raises(FileNotFoundError) as e:
    build(tmp_path / 'raw', tmp_path / 'data')
  assert '  - 003/vid.avi' in str(e.value) and '  - 001/vid.avi' not in str(e.value)
  assert the300vw.HOMEPAGE in str(e.value)


def test_splits_file_errors(tmp_path):
  fake_data.write(tmp_path / 'raw', REAL_FACES)
  splits = tmp_path / 'raw' / the300vw.SPLITS_FILE
  splits.write_text(json.dumps({'train': ['001', 114], 'test_category1': ['114']}))
  with pytest.raises(ValueError, match='video 114 is in both train and test_category1'):
    build(tmp_path / 'raw', tmp_path / 'data')
  splits.write_text('{"train": ["001"],\n "test": ["114"]}')
  with pytest.raises(ValueError, match=r"300vw_splits\.json: unknown split\(s\) \['test'\]"):
    build(tmp_path / 'raw', tmp_path / 'data')
  splits.write_text('{"train": ["001"]\n "test_category1": ["114"]}')
  with pytest.raises(ValueError, match=r'300vw_splits\.json:2: not valid JSON'):
    build(tmp_path / 'raw', tmp_path / 'data')


def test_malformed_annotation_and_unreadable_video_are_named(tmp_path):
  fake_data.write(tmp_path / 'raw', REAL_FACES)
  pts = tmp_path / 'raw' / '203' / 'annot' / '000002.pts'
  lines = pts.read_text().splitlines()
  pts.write_text('\n'.join(lines[:5] + ['1.0 2.0 3.0'] + lines[6:]) + '\n')
  with pytest.raises(ValueError, match=r'203/annot/000002\.pts:6: expected a point "x y"'):
    build(tmp_path / 'raw', tmp_path / 'data')
  (tmp_path / 'raw' / '001' / 'vid.avi').write_bytes(b'not a video')
  with pytest.raises(ValueError, match=r'001/vid\.avi: OpenCV cannot open this video'):
    build(tmp_path / 'raw', tmp_path / 'data')
