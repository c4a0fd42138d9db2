"""Video: the tracker, the smoothing and the predict command on videos (star_jax.inference.video).

The moving face is a real photo (takeo, 68 annotated points) moved by a known motion
(benchmarks/video.py `motion_video`); the "network" is an oracle that localises that face in any crop
by image registration, plus noise drawn from a hash of the crop, so the true landmarks of every frame
and the jitter are known (`RegistrationOracle`)."""

import csv
import json

import cv2
import numpy as np
import pytest

from benchmarks import video as bench
from star_jax import predict
from star_jax.inference import face_detect
from star_jax.inference import video
from star_jax.inference.landmarker import FaceLandmarker


@pytest.fixture(scope='module')
def clip():
  """48 frames (256 x 288) of takeo moving (translation, rotation, zoom) and the true landmarks."""
  return bench.motion_video(48)


def _oracle_landmarker(**options):
  return FaceLandmarker(bench.RegistrationOracle(128), 128, layout='300W', faces='largest', **options)


# ---- Smoothing ----------------------------------------------------------------------------------

def test_one_euro_filter_smooths_rest_and_follows_motion():
  rng = np.random.default_rng(0)
  f = video.OneEuroFilter(min_cutoff=1.0, beta=0.5)
  x0 = np.array([[10.0, 20.0]])
  assert f(x0, 0.0).tolist() == x0.tolist()           # the first sample passes unchanged
  noisy = [x0 + rng.normal(0, 1.0, (1, 2)) for _ in range(100)]
  # 1 px of noise on a 100 px face, at 25 frames/s.
  out = np.array([f(x, (i + 1) / 25, scale=100.0) for i, x in enumerate(noisy)])
  assert np.std(out[20:] - x0) < 0.5 * np.std(np.array(noisy)[20:] - x0)
  # A fast steady motion (5 face sizes per second) is followed with a lag of a few frames only.
  f = video.OneEuroFilter(min_cutoff=1.0, beta=0.5)
  ramp = [np.array([[500.0 * t, 0.0]]) for t in np.arange(50) / 25]
  last = [f(x, i / 25, scale=100.0) for i, x in enumerate(ramp)][-1]
  assert 0 < ramp[-1][0, 0] - last[0, 0] < 4 * 500.0 / 25
  with pytest.raises(ValueError):
    video.OneEuroFilter(min_cutoff=0)


def test_landmark_smoother_keeps_a_still_face_and_follows_a_rigid_motion():
  _, points = bench.load_photo()
  s = video.LandmarkSmoother()
  for i in range(5):
    np.testing.assert_allclose(s(points, i / 25), points, atol=1e-6)
  # A rigid motion (the face turns by 20 degrees, zooms and slides, then holds still) is followed
  # exactly once it holds: the pose and shape filters converge on the moved face.
  m = cv2.getRotationMatrix2D((100.0, 120.0), 20.0, 1.2)
  moved = points @ m[:, :2].T + m[:, 2] + [15.0, -8.0]
  out = [s(moved, (5 + i) / 25) for i in range(60)]
  assert np.abs(out[0] - moved).max() > 1.0           # it is a filter ...
  np.testing.assert_allclose(out[-1], moved, atol=0.05)   # ... that settles on the truth


def test_jitter_measures_motion_beyond_the_true_motion():
  truth = np.cumsum(np.ones((10, 3, 2)), axis=0)      # everything moves by (1, 1) per frame
  assert video.jitter(truth, truth) == 0.0
  assert video.jitter(truth + 5.0, truth) == 0.0       # a constant offset is not jitter
  wobble = truth.copy()
  wobble[1::2] += [0.3, 0.4]                           # +-0.5 px back and forth
  assert video.jitter(wobble, truth) == pytest.approx(0.5)


# ---- Tracking -----------------------------------------------------------------------------------

def test_tracker_keeps_the_face_and_smoothing_lowers_the_jitter(clip):
  frames, truth = clip
  iod = bench.inter_ocular(truth)
  result = {}
  for smooth in (False, True):
    landmarker = _oracle_landmarker()
    tracker_options = dict(smooth=smooth, redetect_every=15)
    pred, per_frame = bench.track(landmarker, frames, **tracker_options)
    # The face is there in every frame, as one track, on the true landmarks.
    assert all(len(faces) == 1 and faces[0].track == 0 for faces in per_frame)
    err = np.linalg.norm(pred - truth, axis=-1).mean(axis=1) / iod
    assert err.max() < 0.06, err
    # The detector ran on frames 0, 15, 30, 45 only; in between the crop came from the landmarks.
    sources = [faces[0].result.box_source for faces in per_frame]
    assert sources[0] == 'detector' and sources[1:15] == ['track'] * 14
    assert [i for i, faces in enumerate(per_frame) if faces[0].detection is not None] == [0, 15, 30, 45]
    result[smooth] = (video.jitter(pred, truth) / iod, err.mean())
  (raw_jitter, raw_err), (smooth_jitter, smooth_err) = result[False], result[True]
  print(f'jitter (% inter-ocular): raw {100 * raw_jitter:.2f}, smoothed {100 * smooth_jitter:.2f}; '
        f'mean error: raw {100 * raw_err:.2f}, smoothed {100 * smooth_err:.2f}')
  # Measured: raw 3.9 %, smoothed 1.7 % (jitter); errors 2.5 % and 2.4 %.
  assert smooth_jitter < 0.6 * raw_jitter
  assert smooth_err < 1.2 * raw_err      # without paying for it in lag


def test_tracker_drops_a_face_the_detector_no_longer_confirms_and_finds_it_again(clip):
  frames, truth = clip
  landmarker = _oracle_landmarker()
  tracker = video.FaceTracker(landmarker, redetect_every=2)
  blank = np.full_like(frames[0], 90)
  # A cut to an empty scene: the oracle, like a network, still "sees" a face in the crop, but the
  # detector does not confirm the track on two detection rounds in a row (frames 2 and 4): dropped.
  per_frame = [tracker(f, i / 25) for i, f in enumerate([frames[0], blank, blank, blank, blank, frames[10]])]
  assert [len(faces) for faces in per_frame] == [1, 1, 1, 1, 0, 1]
  assert tracker.stats['dropped'] == 1
  # The face comes back: no track left, so the detector runs at once and starts a new one.
  back = per_frame[-1][0]
  assert back.track == 1 and back.result.box_source == 'detector'
  assert np.linalg.norm(back.landmarks - truth[10], axis=-1).mean() < 0.06 * bench.inter_ocular(truth)


def test_a_track_is_lost_when_its_landmarks_jump():
  old = np.array([[100.0, 100.0], [200.0, 100.0], [150.0, 220.0]])
  assert video.plausible(old + [20.0, -10.0], old, (480, 640))
  assert not video.plausible(old * 2.0 - 100, old, (480, 640))          # 2x bigger in one frame
  assert not video.plausible(old + [90.0, 0.0], old, (480, 640))        # moved by 3/4 of its side
  assert not video.plausible(old - [170.0, 0.0], old - [140.0, 0.0], (480, 640))   # centre off the frame
  assert not video.plausible(np.full_like(old, np.nan), old, (480, 640))


def test_tracker_follows_every_face_with_faces_all(clip):
  frames, _ = clip
  # Two copies of the moving face side by side: two tracks, each staying on its own face.
  both = np.concatenate([frames[:12], frames[:12, :, ::-1]], axis=2)
  landmarker = _oracle_landmarker()
  tracker = video.FaceTracker(landmarker, mode='all', redetect_every=5)
  per_frame = [tracker(f, i / 25) for i, f in enumerate(both)]
  assert all(sorted(f.track for f in faces) == [0, 1] for faces in per_frame)
  width = frames.shape[2]
  for faces in per_frame:
    centres = {f.track: f.landmarks[:, 0].mean() for f in faces}
    assert sorted(c < width for c in centres.values()) == [False, True]


# ---- The command --------------------------------------------------------------------------------

def test_predict_command_on_a_video(clip, tmp_path, monkeypatch, capsys):
  frames, truth = clip
  frames, truth = frames[:30], truth[:30]
  bench.write_mp4(tmp_path / 'clip.mp4', frames)
  made = []

  def from_checkpoint(path, **options):
    landmarker = _oracle_landmarker(**{k: v for k, v in options.items() if k in ('detector', 'batch_size')})
    made.append(options)
    return landmarker

  monkeypatch.setattr(FaceLandmarker, 'from_checkpoint', staticmethod(from_checkpoint))
  out = tmp_path / 'out'
  for smooth in ('--nosmooth', '--smooth'):
    assert predict.main(['predict', '--checkpoint', str(tmp_path), str(tmp_path / 'clip.mp4'), '--output', str(out),
                         smooth, '--redetect_every', '10']) == 0
    printed = capsys.readouterr().out
    assert 'clip.mp4: 30 frames (30 with a face)' in printed and 'frames/s' in printed
    record = json.loads((out / 'clip_landmarks.json').read_text())
    assert record['num_frames'] == 30 and record['fps'] == pytest.approx(25.0) and record['num_points'] == 68
    assert record['tracking']['detections'] == 3 and record['tracking']['started'] == 1
    assert (record['smoothing'] is not None) == (smooth == '--smooth')
    landmarks = np.array([fr['faces'][0]['landmarks'] for fr in record['frames']])
    # Through MPEG-4 compression the oracle is still on the face.
    err = np.linalg.norm(landmarks - truth, axis=-1).mean(axis=1)
    assert err.max() < 0.08 * bench.inter_ocular(truth), err
    assert ('landmarks_raw' in record['frames'][0]['faces'][0]) == (smooth == '--smooth')
    with open(out / 'clip_landmarks.csv') as fh:
      rows = list(csv.reader(fh))
    assert rows[0][:5] == ['frame', 'time_s', 'track', 'box_source', 'detector_score'] and len(rows[0]) == 9 + 136
    assert len(rows) == 31 and rows[1][3] == 'detector' and rows[2][3] == 'track'
    np.testing.assert_allclose(np.array(rows[5][9:], float).reshape(68, 2), landmarks[4], atol=2e-3)
    annotated = cv2.VideoCapture(str(out / 'clip_landmarks.mp4'))
    assert int(annotated.get(cv2.CAP_PROP_FRAME_COUNT)) == 30
    ok, first = annotated.read()
    assert ok and first.shape == frames[0].shape
    assert np.abs(first.astype(int) - frames[0][..., ::-1]).max() > 100     # something was drawn
    annotated.release()


def test_predict_command_on_a_folder_of_frames(clip, tiny_wflw_checkpoint, tmp_path):
  # A real (tiny, untrained) network; a folder of frames is a video with --video (without it, a folder
  # of photos: test_video_inputs_and_errors).
  tiny_checkpoint = tiny_wflw_checkpoint
  frames, _ = clip
  folder = tmp_path / 'frames'
  folder.mkdir()
  for i in (0, 1, 2, 10, 11):    # frame_2 comes before frame_10: natural order
    cv2.imwrite(str(folder / f'frame_{i}.png'), cv2.cvtColor(frames[i], cv2.COLOR_RGB2BGR))
  out = tmp_path / 'out'
  assert predict.main(['predict', '--checkpoint', str(tiny_checkpoint), str(folder), '--output', str(out), '--video',
                       '--fps', '10', '--smooth', '--show_ambiguity']) == 0
  record = json.loads((out / 'frames_landmarks.json').read_text())
  assert record['kind'] == 'frames' and record['fps'] == 10.0 and record['num_frames'] == 5
  assert [fr['time'] for fr in record['frames']][:3] == [0.0, 0.1, 0.2]
  face = record['frames'][0]['faces'][0]
  assert face['box_source'] == 'detector' and face['detector_score'] >= face_detect.DEFAULT_SCORE_THRESHOLD
  assert np.array(face['landmarks']).shape == (98, 2) and np.array(face['covariances']).shape == (98, 2, 2)
  assert (out / 'frames_landmarks.mp4').stat().st_size > 0 and (out / 'frames_landmarks.csv').is_file()


def test_video_inputs_and_errors(tmp_path, capsys):
  (tmp_path / 'a.mp4').write_bytes(b'not a video')
  (tmp_path / 'b.jpg').write_bytes(b'x')
  (tmp_path / 'dir').mkdir()
  videos, others = video.split_inputs([str(tmp_path / 'a.mp4'), str(tmp_path / 'b.jpg'), str(tmp_path / 'dir')], False)
  assert [v.path.name for v in videos] == ['a.mp4'] and others == [str(tmp_path / 'b.jpg'), str(tmp_path / 'dir')]
  videos, _ = video.split_inputs([str(tmp_path / 'dir')], True)
  assert videos == [video.VideoInput(tmp_path / 'dir', 'frames')]
  with pytest.raises(ValueError, match='cannot open'):
    video.FrameReader(video.VideoInput(tmp_path / 'a.mp4', 'file'), 25.0)
  with pytest.raises(ValueError, match='no image files'):
    video.FrameReader(video.VideoInput(tmp_path / 'dir', 'frames'), 25.0)
  assert [p.name for p in video.frame_files(_frames(tmp_path / 'f', ['f10.png', 'f2.png', 'f1.png']), ('.png',))] == [
      'f1.png', 'f2.png', 'f10.png']


def _frames(folder, names):
  folder.mkdir()
  for n in names:
    cv2.imwrite(str(folder / n), np.zeros((4, 4, 3), np.uint8))
  return folder
