"""The synthetic face generator: layouts, geometry, drawn features, determinism, label ambiguity."""

import cv2
import numpy as np
import pytest

from star_jax import layouts
from star_jax.data import crop
from star_jax import drawing
from star_jax.data import synthetic as S
from star_jax.data.synthetic import preview

SIZE = 256


def mirror(points, layout, width=SIZE):
  """The layout's horizontal flip of (N, 2) points: x' = width - flip_offset - x, then permute."""
  out = points.copy()
  out[:, 0] = width - layout.flip_offset - out[:, 0]
  return out[layout.flip_permutation()]


# ---- Point maps -----------------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['300W', 'COFW'])
def test_point_maps_respect_flip_pairs_and_norm_points(name):
  lay = layouts.get_layout(name)
  m = S.point_map(name)
  assert m.shape == (lay.num_points,) and len(set(m.tolist())) == lay.num_points
  # Flipping then mapping == mapping then flipping.
  np.testing.assert_array_equal(m[lay.flip_permutation()], layouts.WFLW.flip_permutation()[m])
  # The normalising points are the WFLW ones (outer eye corners; pupils where single points).
  assert tuple(m[list(lay.ocular)]) == layouts.WFLW.ocular
  if name == 'COFW':
    assert tuple(m[list(lay.pupil)]) == layouts.WFLW.pupil


def test_300w_map_keeps_each_edge_on_one_wflw_edge_in_order():
  m = S.point_map('300W')
  wflw_edge = {i: e for e, (_, idx) in enumerate(layouts.WFLW.edges) for i in idx}
  for closed, idx in layouts.W300.edges:
    mapped = m[list(idx)]
    assert len({wflw_edge[i] for i in mapped}) == 1, idx
    order = [layouts.WFLW.edges[wflw_edge[mapped[0]]][1].index(i) for i in mapped]
    if closed:  # same cyclic order: rotate so the smallest position comes first
      k = int(np.argmin(order))
      order = order[k:] + order[:k]
    assert order == sorted(order), (idx, mapped)


def test_wflw_map_is_identity():
  np.testing.assert_array_equal(S.point_map('wflw'), np.arange(98))


# ---- Geometry: symmetry of the template -----------------------------------------------------------

@pytest.mark.parametrize('name', ['WFLW', '300W', 'COFW'])
@pytest.mark.parametrize('expr', [{}, {'smile': 0.8, 'mouth_open': 0.6, 'brow_raise': 0.7, 'pitch': 12.0}],
                         ids=['neutral', 'expressive'])
def test_frontal_template_is_flip_consistent(name, expr):
  lay = layouts.get_layout(name)
  # Box centre on the layout's mirror axis: x = (width - flip_offset) / 2.
  shift = ((SIZE - lay.flip_offset) / 2 - (SIZE - 1) / 2, 0.0)
  pts = S.render(S.neutral_params(shift=shift, **expr)).points[S.point_map(name)]
  np.testing.assert_allclose(mirror(pts, lay), pts, atol=1e-6)


def test_mirrored_pose_gives_the_flipped_face():
  """yaw/roll -> -yaw/-roll draws the mirror image (landmarks and, nearly, pixels)."""
  a = S.render(S.neutral_params(yaw=25.0, roll=12.0, pitch=-8.0))
  b = S.render(S.neutral_params(yaw=-25.0, roll=-12.0, pitch=-8.0))
  np.testing.assert_allclose(mirror(a.points, layouts.WFLW), b.points, atol=1e-6)
  # Pixels: the background gradient direction is random, so compare inside the face only.
  face = cv2.fillPoly(np.zeros((SIZE, SIZE), np.uint8), [np.round(b.points[:33]).astype(np.int32)], 1) > 0
  face = cv2.erode(face.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
  diff = np.abs(a.image[:, ::-1].astype(int) - b.image.astype(int))[face]   # x' = 255 - x
  assert diff.mean() < 6


def test_yaw_turns_the_nose_to_image_right():
  left = S.render(S.neutral_params(yaw=30.0)).points
  mid = (left[0] + left[32]) / 2
  assert left[54, 0] > mid[0] + 10      # nose tip towards +x
  # The far (image-right) half of the face is foreshortened.
  assert left[32, 0] - left[16, 0] < left[16, 0] - left[0, 0]


# ---- Drawn features sit on the landmarks ----------------------------------------------------------

def test_features_are_drawn_where_the_landmarks_are():
  p = S.neutral_params(skin=(225, 180, 150), bg_colors=((60, 120, 80), (60, 120, 80)), hair_style=0)
  r = S.render(p)
  img, P = r.image.astype(float), r.points

  def at(q):
    x, y = np.round(q).astype(int)
    return img[y, x]

  skin = np.array(p.skin, float)
  # Pupils and the eye centres are dark; the brows (between upper and lower edge) are brow coloured.
  for i in (96, 97):
    assert at(P[i]).mean() < 60
  for up, lo in ((35, 40), (44, 48)):
    np.testing.assert_allclose(at((P[up] + P[lo]) / 2), p.brow_color, atol=25)
  # Upper lip body (between its outer and inner edge) is lip coloured, not skin.
  np.testing.assert_allclose(at((P[78] + P[89]) / 2), p.lip_color, atol=25)
  # The contour is the face edge: skin 3 px inside, something clearly different 3 px outside.
  t = S.curve_tangents(P)[:33]
  normal = np.stack([-t[:, 1], t[:, 0]], -1)
  centre = P[:33].mean(0)
  normal *= np.sign(((P[:33] - centre) * normal).sum(-1, keepdims=True))  # outward
  for i in range(1, 32):
    inside, outside = at(P[i] - 3 * normal[i]), at(P[i] + 3 * normal[i])
    assert np.abs(inside - skin).max() < 45, i
    assert np.abs(outside - inside).mean() > 25, i
  # The nostril base line is darker than the skin just above the nose tip.
  assert at(P[57]).mean() < at(P[54]).mean() - 15


# ---- Samples ----------------------------------------------------------------------------------------

def test_sample_is_a_pure_function_of_seed_split_index():
  a, b = S.generate(0, 'train', 5), S.generate(0, 'train', 5)
  np.testing.assert_array_equal(a.image, b.image)
  np.testing.assert_array_equal(a.landmarks, b.landmarks)
  assert S.encode_image(a.image) == S.encode_image(b.image)
  for other in (S.generate(0, 'train', 6), S.generate(0, 'test', 5), S.generate(1, 'train', 5)):
    assert np.abs(other.image.astype(int) - a.image.astype(int)).mean() > 5
    assert np.abs(other.clean_landmarks - a.clean_landmarks).max() > 1


def test_image_and_exact_points_do_not_depend_on_level_or_layout():
  ref = S.generate(0, 'train', 3, 'WFLW', 0.0)
  for layout in ('WFLW', '300W', 'COFW'):
    for level in (1.0, 4.0):
      s = S.generate(0, 'train', 3, layout, level)
      np.testing.assert_array_equal(s.image, ref.image)
      np.testing.assert_array_equal(s.clean_landmarks, ref.clean_landmarks[S.point_map(layout)])
      np.testing.assert_array_equal(s.box, ref.box)


@pytest.mark.parametrize('name', ['WFLW', '300W', 'COFW'])
def test_sample_fields(name):
  lay = layouts.get_layout(name)
  for i in range(6):
    s = S.generate(0, 'train', i, name, 2.0)
    assert s.image.shape == (SIZE, SIZE, 3) and s.image.dtype == np.uint8
    assert s.landmarks.shape == s.clean_landmarks.shape == (lay.num_points, 2)
    assert s.landmarks.dtype == np.float32
    assert np.all((s.landmarks >= 0) & (s.landmarks <= SIZE - 1))
    # The box is the exact 98-point box, and the crop follows the STAR authors' rule.
    full = S.generate(0, 'train', i, 'WFLW', 0.0).clean_landmarks
    np.testing.assert_allclose(s.box, crop.landmarks_box(full))
    scale, center = crop.box_rule(s.box)
    assert s.scale == pytest.approx(scale) and 0.59 < s.scale < 0.91
    np.testing.assert_allclose(s.center, center)
    assert s.attributes.shape == (len(lay.attributes),) and s.attributes.dtype == np.int32
    assert set(s.attributes.tolist()) <= {0, 1}
    assert s.name == f'train/{i:06d}'
  if name == '300W':  # common and challenge are complementary
    assert s.attributes.sum() == 1


def test_attribute_flags_follow_what_was_drawn():
  assert S.render(S.neutral_params()).flags == {
      'pose': 0, 'expression': 0, 'illumination': 0, 'makeup': 0, 'occlusion': 0, 'blur': 0,
      'challenge': 0, 'common': 1}
  cases = {
      'pose': dict(yaw=35.0), 'expression': dict(mouth_open=0.8), 'illumination': dict(light_strength=0.7),
      'makeup': dict(lipstick=True),
      'occlusion': dict(occluders=((0, 0.5, 0.6, 0.9, 0.5, 0.0, (0, 0, 255)),)),
      'blur': dict(blur_sigma=2.5),
  }
  for name, override in cases.items():
    flags = S.render(S.neutral_params(**override)).flags
    assert flags[name] == 1, name
    assert sum(flags[k] for k in cases) == 1, (name, flags)
  occluded = S.render(S.neutral_params(**cases['occlusion']))
  assert occluded.occluded_fraction > 0.3
  # The occluder is drawn: the mouth is blue.
  x, y = np.round(occluded.points[85]).astype(int)
  assert occluded.image[y, x, 2] > 200 and occluded.image[y, x, 0] < 50


def test_attributes_fire_at_sensible_rates():
  flags = np.array([S.generate(7, 'train', i).attributes for i in range(80)])
  rates = flags.mean(0)
  assert np.all(rates > 0.02) and np.all(rates < 0.5), dict(zip(layouts.WFLW.attributes, rates))


# ---- Annotation ambiguity ------------------------------------------------------------------------

def test_curve_tangents_on_known_curves():
  lay = layouts.Layout(name='toy', num_points=12, edges=((True, tuple(range(8))), (False, (8, 9, 10))),
                       flip_pairs=(), flip_offset=1, ocular=(0, 1), pupil=(0, 1), default_norm='ocular',
                       threshold=0.1)
  ang = np.linspace(0, 2 * np.pi, 8, endpoint=False)
  circle = np.stack([np.cos(ang), np.sin(ang)], -1) * 10 + 50
  line = np.array([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
  t = S.curve_tangents(np.concatenate([circle, line, [[7.0, 7.0]]]), lay)
  np.testing.assert_allclose(t[:8], np.stack([-np.sin(ang), np.cos(ang)], -1), atol=1e-12)
  np.testing.assert_allclose(t[8:11], [[0.6, 0.8]] * 3, atol=1e-12)   # open ends use one neighbour
  np.testing.assert_array_equal(t[11], [0.0, 0.0])                    # on no edge


def test_train_labels_move_along_the_tangent_and_scale_with_the_level():
  for i in range(4):
    clean = S.generate(0, 'train', i, ambiguity=0.0)
    np.testing.assert_array_equal(clean.landmarks, clean.clean_landmarks)   # level 0: exact
    t = S.curve_tangents(clean.clean_landmarks.astype(np.float64))
    d1 = S.generate(0, 'train', i, ambiguity=1.0).landmarks - clean.clean_landmarks
    assert np.abs(d1[:33]).max() > 0.5                                       # it is noisy
    across = d1[:, 0] * t[:, 1] - d1[:, 1] * t[:, 0]
    assert np.abs(across).max() < 2e-3                                       # only along the curve
    np.testing.assert_array_equal(d1[96:], 0.0)                              # pupils: no tangent
    for level in (2.0, 4.0):
      d = S.generate(0, 'train', i, ambiguity=level).landmarks - clean.clean_landmarks
      np.testing.assert_allclose(d, level * d1, atol=2e-3)
    test = S.generate(0, 'test', i, ambiguity=4.0)
    np.testing.assert_array_equal(test.landmarks, test.clean_landmarks)      # test labels exact


def test_noise_amplitude_per_part_matches_its_fraction_of_the_iod():
  along = []
  for i in range(30):
    s = S.generate(3, 'train', i, ambiguity=1.0)
    t = S.curve_tangents(s.clean_landmarks.astype(np.float64))
    along.append(((s.landmarks - s.clean_landmarks) * t).sum(-1) / S.inter_ocular(s.clean_landmarks))
  along = np.array(along)
  std = {part: along[:, sl].std() for part, sl in S.PART_SLICES.items() if part != 'pupil'}
  for part, value in std.items():
    assert value == pytest.approx(S.AMBIGUITY_FRACTION[part], rel=0.3), (part, std)
  assert std['contour'] > std['brow'] > std['eye']


def test_noise_stays_inside_the_image_along_the_tangent():
  clean = np.array([[2.0, 100.0], [2.0, 110.0], [2.0, 120.0]] + [[100.0, 100.0]] * 95)
  z = np.zeros(98)
  z[1] = 3.0   # a large step along +y would stay inside; along the tangent (vertical) it does
  z[0] = -3.0
  noisy = S.tangential_noise(clean, z, level=100.0, image_size=SIZE)
  assert np.all((noisy >= 0) & (noisy <= SIZE - 1))
  np.testing.assert_allclose(noisy[:3, 0], 2.0)   # still on the (vertical) tangent


# ---- Errors and helpers ----------------------------------------------------------------------------

def test_bad_arguments_raise_clear_errors():
  with pytest.raises(ValueError, match='index'):
    S.generate(0, 'train', -1)
  with pytest.raises(ValueError, match='ambiguity'):
    S.generate(0, 'train', 0, ambiguity=-1.0)
  with pytest.raises(ValueError, match='layout'):
    S.generate(0, 'train', 0, layout='AFLW')
  with pytest.raises(ValueError, match='format'):
    S.encode_image(np.zeros((4, 4, 3), np.uint8), 'gif')


def test_encoded_images_decode_to_the_rgb_pixels():
  s = S.generate(0, 'test', 1)
  png = cv2.imdecode(np.frombuffer(S.encode_image(s.image, 'png'), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
  np.testing.assert_array_equal(png, s.image)
  jpg = cv2.imdecode(np.frombuffer(S.encode_image(s.image), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
  assert np.abs(jpg.astype(int) - s.image.astype(int)).mean() < 3


def test_contact_sheet_tiles_images(tmp_path):
  tiles = [np.full((8, 8, 3), i, np.uint8) for i in range(5)]
  sheet = drawing.contact_sheet(tiles, columns=2)
  assert sheet.shape == (24, 16, 3)
  assert sheet[8, 8, 0] == 3 and sheet[16, 8, 0] == 0
  assert preview.main(['preview', '--sheet', str(tmp_path / 's.png'), '--num', '2']) == 0
  assert cv2.imread(str(tmp_path / 's.png')).shape == (256, 512, 3)
