#!/usr/bin/env bash
# Multi-host GPU training with star_jax: one process per host, all GPUs of a host in that process.
#
# SLURM (jax.distributed auto-detects the coordinator, process count and id):
#   sbatch --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 scripts/launch_multihost.sh configs/wflw.py runs/wflw
#
# Without a scheduler, run this on every host with the same COORDINATOR (host:port of host 0),
# NUM_PROCESSES and a distinct PROCESS_ID:
#   COORDINATOR=10.0.0.1:12345 NUM_PROCESSES=4 PROCESS_ID=0 scripts/launch_multihost.sh configs/wflw.py runs/wflw
#
# The global batch (config.batch_size) is split over all GPUs of all hosts; the workdir must be on a
# file system every host sees (checkpoints are written collectively by Orbax).
set -euo pipefail
CONFIG=${1:?usage: launch_multihost.sh CONFIG WORKDIR [extra flags]}
WORKDIR=${2:?usage: launch_multihost.sh CONFIG WORKDIR [extra flags]}
shift 2

if [[ -n "${COORDINATOR:-}" ]]; then
  DIST=(--coordinator="$COORDINATOR" --num_processes="$NUM_PROCESSES" --process_id="$PROCESS_ID")
else
  DIST=(--distributed)   # SLURM / Open MPI / Kubernetes auto-detection
fi

CMD=(python -m star_jax.train --config "$CONFIG" --workdir "$WORKDIR" "${DIST[@]}" "$@")
if [[ -n "${SLURM_JOB_ID:-}" && -z "${COORDINATOR:-}" ]]; then
  exec srun "${CMD[@]}"
fi
exec "${CMD[@]}"
