"""Builds the TFDS datasets of star_jax without TensorFlow, and opens them as random-access sources.

  python -m star_jax.data.build --dataset wflw --manual_dir ~/data/WFLW --data_dir ~/tensorflow_datasets

The `tfds build` command line needs TensorFlow and Apache Beam; this goes through the Python API
instead (`download_and_prepare` with a manual folder) and writes array_record files, which
`tfds.data_source` reads with no TensorFlow installed.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

from absl import logging
import tensorflow_datasets as tfds

# Registry: dataset name -> module holding its `Builder`; imported lazily, so that one missing or
# broken builder does not break the others.
BUILDERS = {
    'wflw': 'star_jax_datasets.wflw.wflw_dataset_builder',
    'the300w': 'star_jax_datasets.the300w.the300w_dataset_builder',
    'cofw': 'star_jax_datasets.cofw.cofw_dataset_builder',
    'synthetic_faces': 'star_jax_datasets.synthetic_faces.synthetic_faces_dataset_builder',
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


def get_builder(name: str, *, config: str = '', data_dir: str = '') -> tfds.core.DatasetBuilder:
  """The builder of `name` (and `config`; '' = default) writing array_record under `data_dir`.

  `data_dir` '' means TFDS's default: $TFDS_DATA_DIR, else ~/tensorflow_datasets.
  """
  kwargs = {'data_dir': data_dir or None, 'file_format': 'array_record'}
  if config:
    kwargs['config'] = config
  return builder_class(name)(**kwargs)


def build_command(name: str, *, config: str = '', manual_dir: str = '', data_dir: str = '') -> str:
  """The command line that builds a dataset, for messages."""
  args = ['python', '-m', 'star_jax.data.build', '--dataset', name]
  if config:
    args += ['--config', config]
  args += ['--manual_dir', manual_dir or '/path/to/raw/files']
  if data_dir:
    args += ['--data_dir', data_dir]
  return ' '.join(shlex.quote(a) if not a.startswith('/path/') else a for a in args)


def build(name: str, *, config: str = '', manual_dir: str = '',
          data_dir: str = '') -> tfds.core.DatasetBuilder:
  """Builds a dataset (a no-op when it is already built) and returns its builder."""
  builder = get_builder(name, config=config, data_dir=data_dir)
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
  builder.download_and_prepare(download_config=download_config)
  return builder


def _field(cfg, key: str, default=''):
  value = cfg.get(key, default) if hasattr(cfg, 'get') else getattr(cfg, key, default)
  return default if value is None else value


def load_source(data_cfg, split: str, *, build_if_missing: bool = True):
  """The random-access source of one split, as `tfds.data_source` returns it.

  Args:
    data_cfg: a `config.data` of configs/base.py: `name`, `config`, `data_dir`, `manual_dir`.
    split: a split name or slice, e.g. 'train', 'test[:16]'.
    build_if_missing: build a missing dataset when possible: always for the synthetic faces
      (generated), for the others when `manual_dir` is set.

  Returns:
    A sequence of records (dicts of numpy arrays; 'image' decoded to (H, W, 3) uint8 RGB).

  Raises:
    FileNotFoundError: the dataset is not built and cannot be built here; the message gives the
      command that builds it.
  """
  name = _field(data_cfg, 'name')
  config, data_dir = _field(data_cfg, 'config'), _field(data_cfg, 'data_dir')
  manual_dir = _field(data_cfg, 'manual_dir')
  builder = get_builder(name, config=config, data_dir=data_dir)
  if not builder.is_prepared():
    manual = needs_manual_download(name)
    if build_if_missing and (manual_dir or not manual):
      logging.info('building %s into %s', name, builder.data_dir)
      download_config = tfds.download.DownloadConfig(manual_dir=manual_dir or None)
      builder.download_and_prepare(download_config=download_config)
    else:
      command = build_command(name, config=config, manual_dir=manual_dir, data_dir=data_dir)
      why = ('set data.manual_dir to the folder of the raw files to build it here, or build it with'
             if manual and build_if_missing else 'build it with')
      raise FileNotFoundError(f'dataset {name!r} is not built in {builder.data_dir}; {why}:\n'
                              f'  {command}')
  # What tfds.data_source(name, split=..., data_dir=...) returns, without resolving the name again.
  return builder.as_data_source(split=split)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m star_jax.data.build', description=__doc__.split('\n\n')[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dataset', required=True, choices=sorted(BUILDERS))
  parser.add_argument('--config', default='', help="builder config ('' = the default one)")
  parser.add_argument('--manual_dir', default='',
                      help='folder of the hand-downloaded raw files (not needed for synthetic_faces)')
  parser.add_argument('--data_dir', default='',
                      help='TFDS data dir (default: $TFDS_DATA_DIR, else ~/tensorflow_datasets)')
  args = parser.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  if needs_manual_download(args.dataset) and not args.manual_dir:
    parser.error(f'--manual_dir is required for {args.dataset}; the builder says:\n'
                 f'{builder_class(args.dataset).MANUAL_DOWNLOAD_INSTRUCTIONS}')
  builder = build(args.dataset, config=args.config, manual_dir=args.manual_dir,
                  data_dir=args.data_dir)
  splits = ', '.join(f'{k} {v.num_examples}' for k, v in sorted(builder.info.splits.items()))
  print(f'{builder.name}: wrote {splits} records to {os.path.abspath(builder.data_dir)}')
  crop_rule = builder.info.metadata.get('crop_rule') if builder.info.metadata else None
  if crop_rule:
    print(f'crop rule per split: {crop_rule}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
