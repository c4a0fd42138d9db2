#!/usr/bin/env bash
# The GPU device check: one command that installs what the GPU machine lacks, runs the GPU tests and
# the GPU benchmarks (ours and the official PyTorch code side by side) and writes one JSON and one log.
#
#   scripts/device_check.sh OUTDIR
#
# Writes OUTDIR/device_check.json (the summary: stages, test results, every benchmark row, the
# headline numbers) and OUTDIR/device_check.log (everything printed). docs/gpu.md says what it
# measures and how to run it on the GPU machine (with .whl/ and .official/ carried along:
# scripts/fetch_device_wheels.sh fills both).
#
# Stages, in order, each in its own processes with a time limit, and each run whatever the ones
# before gave (a failed stage is recorded, not fatal):
#   machine     nvidia-smi, Python and package versions
#   install     carried wheels (.whl/) into a --target folder put on PYTHONPATH (no network), then the
#               project itself there (setuptools >= 77 needed: the carried .whl/build/ one if the
#               machine's is older; symbolic links as the last resort)
#   selection   what a star_jax process selects on this machine: backend, CPU tuning (none on a GPU),
#               the CPU-only convolution VJP (not on a GPU), the kernels a residual block compiles to
#   tests       the `gpu`-marked tests (GPU against CPU, training steps, checkpoint and resume) and the
#               backend-selection and mixed-precision tests
#   train_f32   scripts/benchmark.py train: our full WFLW step, batch 32, float32, in turns with the
#               official PyTorch step on the same GPU (anomaly detection off and on)
#   train_bf16  the same with bfloat16 compute (float32 parameters)
#   data        the Grain input pipeline with 0 / 4 / 8 / 15 worker processes
#   loss        the STAR loss, ours and the official
#   model       the full network's forward and forward + backward, batch 32, and the official forward
#   summary     scripts/device_check.py summarize: the JSON and a table at the end of the log
#
# Environment:
#   PYTHON                  the interpreter (default python3: on the GPU machine, the one with PyTorch)
#   DEVICE_CHECK_DRY_RUN    1: a dry run on a machine without a GPU (small shapes, a second CPU device
#                           standing in for the GPU in the tests); default: 1 unless nvidia-smi sees a GPU
#   DEVICE_CHECK_BUDGET_S   seconds for all stages (default 540 on a GPU, 5400 in a dry run); a stage
#                           gets at most what is left, less 20 s kept for the summary
#   DEVICE_WHEELS           the wheel folder (default .whl); DEVICE_OFFICIAL: the official checkout
#                           (default .official); DEVICE_CHECK_WORK: scratch folder (default /tmp/device_check)
set -uo pipefail

OUT_DIR=${1:?usage: scripts/device_check.sh OUTDIR}
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
WORK=${DEVICE_CHECK_WORK:-/tmp/device_check}
WHEELS=${DEVICE_WHEELS:-$REPO/.whl}
OFFICIAL=${DEVICE_OFFICIAL:-$REPO/.official}
LOG=$OUT_DIR/device_check.log
SITE=$WORK/site
export REPO PY WORK WHEELS OFFICIAL SITE
rm -rf "$WORK"
mkdir -p "$WORK"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1

if [ -z "${DEVICE_CHECK_DRY_RUN:-}" ]; then
  if nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then DEVICE_CHECK_DRY_RUN=0; else DEVICE_CHECK_DRY_RUN=1; fi
fi
DRY=$DEVICE_CHECK_DRY_RUN
if [ "$DRY" = 1 ]; then BUDGET=${DEVICE_CHECK_BUDGET_S:-5400}; else BUDGET=${DEVICE_CHECK_BUDGET_S:-540}; fi
START=$(date +%s)
echo "device check: $(date -u +%FT%TZ), repo $REPO at $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo '?'),"\
  "dry run $DRY, budget ${BUDGET} s, python $PY, work $WORK"

remaining() { echo $(( BUDGET - ($(date +%s) - START) - 20 )); }

# stage NAME MAX_SECONDS COMMAND...: runs COMMAND with a limit of min(MAX_SECONDS, what is left),
# records {name, status, rc, seconds, limit} in $WORK/stages.jsonl.
stage() {
  local name=$1 cap=$2; shift 2
  local left limit t0 rc status note=""
  left=$(remaining)
  limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 15 ]; then
    echo "==== [$name] skipped: ${left} s of the budget left"
    printf '{"name": "%s", "status": "skipped", "rc": null, "seconds": 0, "limit": %d, "note": "time budget"}\n' \
      "$name" "$limit" >> "$WORK/stages.jsonl"
    return 0
  fi
  echo "==== [$name] $(date -u +%T), limit ${limit} s: $*"
  t0=$(date +%s%N)
  # A new process group under timeout: at the limit every process the stage started is ended.
  timeout -k 15 "$limit" bash -c '"$@"' stage "$@"
  rc=$?
  local ms secs
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  secs=$(printf '%d.%03d' $(( ms / 1000 )) $(( ms % 1000 )))
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; note="stopped at its ${limit} s limit" ;;
    *) status=failed ;;
  esac
  echo "==== [$name] $status (rc $rc) after ${secs} s"
  printf '{"name": "%s", "status": "%s", "rc": %d, "seconds": %s, "limit": %d, "note": "%s"}\n' \
    "$name" "$status" "$rc" "$secs" "$limit" "$note" >> "$WORK/stages.jsonl"
  return 0
}

# ---- machine ------------------------------------------------------------------------------------------
machine() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.draw,temperature.gpu \
    --format=csv 2>/dev/null || echo "nvidia-smi: no GPU"
  "$PY" - "$WORK/machine.json" <<'EOF'
import importlib.metadata as md, json, os, platform, subprocess, sys
names = ['jax', 'jaxlib', 'jax-cuda13-plugin', 'jax-cuda13-pjrt', 'jax-cuda12-plugin', 'flax', 'optax', 'orbax-checkpoint',
         'chex', 'numpy', 'scipy', 'protobuf', 'etils', 'setuptools', 'pip', 'torch', 'opencv-python-headless', 'absl-py',
         'pyarrow', 'psutil', 'tensorflow-datasets', 'grain', 'array-record', 'ml-collections', 'tensorboardX']
versions = {}
for n in names:
  try:
    versions[n] = md.version(n)
  except md.PackageNotFoundError:
    versions[n] = None
try:
  gpu = subprocess.run(['nvidia-smi', '--query-gpu=name,driver_version,memory.total', '--format=csv,noheader'],
                       capture_output=True, text=True, timeout=30).stdout.strip()
except (OSError, subprocess.SubprocessError):
  gpu = ''
info = {'python': sys.version.split()[0], 'executable': sys.executable, 'machine': platform.machine(),
        'cpu_count': os.cpu_count(), 'gpu': gpu, 'versions_before_install': versions}
json.dump(info, open(sys.argv[1], 'w'), indent=1)
print(json.dumps(info, indent=1))
EOF
}
export -f machine
stage machine 60 machine

# ---- install ------------------------------------------------------------------------------------------
install() {
  mkdir -p "$SITE"
  if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS ($(du -sh "$WHEELS" | cut -f1)) into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "$WHEELS"/*.whl || return 1
  else
    echo "no wheels in $WHEELS: installing none (the packages must be there already)"
  fi
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  # The project: a regular (non-editable) install into the same folder, which maps datasets/ and
  # configs/ to star_jax_datasets and star_jax_configs as pyproject.toml says.
  local tools=""
  if ! "$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 77)' 2>/dev/null; then
    echo "setuptools here: $("$PY" -c 'import setuptools; print(setuptools.__version__)' 2>/dev/null || echo none)"\
      "(< 77): using the carried one for the build"
    tools=$WORK/buildtools
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$tools" "$WHEELS"/build/setuptools-*.whl || tools=""
  fi
  if ! PYTHONPATH=${tools:+$tools:}$PYTHONPATH "$PY" -m pip install -q --no-index --no-deps --no-build-isolation \
      --no-compile --target "$SITE" "$REPO"; then
    echo "pip could not install the project: linking its packages into $SITE instead"
    ln -sfn "$REPO/star_jax" "$SITE/star_jax"
    ln -sfn "$REPO/datasets" "$SITE/star_jax_datasets"
    ln -sfn "$REPO/configs" "$SITE/star_jax_configs"
  fi
  rm -rf "$REPO/build"
  echo "PYTHONPATH=$PYTHONPATH"
  # Everything star_jax imports, from a folder outside the checkout (so the installed copy is found).
  (cd "$WORK" && "$PY" - <<'EOF'
import importlib, sys
missing = []
for name in ['star_jax', 'star_jax_datasets', 'star_jax_configs', 'tensorflow_datasets', 'grain', 'array_record',
             'ml_collections', 'tensorboardX', 'importlib_resources', 'tree', 'jax', 'flax', 'optax', 'orbax.checkpoint',
             'cv2', 'h5py', 'matplotlib', 'tqdm', 'PIL', 'scipy', 'chex', 'pytest']:
  try:
    m = importlib.import_module(name)
    print(f"  {name:22s} {getattr(m, '__version__', '')} {getattr(m, '__file__', '')}")
  except Exception as e:  # pylint: disable=broad-except
    missing.append(name)
    print(f'  {name:22s} FAILED: {type(e).__name__}: {e}')
from star_jax import config_lib
print('  configs/wflw.py ->', config_lib.resolve_config_path('configs/wflw.py'))
# TFDS logs (and swallows) some of its import errors: touch what star_jax uses of it.
import tensorflow_datasets as tfds
from star_jax.data import build
print('  tfds', tfds.__version__, 'builders:', [build.builder_class(n).__name__ for n in ('wflw', 'synthetic_faces')])
sys.exit(1 if missing else 0)
EOF
  )
}
export -f install
stage install 120 install
# The stage ran in its own process: the stages that follow get the folder on PYTHONPATH here.
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

# ---- what this machine selects --------------------------------------------------------------------------
stage selection 120 "$PY" scripts/device_check.py selection "$WORK/selection.json"

# ---- tests ------------------------------------------------------------------------------------------------
TESTS=(tests/test_gpu.py tests/models/test_mixed_precision.py tests/test_cpu_tuning.py
       "tests/models/test_model.py::test_cpu_only_convolution_gradient_is_chosen_on_the_cpu_alone")
if [ "$DRY" = 1 ]; then
  # A second CPU device stands in for the GPU (tests/test_gpu.py).
  stage tests 3000 env DEVICE_CHECK_DRY_RUN=1 XLA_FLAGS=--xla_force_host_platform_device_count=2 \
    STAR_JAX_TEST_CACHE="$WORK/jax_cache" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
    --junitxml="$WORK/pytest.xml" "${TESTS[@]}"
else
  # Both backends in one process; each process allocates GPU memory as it goes (the tests start
  # training subprocesses beside the pytest process).
  stage tests 180 env JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_PREALLOCATE=false \
    STAR_JAX_TEST_CACHE="$WORK/jax_cache" "$PY" -m pytest -q -p no:cacheprovider -rfEs \
    --junitxml="$WORK/pytest.xml" "${TESTS[@]}"
fi

# ---- benchmarks ---------------------------------------------------------------------------------------------
if [ -d "$OFFICIAL/lib" ]; then OFF=(--official "$OFFICIAL"); else OFF=(); echo "no official code in $OFFICIAL"; fi
if [ "$DRY" = 1 ]; then
  SHAPE=(--small --batch 4 --repeats 2)
  WORKERS=0,1,2
  DATA_REPEATS=3
else
  SHAPE=(--batch 32 --repeats 6)
  WORKERS=0,4,8,15
  DATA_REPEATS=5
  # Half the GPU's memory for JAX (the official PyTorch step shares the GPU, in its own process).
  export XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
fi
bench() {  # bench NAME SECTION ARGS...
  local name=$1 section=$2; shift 2
  (cd "$WORK" && "$PY" "$REPO/scripts/benchmark.py" "$section" --json "$WORK/bench_$name.json" "$@")
}
export -f bench
stage train_f32 180 bench train_f32 train "${SHAPE[@]}" --dtypes float32 "${OFF[@]}"
stage train_bf16 120 bench train_bf16 train "${SHAPE[@]}" --dtypes bfloat16
stage data 100 bench data data --workers "$WORKERS" --repeats "$DATA_REPEATS"
stage loss 45 bench loss loss "${OFF[@]}"
stage model 150 bench model model "${SHAPE[@]}" --dtypes float32 "${OFF[@]}"

# ---- summary ------------------------------------------------------------------------------------------------
echo "==== [summary] $(( $(date +%s) - START )) s after the start"
"$PY" scripts/device_check.py summarize "$WORK" "$OUT_DIR/device_check.json" $([ "$DRY" = 1 ] && echo --dry-run)
echo "device check done in $(( $(date +%s) - START )) s: $OUT_DIR/device_check.json, $LOG"
