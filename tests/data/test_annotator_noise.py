"""The simulated annotators of the synthetic faces (star_jax.data.synthetic.noise, RelabelledSource).

Each label moves only along the tangent of its curve; an annotator's habit is the same on every face
they label; the habits are centred over the pool (their consensus is the exact point), mirror-symmetric
(a flipped face is labelled by the same habit) and of unit variance; everything is deterministic per
(seed, index).
"""

import numpy as np
import pytest

from star_jax import layouts
from star_jax.data import synthetic
from star_jax.data.synthetic import noise

LEVEL = 0.5   # small: no label is shortened at the image border or clipped at 3 sigma


@pytest.fixture(scope='module')
def records():
  """Twelve level-0 train records of seed 0 at 128 px, as the builder writes them (the fields the
  relabelling reads)."""
  out = []
  for i in range(12):
    s = synthetic.generate(0, 'train', i, ambiguity=0.0, image_size=128)
    out.append({'clean_landmarks': s.clean_landmarks, 'landmarks': s.landmarks, 'image': s.image})
  return out


def _amounts(record, level=LEVEL):
  """(98,) each label's move along its tangent, in standard deviations of the level's noise (0 where
  the level has no noise: the pupils)."""
  clean = record['clean_landmarks'].astype(np.float64)
  delta = record['landmarks'] - clean
  tangent = synthetic.curve_tangents(clean, layouts.WFLW)
  sigma = level * synthetic.ambiguity_fractions() * synthetic.inter_ocular(clean)
  return np.where(sigma > 0, (delta * tangent).sum(-1) / np.where(sigma > 0, sigma, 1.0), 0.0), delta, tangent


def test_habits_are_centred_symmetric_deterministic_and_of_unit_variance():
  biases = synthetic.annotator_biases(0, 5)
  assert biases.shape == (5, 98)
  np.testing.assert_allclose(biases.mean(0), 0.0, atol=1e-12)          # the consensus is the exact point
  np.testing.assert_array_equal(biases, synthetic.annotator_biases(0, 5))
  assert not np.allclose(biases, synthetic.annotator_biases(1, 5))
  # A horizontal flip moves point i's label to its partner p(i), its tangential amount times s_i: a
  # mirror-symmetric habit is unchanged by it.
  perm, signs = layouts.WFLW.flip_permutation(), noise.flip_signs()
  np.testing.assert_allclose(biases[:, perm], signs * biases, atol=1e-12)
  assert (signs[:96] != 0).all() and (signs[96:] == 0).all()            # every point with a tangent
  # Unit variance per point over draws of the pool, except where symmetry forbids a habit (the chin,
  # the nose-base and lip midpoints: self-mirrored with a horizontal tangent) and the pupils.
  pools = np.concatenate([synthetic.annotator_biases(seed, 5) for seed in range(300)])
  var = pools.var(0)
  zero = var < 1e-20
  assert set(np.flatnonzero(zero)) == {16, 57, 79, 85, 90, 94, 96, 97}
  np.testing.assert_allclose(var[~zero], 1.0, atol=0.15)
  # Smooth along a curve: neighbouring contour points share most of their habit, distant ones little.
  assert np.corrcoef(pools[:, 3], pools[:, 4])[0, 1] > 0.8
  assert abs(np.corrcoef(pools[:, 3], pools[:, 9])[0, 1]) < 0.4
  with pytest.raises(ValueError, match='at least 2'):
    synthetic.annotator_biases(0, 1)


def test_annotator_labels_are_tangential_and_consistent_per_annotator(records):
  source = synthetic.RelabelledSource(records, LEVEL, seed=0, image_size=128, model='annotators', annotators=3,
                                      bias_share=1.0)
  biases = synthetic.annotator_biases(0, 3)
  who = [source.annotator(i) for i in range(len(records))]
  assert set(who) == {0, 1, 2}                                          # twelve faces reach every annotator
  assert who == [source.annotator(i) for i in range(len(records))]       # deterministic per (seed, index)
  # Two faces of one annotator, different faces: the same amounts (in units of each face's spread).
  first, second = [i for i, a in enumerate(who) if a == who[0]][:2]
  np.testing.assert_allclose(_amounts(source[first])[0], _amounts(source[second])[0], atol=2e-3)
  for i, annotator in enumerate(who):
    amounts, delta, tangent = _amounts(source[i])
    cross = delta[:, 0] * tangent[:, 1] - delta[:, 1] * tangent[:, 0]
    np.testing.assert_allclose(cross, 0.0, atol=1e-3)                    # along the curve only
    # With no random error (bias share 1) a face's labels are exactly its annotator's habit.
    np.testing.assert_allclose(amounts, biases[annotator] * (synthetic.ambiguity_fractions() > 0), atol=2e-3)

  # With the default share the habit is 3/4 of the variance, plus the face's own draws (the builder's z).
  mixed = synthetic.RelabelledSource(records, LEVEL, seed=0, image_size=128, model='annotators', annotators=3)
  for i in range(4):
    _, rng = synthetic.sample_rngs(0, 'train', i)
    z = rng.standard_normal(98)
    expected = np.sqrt(0.75) * biases[mixed.annotator(i)] + np.sqrt(0.25) * z
    amounts, _, _ = _amounts(mixed[i])
    ok = synthetic.ambiguity_fractions() > 0
    np.testing.assert_allclose(amounts[ok], expected[ok], atol=2e-3)


def test_annotator_noise_is_zero_mean_over_the_pool_and_matches_the_independent_spread():
  # Over many faces the annotators' amounts average to zero (centred habits, a uniform choice) and
  # have the independent model's unit variance, so a level means the same spread in both models.
  biases = synthetic.annotator_biases(0, 5)
  rng = np.random.default_rng(0)
  who = rng.integers(5, size=20000)
  amounts = np.stack([synthetic.annotator_noise(biases, a, rng.standard_normal(98)) for a in who])
  ok = biases.var(0) > 0
  np.testing.assert_allclose(amounts.mean(0)[ok], 0.0, atol=0.06)
  # The spread of one pool's labels: 3/4 habit variance (over this pool) + 1/4 random.
  np.testing.assert_allclose(amounts.var(0)[ok], 0.75 * biases.var(0)[ok] + 0.25, atol=0.08)


def test_level_zero_and_the_independent_model(records):
  exact = synthetic.RelabelledSource(records, 0.0, seed=0, image_size=128, model='annotators')
  np.testing.assert_array_equal(exact[3]['landmarks'], exact[3]['clean_landmarks'])
  # The independent model is the builder's noise (its first draws), unchanged by the annotator model.
  independent = synthetic.RelabelledSource(records, 2.0, seed=0, image_size=128)
  built = synthetic.generate(0, 'train', 5, ambiguity=2.0, image_size=128)
  np.testing.assert_allclose(independent[5]['landmarks'], built.landmarks, atol=2e-3)
  assert independent.annotator(5) is None
  with pytest.raises(ValueError, match='relabel model'):
    synthetic.RelabelledSource(records, 1.0, seed=0, image_size=128, model='crowd')
  with pytest.raises(ValueError, match='bias share'):
    synthetic.RelabelledSource(records, 1.0, seed=0, image_size=128, model='annotators', bias_share=1.5)
