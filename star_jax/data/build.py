"""Builds the TFDS datasets of star_jax without TensorFlow, and opens them as random-access sources.

  python -m star_jax.data.build --dataset wflw --manual_dir ~/data/WFLW --data_dir ~/tensorflow_datasets
  python -m star_jax.data.build --dataset own_faces --config mydata --manual_dir ~/faces --layout 300W
      [--annotations labels.csv] [--train train.txt --test test.txt | --test_fraction 0.1 --split_seed 0]
  (either form) [--skip_bad_examples]

The `tfds build` command line needs TensorFlow and Apache Beam; this goes through the Python API
instead (`download_and_prepare` with a manual folder) and writes array_record files, which
`tfds.data_source` reads with no TensorFlow installed.

A malformed annotation or an unreadable image stops the build with an error naming the file and line;
--skip_bad_examples (config.data.skip_bad_examples for builds started by training) leaves such
examples out instead, and says how many and which (also in the dataset's metadata, 'skipped'). TFDS
writes into a temporary 'incomplete.*' folder and renames it when done, so an interrupted build leaves
no half dataset; the next build removes that folder and starts again. One build of a dataset runs
at a time (a lock file beside it).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import shlex
import shutil

from absl import flags
from absl import logging
import tensorflow_datasets as tfds

from star_jax import cli
from star_jax import files
from star_jax.data import synthetic
from star_jax.data.annotations import AnnotationError

# Registry: dataset name -> module holding its `Builder`; imported lazily, so that one missing or
# broken builder does not break the others.
BUILDERS = {
    'wflw': 'star_jax_datasets.wflw.wflw_dataset_builder',
    'the300w': 'star_jax_datasets.the300w.the300w_dataset_builder',
    'the300vw': 'star_jax_datasets.the300vw.the300vw_dataset_builder',
    'cofw': 'star_jax_datasets.cofw.cofw_dataset_builder',
    'synthetic_faces': 'star_jax_datasets.synthetic_faces.synthetic_faces_dataset_builder',
    'own_faces': 'star_jax_datasets.own_faces.own_faces_dataset_builder',
}


def builder_class(name: str) -> type:
  """The builder class registered as `name` in BUILDERS."""
  if name not in BUILDERS:
    raise ValueError(f'unknown dataset {name!r}; choose one of {sorted(BUILDERS)}')
  try:
    module = importlib.import_module(BUILDERS[name])
  except ImportError as e:
    raise ImportError(f'the builder of {name!r} ({BUILDERS[name]}) cannot be imported: {e}') from e
  return module.Builder


def needs_manual_download(name: str) -> bool:
  """Whether the dataset is built from files downloaded by hand."""
  return bool(getattr(builder_class(name), 'MANUAL_DOWNLOAD_INSTRUCTIONS', None))


def get_builder(name: str, *, config: str = '', data_dir: str = '', layout=None,
                options=None, skip_bad_examples: bool = False) -> tfds.core.DatasetBuilder:
  """The builder of `name` (and `config`; '' = default) writing array_record under `data_dir`.

  `data_dir` '' means TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets. `layout` (a layout
  name or file) and `options` (a mapping) are for builders whose build is described by them
  (own_faces: `config_from`); the others ignore them. skip_bad_examples: a build leaves out (and
  lists) malformed examples instead of stopping at the first.
  """
  cls = builder_class(name)
  kwargs = {'data_dir': os.path.expanduser(data_dir) if data_dir else None, 'file_format': 'array_record'}
  if skip_bad_examples:
    kwargs['skip_bad_examples'] = True
  if hasattr(cls, 'config_from'):
    kwargs['config'] = cls.config_from(config, layout=layout, options=options)
  elif config:
    # Builders that make configs from their names (synthetic_faces) resolve them here.
    kwargs['config'] = cls.config_for(config) if hasattr(cls, 'config_for') else config
  return cls(**kwargs)


def build_command(name: str, *, config: str = '', manual_dir: str = '', data_dir: str = '', layout=None,
                  options=None) -> str:
  """The command line that builds a dataset, for messages."""
  args = ['python', '-m', 'star_jax.data.build', '--dataset', name]
  if config:
    args += ['--config', config]
  args += ['--manual_dir', manual_dir or '/path/to/raw/files']
  if data_dir:
    args += ['--data_dir', data_dir]
  if hasattr(builder_class(name), 'config_from'):
    # A layout given as JSON text (from a checkpoint) stands for its file.
    args += ['--layout', '/path/to/layout.json' if str(layout).startswith('{') or layout is None else str(layout)]
    defaults = builder_class(name).OPTION_DEFAULTS
    for key, value in (options or {}).items():
      if key in defaults and value != defaults[key]:
        args += [f'--{key}', str(value)]
  return ' '.join(shlex.quote(a) if not a.startswith('/path/') else a for a in args)


def _check_options(builder, manual_dir: str) -> None:
  """For builders described by options (own_faces): an existing build must match them."""
  if builder.is_prepared() and hasattr(builder, 'check_options'):
    builder.check_options(manual_dir)


BUILD_LOCK = '.build_lock'


def prepare(builder: tfds.core.DatasetBuilder, manual_dir: str = '') -> None:
  """Builds `builder`'s dataset unless it is built already.

  One build per dataset at a time (a lock file in the dataset's folder; a second build stops with
  files.BusyError naming the first). The temporary folders of interrupted builds are removed first.
  """
  if builder.is_prepared():
    return
  variant = pathlib.Path(builder.data_path)  # <data_dir>/<name>/<config>/<version>
  variant.parent.mkdir(parents=True, exist_ok=True)
  with files.Lock.acquire(variant.parent, name=BUILD_LOCK, what='dataset'):
    if builder.is_prepared():  # built by another process while we waited for nothing
      return
    for stale in sorted(variant.parent.glob(f'incomplete.*_{variant.name}')):
      logging.warning('removing %s, left by an interrupted build of %s', stale, builder.name)
      shutil.rmtree(stale, ignore_errors=True)
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir or None))


def build(name: str, *, config: str = '', manual_dir: str = '', data_dir: str = '', layout=None,
          options=None, skip_bad_examples: bool = False) -> tfds.core.DatasetBuilder:
  """Builds a dataset (a no-op when it is already built) and returns its builder."""
  manual_dir = os.path.expanduser(manual_dir) if manual_dir else manual_dir  # '~' after '=' is not the shell's
  builder = get_builder(name, config=config, data_dir=data_dir, layout=layout, options=options,
                        skip_bad_examples=skip_bad_examples)
  _check_options(builder, manual_dir)
  prepare(builder, manual_dir)
  return builder


def skipped_examples(builder: tfds.core.DatasetBuilder) -> dict[str, dict]:
  """{split: {'count', 'examples'}} of the examples its build skipped ({} when it skipped none or was
  built without skip_bad_examples)."""
  metadata = builder.info.metadata or {}
  return {split: entry for split, entry in dict(metadata.get('skipped', {})).items() if entry.get('count')}


def _field(cfg, key: str, default=''):
  value = cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)
  return default if value is None else value


def _options(data_cfg):
  own = _field(data_cfg, 'own', None)
  if own is None:
    return None
  return own.to_dict() if hasattr(own, 'to_dict') else dict(own)


def load_source(data_cfg, split: str, *, build_if_missing: bool = True, layout=None):
  """The random-access source of one split, as `tfds.data_source` returns it.

  Args:
    data_cfg: a `config.data` of configs/base.py: `name`, `config`, `data_dir`, `manual_dir` (and
      `own`, the options of your own data, configs/own.py).
    split: a split name or slice, e.g. 'train', 'test[:16]', 'test_category1+test_category2'.
    build_if_missing: build a missing dataset when possible: always for the synthetic faces
      (generated), for the others when `manual_dir` is set.
    layout: config.layout, for datasets in the layout you choose (own_faces).

  Returns:
    A sequence of records (dicts of numpy arrays; 'image' decoded to (H, W, 3) uint8 RGB).

  Raises:
    FileNotFoundError: the dataset is not built and cannot be built here; the message gives the
      command that builds it.
  """
  name = _field(data_cfg, 'name')
  config, data_dir = _field(data_cfg, 'config'), _field(data_cfg, 'data_dir')
  manual_dir = os.path.expanduser(_field(data_cfg, 'manual_dir'))  # '~' after '=' is not the shell's
  builder = get_builder(name, config=config, data_dir=data_dir, layout=layout, options=_options(data_cfg),
                        skip_bad_examples=bool(_field(data_cfg, 'skip_bad_examples', False)))
  _check_options(builder, manual_dir)
  if not builder.is_prepared():
    manual = needs_manual_download(name)
    if build_if_missing and (manual_dir or not manual):
      logging.info('building %s into %s', name, builder.data_dir)
      prepare(builder, manual_dir)
    else:
      command = build_command(name, config=config, manual_dir=manual_dir, data_dir=data_dir, layout=layout,
                              options=_options(data_cfg))
      why = ('set data.manual_dir to the folder of the raw files to build it here, or build it with'
             if manual and build_if_missing else 'build it with')
      raise FileNotFoundError(f'dataset {name!r} is not built in {builder.data_dir}; {why}:\n'
                              f'  {command}')
  _warn_if_tsv_landmarks_missing(builder)
  # What tfds.data_source(name, split=..., data_dir=...) returns, without resolving the name again.
  source = builder.as_data_source(split=split)
  level = float(_field(data_cfg, 'relabel_ambiguity', -1.0))
  if level >= 0 and split == 'train':
    source = relabelled(source, builder, level, data_cfg)
  return source


# The builders whose records take a metadata file's landmarks along with its crop (star_jax/data/crop.py).
TSV_LANDMARK_BUILDERS = ('wflw', 'the300w', 'cofw')


def _warn_if_tsv_landmarks_missing(builder) -> bool:
  """Warns (and returns True) for a build that took its crop from official metadata files before the
  records took their landmarks too: its records hold the raw annotations' landmarks, not the official ones.
  Such builds record no 'landmarks' in their metadata."""
  if getattr(builder, 'name', None) not in TSV_LANDMARK_BUILDERS:   # the others take no landmarks from a TSV
    return False
  metadata = builder.info.metadata or {}
  official = [split for split, rule in dict(metadata.get('crop_rule') or {}).items() if rule == 'official_tsv']
  if not official or 'landmarks' in metadata:
    return False
  logging.warning('%s in %s was built from the official metadata files (%s) before builds took their landmarks '
                  'with the crop: its records hold the raw annotations\' landmarks, where the official code trains '
                  'and tests on the files\'. Delete that folder and build again to use them.', builder.name,
                  builder.data_dir, ', '.join(f'{s}.tsv' for s in official))
  return True


def relabelled(source, builder, level: float, data_cfg=None):
  """The synthetic train split `source` with its labels re-drawn at ambiguity `level` from its exact
  points (`synthetic.RelabelledSource`): one build serves every level of the ambiguity study. The
  noise model comes from `data_cfg` (`relabel_model` 'independent' | 'annotators', `annotators`,
  `annotator_bias`; absent fields: the builder's independent noise)."""
  if builder.name != 'synthetic_faces':
    raise ValueError(f'data.relabel_ambiguity is for the synthetic_faces dataset, not {builder.name!r}')
  cfg = builder.builder_config
  data_cfg = {} if data_cfg is None else data_cfg
  return synthetic.RelabelledSource(
      source, level, seed=cfg.seed, image_size=cfg.image_size,
      model=str(_field(data_cfg, 'relabel_model', 'independent')),
      annotators=int(_field(data_cfg, 'annotators', 5)),
      bias_share=float(_field(data_cfg, 'annotator_bias', synthetic.ANNOTATOR_BIAS_SHARE)))


def _build(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv)
  fv = command.fv
  flags.DEFINE_enum('dataset', None, sorted(BUILDERS), 'the dataset to build', flag_values=fv)
  flags.DEFINE_string('config', '', "builder config ('' = the default one)", flag_values=fv)
  flags.DEFINE_string('manual_dir', '', 'folder of the hand-downloaded raw files (not needed for '
                      'synthetic_faces)', flag_values=fv)
  flags.DEFINE_string('data_dir', '', 'TFDS data dir (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)',
                      flag_values=fv)
  # Your own data (own_faces) only.
  flags.DEFINE_string('layout', None, 'own_faces: the landmark layout, a built-in name (WFLW, 300W, COFW) or a '
                      'layout file', flag_values=fv)
  flags.DEFINE_string('annotations', None, "own_faces: a CSV / TSV annotation file (default: a .pts file "
                      "beside each image)", flag_values=fv)
  flags.DEFINE_string('train', None, 'own_faces: train images, a folder or a list file', flag_values=fv)
  flags.DEFINE_string('test', None, 'own_faces: test images, a folder or a list file', flag_values=fv)
  flags.DEFINE_float('test_fraction', None, 'own_faces: fraction of the images drawn for test when no folders '
                     'or lists are given (default 0.1)', flag_values=fv)
  flags.DEFINE_integer('split_seed', None, 'own_faces: seed of that draw (default 0)', flag_values=fv)
  flags.DEFINE_bool('skip_bad_examples', False, 'leave out examples with a malformed annotation or an '
                    'unreadable image (listed at the end and in the metadata) instead of stopping',
                    flag_values=fv)
  rest = command.parse()
  if rest:
    raise flags.Error(f'unexpected arguments: {" ".join(rest)}')
  command.require('dataset')
  cli.setup_logging()
  if needs_manual_download(fv.dataset) and not fv.manual_dir:
    raise flags.Error(f'--manual_dir is required for {fv.dataset}; the builder says:\n'
                      f'{builder_class(fv.dataset).MANUAL_DOWNLOAD_INSTRUCTIONS}')
  own = ('annotations', 'train', 'test', 'test_fraction', 'split_seed')
  options = {k: fv[k].value for k in own if fv[k].value is not None}
  described = hasattr(builder_class(fv.dataset), 'config_from')
  if not described and (options or fv.layout is not None):
    given = ', '.join(f'--{k}' for k in (*options, *(['layout'] if fv.layout is not None else [])))
    raise flags.Error(f'{given}: only for --dataset own_faces')
  if described and fv.layout is None:
    raise flags.Error(f'--layout is required for {fv.dataset} (WFLW, 300W, COFW or a layout file)')
  try:
    builder = build(fv.dataset, config=fv.config, manual_dir=fv.manual_dir, data_dir=fv.data_dir, layout=fv.layout,
                    options=options, skip_bad_examples=fv.skip_bad_examples)
  except AnnotationError as e:
    raise cli.UserError(f'{e}\n(--skip_bad_examples leaves such examples out and lists them)') from None
  except (ValueError, FileNotFoundError, files.BusyError) as e:
    raise cli.UserError(str(e)) from None
  splits = ', '.join(f'{k} {v.num_examples}' for k, v in sorted(builder.info.splits.items()))
  print(f'{builder.name}: wrote {splits} records to {os.path.abspath(builder.data_dir)}')
  crop_rule = builder.info.metadata.get('crop_rule') if builder.info.metadata else None
  if crop_rule:
    print(f'crop rule per split: {crop_rule}')
  for split, entry in skipped_examples(builder).items():
    listed = entry['examples']
    print(f'{split}: skipped {entry["count"]} bad examples:')
    for message in listed[:20]:
      print(f'  {message}')
    if entry['count'] > 20:
      print(f'  ... (all of them in {os.path.abspath(builder.data_dir)}/dataset_info.json, metadata "skipped")')
  return 0


def main(argv=None) -> int:
  return cli.guarded(_build, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
