#!/usr/bin/env bash
# Fills a wheel folder (default .whl/, ignored by git) with the Python packages that star_jax needs and
# the GPU machine's image lacks, for scripts/device_check.sh to install there with no network.
#
#   scripts/fetch_device_wheels.sh [--python-version 3.12] [--dest .whl] [--official PATH]
#
# --official PATH also copies the official PyTorch code (a checkout of ZhenglinZhou/STAR: its lib/ and
# conf/, ~1 MB) into .official/ (ignored by git), where the device check looks for it.
#
# The GPU machine (docs/gpu.md) has Python 3.12 with jax, flax, optax, orbax-checkpoint, chex, numpy,
# scipy, opencv-python-headless, h5py, matplotlib, pillow, tqdm, absl-py, etils, protobuf, pyarrow,
# psutil, requests, wrapt, attrs, cloudpickle, pyyaml, pytest and PyTorch; not the input pipeline's
# packages (TFDS, Grain, ArrayRecord and what they need) nor ml-collections, tensorboardX and
# importlib_resources. Each is pinned to the version this project is tested with. The wheels are
# binary wheels for CPython (--python-version) on manylinux x86-64; a package published only as a
# source archive (promise) is built here into a pure-Python wheel, which installs on any Python 3.
#
# setuptools (>= 77, for installing the project itself: pyproject.toml's licence field) goes to
# DEST/build/, apart from the packages, so that it never shadows the machine's own setuptools; the
# device check installs it only when the machine's is too old.
#
# --python-version 3.11 (this machine's Python) fetches the same set for a dry run here:
#   scripts/fetch_device_wheels.sh --python-version 3.11 --dest /tmp/whl311
set -euo pipefail

PYTHON_VERSION=3.12
DEST=.whl
OFFICIAL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) PYTHON_VERSION=$2; shift 2 ;;
    --dest) DEST=$2; shift 2 ;;
    --official) OFFICIAL=$2; shift 2 ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

# name==version, one per line: what star_jax's pyproject.toml needs beyond the machine's image, with
# everything those need in turn (pip's --no-deps: each is named here).
PACKAGES="
tensorflow-datasets==4.9.10
array-record==0.8.6
grain==0.2.18
ml-collections==1.1.0
tensorboardX==2.6.5
importlib-resources==7.1.0
dm-tree==0.1.10
simple-parsing==0.1.9
docstring-parser==0.18.0
tensorflow-metadata==1.21.0
googleapis-common-protos==1.76.0
immutabledict==4.3.1
termcolor==3.3.0
toml==0.10.2
portpicker==1.6.0
"
# Published as source only: built into a pure-Python wheel here.
SOURCE_ONLY="
promise==2.3
"
BUILD_TOOLS="
setuptools==84.2.1
"

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
           --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
PY=${PYTHON:-python3}

mkdir -p "$DEST/build"
download() {  # download DIR SPEC
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    "${PLATFORMS[@]}" -d "$1" "$2"
}
for spec in $PACKAGES; do
  download "$DEST" "$spec"
done
for spec in $BUILD_TOOLS; do
  download "$DEST/build" "$spec"
done
for spec in $SOURCE_ONLY; do
  name=${spec%%==*}
  if ! ls "$DEST"/"${name//-/_}"-*.whl >/dev/null 2>&1; then
    "$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$DEST" "$spec"
  fi
done

# One version of each package: two wheels of one name stop the whole install there.
dupes=$(ls "$DEST"/*.whl | xargs -n1 basename | cut -d- -f1 | tr 'A-Z-' 'a-z_' | sort | uniq -d)
if [ -n "$dupes" ]; then
  echo "error: several versions in $DEST of: $dupes (remove the old ones)" >&2
  exit 1
fi
count=$(ls "$DEST"/*.whl "$DEST"/build/*.whl | wc -l)
echo "$count wheels in $DEST for CPython $PYTHON_VERSION, $(du -sh "$DEST" | cut -f1) in all:"
ls -l "$DEST"/*.whl "$DEST"/build/*.whl | awk '{printf "  %8.0f KiB  %s\n", $5 / 1024, $NF}'

if [ -n "$OFFICIAL" ]; then
  if [ ! -f "$OFFICIAL/lib/loss/starLoss_v2.py" ]; then
    echo "error: $OFFICIAL is not a checkout of the official STAR code" >&2
    exit 1
  fi
  rm -rf .official
  mkdir -p .official
  cp -r "$OFFICIAL/lib" "$OFFICIAL/conf" .official/
  find .official -name __pycache__ -prune -exec rm -rf {} +
  echo "official code: .official ($(du -sh .official | cut -f1)) from $OFFICIAL"
fi
