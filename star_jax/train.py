"""Train STAR: `python -m star_jax.train --config configs/synthetic.py --workdir runs/synthetic`.

The config file is an ml_collections file (`configs/*.py`, optionally `file.py:arg`), overridable
from the command line: `--config.batch_size=64 --config.model.dtype=bfloat16`. The run resumes from
the latest checkpoint in --workdir. For several processes (hosts), start one per host with
--coordinator, --num_processes and --process_id (or rely on the cluster's auto-detection with
--distributed, see scripts/launch_multihost.sh).

One run writes a workdir at a time (a second one stops at once). A resumed run refuses a config that
changes results (see star_jax/training/workdir.py, FREE_KEYS, for the fields that may change) unless
--allow_config_change is given; the change is then recorded in <workdir>/config_changes.jsonl.
"""

from __future__ import annotations

from absl import flags

from star_jax import cli

DEFAULT_CONFIG = 'configs/synthetic.py'


def _train(argv: list[str]) -> int:
  command = cli.Command(__doc__, argv, config=DEFAULT_CONFIG)
  fv = command.fv
  flags.DEFINE_string('workdir', 'runs/synthetic', 'where checkpoints, metrics and the config go', flag_values=fv)
  flags.DEFINE_string('coordinator', None, 'host:port of process 0, for multi-process training', flag_values=fv)
  flags.DEFINE_integer('num_processes', None, 'number of processes, for multi-process training', flag_values=fv)
  flags.DEFINE_integer('process_id', None, 'this process, for multi-process training', flag_values=fv)
  flags.DEFINE_bool('distributed', False, 'call jax.distributed.initialize() with auto-detection '
                    '(SLURM, Open MPI, Kubernetes, Cloud TPU)', flag_values=fv)
  flags.DEFINE_string('cpu_collectives', None, "CPU cross-process collectives ('gloo'), for CPU clusters",
                      flag_values=fv)
  flags.DEFINE_bool('allow_config_change', False, 'resume even when the config differs from the '
                    "checkpoint's in fields that change results (recorded in <workdir>/config_changes.jsonl)",
                    flag_values=fv)
  rest = command.parse()
  if rest:
    raise flags.Error(f'unexpected arguments: {" ".join(rest)}')

  import jax  # pylint: disable=import-outside-toplevel  (after flag parsing: --help stays fast)
  if fv.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', fv.cpu_collectives)
  if fv.coordinator:
    jax.distributed.initialize(fv.coordinator, fv.num_processes, fv.process_id)
  elif fv.distributed:
    jax.distributed.initialize()
  # pylint: disable=import-outside-toplevel
  from star_jax.data.annotations import AnnotationError
  from star_jax.data.pipeline import BadRecordError
  from star_jax.training import checkpoints
  from star_jax.training import loop
  from star_jax.training import workdir
  # pylint: enable=import-outside-toplevel
  cli.setup_logging()
  try:
    loop.train_and_evaluate(command.config, fv.workdir, allow_config_change=fv.allow_config_change)
  except (workdir.WorkdirError, checkpoints.CheckpointError, loop.NonFiniteLossError, BadRecordError,
          AnnotationError, FileNotFoundError) as e:
    # Problems the user can act on: one message, no traceback (the log above says what happened).
    raise cli.UserError(str(e)) from None
  return 0


def main(argv=None) -> int:
  return cli.guarded(_train, argv, __doc__)


if __name__ == '__main__':
  cli.run(main)
