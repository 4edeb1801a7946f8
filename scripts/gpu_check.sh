#!/usr/bin/env bash
# The GPU check (scripts/gpu_check.py): one JSON of step times per precision and compile, DDIM
# images/s, the MQ kNN at the paper's size, FID features/s and peak memory, in at most 8 minutes.
#   bash scripts/gpu_check.sh [--smoke] [--out FILE]     (default FILE: $OUT/gpu_check.json, else ./gpu_check.json)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-.}/gpu_check.json"
exec timeout 480 "${PYTHON:-python}" scripts/gpu_check.py --out "$out" "$@"
