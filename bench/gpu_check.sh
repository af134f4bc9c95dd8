#!/usr/bin/env bash
# The GPU check in one command (see bench/gpu_check.py for what it runs and writes):
#   python bench/gpu_check.py --prepare .gpu_check          # once, on a CPU machine with ../shared/data
#   bash bench/gpu_check.sh --data .gpu_check --out OUT     # on the GPU machine (add --nproc 8 on an 8-GPU node)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu_check.py "$@"
