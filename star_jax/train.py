"""Train STAR: `python -m star_jax.train --config configs/synthetic.py --workdir runs/synthetic`.

The config file is an ml_collections file (`configs/*.py`, optionally `file.py:arg`), overridable
from the command line: `--config.batch_size=64 --config.model.dtype=bfloat16`. The run resumes from
the latest checkpoint in --workdir. For several processes (hosts), start one per host with
--coordinator, --num_processes and --process_id (or rely on the cluster's auto-detection,
see scripts/launch_multihost.sh).
"""

import logging as std_logging
import pathlib

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_DEFAULT_CONFIG = _PACKAGE_DIR.parent / 'configs' / 'synthetic.py'

config_flags.DEFINE_config_file('config', str(_DEFAULT_CONFIG), 'Experiment config file.',
                                lock_config=True)
flags.DEFINE_string('workdir', 'runs/synthetic', 'Where checkpoints, metrics and the config go.')
flags.DEFINE_string('coordinator', None, 'host:port of process 0, for multi-process training.')
flags.DEFINE_integer('num_processes', None, 'Number of processes, for multi-process training.')
flags.DEFINE_integer('process_id', None, 'This process, for multi-process training.')
flags.DEFINE_bool('distributed', False, 'Call jax.distributed.initialize() with auto-detection '
                  '(SLURM, Open MPI, Kubernetes, Cloud TPU).')
flags.DEFINE_string('cpu_collectives', None, "CPU cross-process collectives ('gloo'), for CPU clusters.")


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top  (after flag parsing: distributed init comes first)
  if flags.FLAGS.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', flags.FLAGS.cpu_collectives)
  if flags.FLAGS.coordinator:
    jax.distributed.initialize(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id)
  elif flags.FLAGS.distributed:
    jax.distributed.initialize()
  from star_jax import trainer  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.INFO)
  # Our own progress at INFO; libraries (Orbax logs every file it writes) only from WARNING up.
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= std_logging.WARNING or record.pathname.startswith(str(_PACKAGE_DIR)))
  trainer.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  from star_jax import cpu_tuning  # pylint: disable=g-import-not-at-top
  cpu_tuning.reexec_with_malloc_tuning()   # huge pages for XLA's per-step buffers (CPU ~20% faster)
  app.run(main)
