"""synthetic_faces: procedurally drawn faces with exact landmarks and controllable label ambiguity.

No download: every record is drawn by star_jax.data.synthetic (numpy + OpenCV) while building.
Build with the Python API (no TensorFlow needed):

  python -m star_jax.data.build --dataset synthetic_faces --config wflw98_amb4

or `Builder(config='wflw98', data_dir=...).download_and_prepare()`, then read with
`tfds.data_source('synthetic_faces/wflw98', data_dir=...)`.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import tensorflow_datasets as tfds

from star_jax import layouts
from star_jax.data import crop
from star_jax.data import synthetic
from star_jax_datasets import common

@dataclasses.dataclass(eq=False)
class SyntheticFacesConfig(tfds.core.BuilderConfig):
  """One synthetic dataset: its layout, label ambiguity and size.

  Attributes:
    layout: 'WFLW' (98 points), '300W' (68) or 'COFW' (29).
    ambiguity: level of the tangential noise on the *train* labels (0 = exact); test labels are exact.
    num_train, num_test: split sizes.
    seed: sample i of split s is a pure function of (seed, s, i); configs with the same seed share
      their images and exact points, whatever their layout or ambiguity.
    image_size: side of the square images.
    image_format: 'jpeg' (quality 95) or 'png'.
  """
  layout: str = 'WFLW'
  ambiguity: float = 1.0
  num_train: int = 3000
  num_test: int = 500
  seed: int = 0
  image_size: int = 256
  image_format: str = 'jpeg'


# Configs beyond the registered ones, by name: 98 points at ambiguity A, N train / M test faces of
# S px (the last two parts optional, default 3000 x 500 and 256 px), e.g. 'wflw98_amb0_3000x500_128px'.
_CUSTOM_NAME = re.compile(r'^wflw98_amb(?P<ambiguity>\d+(?:\.\d+)?)(?:_(?P<train>\d+)x(?P<test>\d+))?'
                          r'(?:_(?P<size>\d+)px)?$')


def _config(name: str, layout: str, ambiguity: float, what: str) -> SyntheticFacesConfig:
  return SyntheticFacesConfig(
      name=name, layout=layout, ambiguity=ambiguity,
      description=f'{what}; train labels with tangential ambiguity level {ambiguity:g}, exact test labels.')


class Builder(tfds.core.GeneratorBasedBuilder):
  """Synthetic faces in the record contract of star_jax (see star_jax_datasets/common.py).

  Extra feature: 'clean_landmarks' (N, 2) float32, the exact points (equal to 'landmarks' on 'test').
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      _config('wflw98', 'WFLW', 1.0, '98 points (WFLW layout); the same data as wflw98_amb1'),
      _config('wflw98_amb0', 'WFLW', 0.0, '98 points, exact train labels'),
      _config('wflw98_amb1', 'WFLW', 1.0, '98 points'),
      _config('wflw98_amb2', 'WFLW', 2.0, '98 points'),
      _config('wflw98_amb4', 'WFLW', 4.0, '98 points'),
      _config('300w68', '300W', 1.0, '68 points (300W layout), a subset of the 98'),
      _config('cofw29', 'COFW', 1.0, '29 points (COFW layout), a subset of the 98'),
      # For smoke tests and CI: builds in about a second.
      dataclasses.replace(_config('wflw98_tiny', 'WFLW', 1.0, '98 points, 32 train / 16 test faces'),
                          num_train=32, num_test=16),
  ]
  DEFAULT_CONFIG_NAME = 'wflw98'

  @classmethod
  def config_for(cls, name: str) -> str | SyntheticFacesConfig:
    """The `config` argument for a config name: a registered name as it is, or a new config for a
    name 'wflw98_amb<level>[_<train>x<test>][_<size>px]'; ValueError for anything else."""
    if not name or name in {c.name for c in cls.BUILDER_CONFIGS}:
      return name
    match = _CUSTOM_NAME.match(name)
    if match is None:
      raise ValueError(f'unknown synthetic_faces config {name!r}: use one of '
                       f'{sorted(c.name for c in cls.BUILDER_CONFIGS)} or wflw98_amb<level>[_<train>x<test>]'
                       '[_<size>px], e.g. wflw98_amb0_3000x500_128px')
    g = match.groupdict()
    config = _config(name, 'WFLW', float(g['ambiguity']), '98 points')
    return dataclasses.replace(config, num_train=int(g['train'] or 3000), num_test=int(g['test'] or 500),
                               image_size=int(g['size'] or 256))

  def __init__(self, *, file_format=None, skip_bad_examples: bool = False, **kwargs):
    # array_record by default: `tfds.data_source` reads it without TensorFlow. skip_bad_examples is
    # accepted as by the other builders; generated examples are never bad.
    del skip_bad_examples
    super().__init__(file_format=file_format or 'array_record', **kwargs)

  @property
  def _layout(self) -> layouts.Layout:
    return layouts.get_layout(self.builder_config.layout)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    layout = self._layout
    if cfg.image_format not in ('jpeg', 'png'):
      raise ValueError(f"config {cfg.name}: image_format must be 'jpeg' or 'png', got {cfg.image_format!r}")
    if cfg.ambiguity < 0 or cfg.num_train < 0 or cfg.num_test < 0:
      raise ValueError(f'config {cfg.name}: ambiguity and split sizes must be >= 0')
    n = layout.num_points
    return self.dataset_info_from_configs(
        features=common.face_features(layout, {
            'clean_landmarks': tfds.features.Tensor(shape=(n, 2), dtype=np.float32)}),
        homepage='https://github.com/ZhenglinZhou/STAR',
        # Record i of a split is sample i of the generator (the samples are i.i.d. anyway).
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            layout=layout.name,
            num_points=n,
            ambiguity=float(cfg.ambiguity),
            ambiguity_fraction_of_iod=dict(synthetic.AMBIGUITY_FRACTION),
            box_rule=('box = the exact 98-point landmark box (every layout); '
                      'scale = min(w, h) / 200 * 1.05, center = box centre'),
            crop_rule={'train': crop.BOX_RULE, 'test': crop.BOX_RULE},
            point_map_from_wflw98=synthetic.point_map(layout.name).tolist(),
            seed=int(cfg.seed),
            image_size=int(cfg.image_size),
            image_format=cfg.image_format,
            attributes=list(layout.attributes),
        ),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {'train': self._generate_examples('train', cfg.num_train),
            'test': self._generate_examples('test', cfg.num_test)}

  def _generate_examples(self, split: str, count: int):
    cfg = self.builder_config
    for i in range(count):
      s = synthetic.generate(cfg.seed, split, i, layout=self._layout.name, ambiguity=cfg.ambiguity,
                             image_size=cfg.image_size)
      yield i, common.face_record(
          image=synthetic.encode_image(s.image, cfg.image_format), landmarks=s.landmarks, box=s.box,
          scale=s.scale, center=s.center, attributes=s.attributes, image_name=s.name,
          clean_landmarks=s.clean_landmarks)
