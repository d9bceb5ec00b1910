#!/usr/bin/env bash
# The one script for the GPU machine (../shared/GPU.md): installs the wheels it brings, then runs, in
# order and each under its own time limit, (1) the `gpu`-marked tests and (2) the throughput table of
# benchmarks/train_throughput.py, writing JSON and a log into one folder. The whole run stays under
# 8 minutes on one GPU, so a second call can repeat one part.
#
#   benchmarks/gpu_wheels.sh gpu-wheels                    # here, once (WITHOUT="ray wandb" to fit 64 MiB)
#   WHEELS=gpu-wheels benchmarks/gpu_check.sh              # there: everything, into $OUT or ./gpu-out
#   PART=tests benchmarks/gpu_check.sh                     # one part again: tests | throughput
#   PART=throughput WORKLOADS="gpt2-124m" benchmarks/gpu_check.sh
#
# Outputs: gpu_check.log (all of it), env.json (card, versions, what was installed), gpu_tests.xml +
# gpu_tests.json (one entry per test), memory_estimate.json (plan vs measured peak), throughput-W.json
# per workload, parts.jsonl (each part's exit status, seconds, whether it hit its limit).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/gpu-out}
PART=${PART:-all}
WHEELS=${WHEELS:-$ROOT/gpu-wheels}
TARGET=${TARGET:-/tmp/gpu-check-site}
PY=${PYTHON:-python3}
WORKLOADS=${WORKLOADS:-gpt2-124m gpt2-350m bert-base llama-1b}
INSTALL_BUDGET=${INSTALL_BUDGET:-30}
TESTS_BUDGET=${TESTS_BUDGET:-170}
TOTAL_BUDGET=${TOTAL_BUDGET:-470}  # a part's limit is cut to what is left of this: the run never passes 8 min
declare -A WORKLOAD_BUDGET=([gpt2-124m]=70 [gpt2-350m]=70 [bert-base]=50 [llama-1b]=80)

case "$PART" in all|tests|throughput) ;; *) echo "PART=$PART: choose all, tests or throughput" >&2; exit 2;; esac
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
say() { echo "[gpu_check $(date +%H:%M:%S)] $*"; }

# DeepSpeed's FusedAdam JIT build chokes on "9.0a" (GPU.md); we use torch's fused AdamW anyway
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONPATH="$ROOT:$TARGET${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE=disabled OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1

part() {  # NAME BUDGET_S COMMAND...: run under `timeout`, record the outcome, never abort the script
  local name=$1 budget=$2 rc=0 t0=$SECONDS left=$((TOTAL_BUDGET - SECONDS))
  shift 2
  if [ "$left" -lt 15 ]; then
    printf '{"part": "%s", "rc": null, "seconds": 0, "timed_out": false, "skipped": "total budget spent"}\n' "$name" >> "$OUT/parts.jsonl"
    say "$name: skipped, ${left}s left of TOTAL_BUDGET=${TOTAL_BUDGET}s"
    return 0
  fi
  [ "$budget" -gt "$left" ] && budget=$left
  say "$name: start (limit ${budget}s): $*"
  timeout -k 10 "$budget" "$@" || rc=$?
  local took=$((SECONDS - t0)) hit=false
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then hit=true; fi
  printf '{"part": "%s", "rc": %d, "seconds": %d, "timed_out": %s}\n' "$name" "$rc" "$took" "$hit" >> "$OUT/parts.jsonl"
  say "$name: exit $rc after ${took}s$([ "$hit" = true ] && echo ' (hit its time limit)')"
  return 0
}

install_wheels() {  # only the distributions this Python lacks, into $TARGET
  local missing=() whl dist
  shopt -s nullglob
  for whl in "$WHEELS"/*.whl; do
    dist=$(basename "$whl" | cut -d- -f1)
    if ! "$PY" -c "import importlib.metadata as m, sys; m.version(sys.argv[1])" "$dist" 2>/dev/null \
       || [ "$dist" = pretrain_pipeline ]; then
      missing+=("$whl")
    fi
  done
  if [ "${#missing[@]}" = 0 ]; then say "install: nothing missing (WHEELS=$WHEELS)"; return 0; fi
  say "install: ${#missing[@]} wheels into $TARGET: $(printf '%s ' "${missing[@]##*/}")"
  "$PY" -m pip install --quiet --no-index --no-deps --target "$TARGET" --upgrade "${missing[@]}"
}

environment() {
  "$PY" - "$OUT/env.json" <<'PY'
import importlib.metadata as m, json, platform, sys
import torch
names = ["torch", "deepspeed", "transformers", "triton", "pydantic", "pytest", "ray", "wandb", "pretrain-pipeline"]
def version(n):
    try:
        return m.version(n)
    except m.PackageNotFoundError:
        return None
env = {"python": platform.python_version(), "cuda_available": torch.cuda.is_available(), "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
       "packages": {n: version(n) for n in names}}
json.dump(env, open(sys.argv[1], "w"), indent=1)
print(json.dumps(env))
PY
}

tests_to_json() {  # junit XML → one JSON entry per test (outcome, message)
  "$PY" - "$OUT/gpu_tests.xml" "$OUT/gpu_tests.json" <<'PY'
import json, sys, xml.etree.ElementTree as ET
from pathlib import Path
if not Path(sys.argv[1]).exists():
    sys.exit("no junit XML: the tests part did not finish")
rows = []
for case in ET.parse(sys.argv[1]).iter("testcase"):
    outcome, message = "passed", ""
    for kind in ("failure", "error", "skipped"):
        node = case.find(kind)
        if node is not None:
            outcome, message = kind, (node.get("message") or "")[:500]
    rows.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                 "seconds": float(case.get("time") or 0), "message": message})
json.dump(rows, open(sys.argv[2], "w"), indent=1)
counts = {k: sum(r["outcome"] == k for r in rows) for k in ("passed", "failure", "error", "skipped")}
print("gpu tests:", counts)
PY
}

export OUT WHEELS TARGET PY  # the functions below run in `bash -c` under `timeout`
export -f say install_wheels environment tests_to_json
say "root $ROOT, out $OUT, part $PART, python $("$PY" --version 2>&1)"
nvidia-smi -L 2>/dev/null || say "nvidia-smi: not available (no GPU here?)"
part install "$INSTALL_BUDGET" bash -c install_wheels
part environment 30 bash -c environment

if [ "$PART" = all ] || [ "$PART" = tests ]; then
  rm -f "$OUT/gpu_tests.xml"
  part tests "$TESTS_BUDGET" env GPU_CHECK_OUT="$OUT" "$PY" -m pytest -m gpu tests/gpu -q -rA -p no:cacheprovider \
    --basetemp=/tmp/gpu-check-pytest --junitxml="$OUT/gpu_tests.xml"
  part tests-json 20 bash -c tests_to_json
fi

if [ "$PART" = all ] || [ "$PART" = throughput ]; then
  for w in $WORKLOADS; do
    part "throughput-$w" "${WORKLOAD_BUDGET[$w]:-90}" "$PY" benchmarks/train_throughput.py --workload "$w" \
      --warmup "${WARMUP:-3}" --steps "${STEPS:-10}" --out "$OUT/throughput-$w.json"
  done
fi
say "done: $(wc -l < "$OUT/parts.jsonl") parts recorded in $OUT/parts.jsonl"
