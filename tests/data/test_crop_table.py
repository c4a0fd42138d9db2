"""Matching faces to the rows of an official metadata file (star_jax/data/crop.py: CropTable, CropRule),
and what a matched face's record carries: the file's crop and landmarks."""

import numpy as np
import pytest

from star_jax.data import crop


def _row(path, landmarks, scale=1.0, center=(10.0, 20.0), line=1):
  return crop.MetadataRow(image_path=path, landmarks=np.asarray(landmarks, np.float32), scale=scale,
                          center=np.asarray(center, np.float32), line=line)


POINTS = np.array([[10, 10], [30, 10], [20, 25]], np.float32)
BOX = np.array([5, 5, 35, 30], np.float32)


def test_a_nan_row_never_wins_the_match():
  nan = np.full_like(POINTS, np.nan)
  # The NaN row first, for the same image: its distance is NaN, which np.argmin would pick.
  table = crop.CropTable([_row('a/img.jpg', nan, 9.0, line=2), _row('./raw/img.jpg', POINTS + 0.5, 2.0, line=3)],
                         'test.tsv')
  assert table.unusable == [2]
  row = table.lookup('img.jpg', POINTS)
  assert row is not None and row.line == 3 and row.scale == 2.0
  # A row with a single NaN point is as unusable as a whole NaN row.
  partial = POINTS.copy()
  partial[1] = np.nan
  table = crop.CropTable([_row('img.jpg', partial, 9.0, line=1), _row('img.jpg', POINTS, 2.0, line=2)], 'test.tsv')
  assert table.lookup('img.jpg', POINTS).line == 2


def test_only_nan_rows_for_a_face_give_the_box_rule():
  nan = np.full_like(POINTS, np.nan)
  far = POINTS + 500
  table = crop.CropTable([_row('img.jpg', nan, line=1), _row('other.jpg', far, line=2)], 'test.tsv')
  # No usable row of that image; the other image's row is far: no match, the face gets the box rule.
  assert table.lookup('img.jpg', POINTS) is None
  rule = crop.CropRule(table)
  face = rule.crop('img.jpg', POINTS, BOX)
  scale, center = crop.box_rule(BOX)
  assert not face.official and face.scale == pytest.approx(scale)
  np.testing.assert_array_equal(face.center, center)
  np.testing.assert_array_equal(face.landmarks, POINTS)
  summary = rule.summary()
  assert summary['box_rule_fallbacks'] == 1 and summary['rows_with_non_finite_landmarks'] == 1
  assert summary['landmarks'] == crop.RAW_LANDMARKS
  # Landmarks of the face itself that are not finite match nothing.
  assert table.lookup('other.jpg', far * np.nan) is None


def test_a_table_of_nan_rows_only_is_refused():
  nan = np.full_like(POINTS, np.nan)
  with pytest.raises(ValueError, match='test.tsv: every row of the metadata file has NaN or infinite landmarks'):
    crop.CropTable([_row('a.jpg', nan), _row('b.jpg', nan)], 'test.tsv')


def test_a_matched_face_carries_the_files_crop_and_landmarks():
  official = POINTS + np.float32(0.75)    # within the match distance: another pixel convention
  rule = crop.CropRule(crop.CropTable([_row('x/img.jpg', official, 1.5, (21.0, 17.0))], 'train.tsv'))
  face = rule.crop('img.jpg', POINTS, BOX)
  assert face.official and face.scale == 1.5
  np.testing.assert_array_equal(face.center, [21.0, 17.0])
  np.testing.assert_array_equal(face.landmarks, official)
  assert face.landmarks.dtype == np.float32
  # The older call gives the crop alone.
  scale, center = rule('img.jpg', POINTS, BOX)
  assert scale == 1.5 and list(center) == [21.0, 17.0]
  summary = rule.summary()
  assert summary['matched'] == 2 and summary['landmarks'] == crop.TSV_LANDMARKS
  np.testing.assert_allclose(summary['metadata_minus_raw_median_offset'], [0.75, 0.75])
  assert summary['metadata_minus_raw_max_mean_distance'] == pytest.approx(0.75 * np.sqrt(2), abs=1e-4)
  # Without a table: the box rule and the face's own landmarks.
  plain = crop.CropRule(None)
  face = plain.crop('img.jpg', POINTS, BOX)
  assert not face.official and plain.summary() == {'rule': crop.BOX_RULE, 'landmarks': crop.RAW_LANDMARKS}
