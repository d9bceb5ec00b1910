#!/usr/bin/env bash
# The wheels the GPU machine lacks (../shared/GPU.md), for benchmarks/gpu_check.sh to install there:
# cp312 manylinux binaries of what it cannot download, deepspeed built here (it publishes only an
# sdist; it is pure Python), and this project as a wheel. Versions are the ones this virtualenv runs,
# so the GPU machine tests the same code.
#
#   benchmarks/gpu_wheels.sh [DIR]          # default ./gpu-wheels; then WHEELS=DIR benchmarks/gpu_check.sh there
#   WITHOUT="ray wandb" benchmarks/gpu_wheels.sh   # leave out packages the GPU check does not import
#
# ray's wheel alone is ~70 MB: the device tool carries at most 64 MiB, and neither the gpu tests nor
# the throughput benchmark import ray or wandb (tracking is disabled there), so WITHOUT="ray wandb"
# is what fits.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/gpu-wheels}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=$(command -v python3)
"$PY" -c "import deepspeed" 2>/dev/null || { echo "[wheels] $PY has no deepspeed: set PYTHON= to the project's virtualenv python" >&2; exit 2; }
WITHOUT=${WITHOUT:-}
BINARY=(ray wandb hjson pydantic pydantic-core annotated-types typing-inspection)
# small ones the GPU machine may lack too (deepspeed's and pytest's own requirements, and ours):
# gpu_check.sh installs a wheel only where the machine has no such distribution, so extras are harmless
EXTRA=(${EXTRA:-pytest pluggy iniconfig einops msgpack py-cpuinfo ninja psutil tqdm zstandard pyyaml safetensors})

version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
skipped() { [[ " $WITHOUT " == *" $1 "* ]]; }

mkdir -p "$DIR"
echo "[wheels] into $DIR (python: $PY)"
download() {  # NAME VERSION
  echo "[wheels] $1==$2 (cp312, manylinux)"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
    --dest "$DIR" "$1==$2"
}
for name in "${BINARY[@]}"; do
  if skipped "$name"; then echo "[wheels] $name: left out (WITHOUT)"; continue; fi
  download "$name" "$(version "$name")"  # required: fails here when this Python lacks it
done
for name in "${EXTRA[@]}"; do
  if skipped "$name"; then echo "[wheels] $name: left out (WITHOUT)"; continue; fi
  ver=$(version "$name" 2>/dev/null) || { echo "[wheels] $name: not installed here, left out"; continue; }
  download "$name" "$ver"
done
ver=$(version deepspeed)
echo "[wheels] deepspeed==$ver (built here from the sdist, pure Python)"
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation --wheel-dir "$DIR" "deepspeed==$ver" \
  || DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" "deepspeed==$ver"
echo "[wheels] this project"
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$DIR" "$ROOT"
ls -l "$DIR"
du -sh "$DIR"
