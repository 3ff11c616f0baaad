#!/usr/bin/env bash
# One node: N GPUs, or N CPU ranks (gloo) on a machine without a GPU.
#   NPROC=8 bash launch/local.sh configs/runs/stage1_lait.yaml [--set key=value ...] [--resume]
# Variables: NPROC (default: GPU count, or 2 without GPUs), MASTER_PORT (default 29500).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/local.sh CONFIG [args...]}; shift
PY=${PY:-.venv/bin/python}
if [ -z "${NPROC:-}" ]; then
  NPROC=$("$PY" -c 'import torch; print(torch.cuda.device_count() or 2)')
fi
if ! "$PY" -c 'import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  export DS_ACCELERATOR=cpu
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / NPROC > 0 ? $(nproc) / NPROC : 1 ))}
fi
exec "$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
  --module imagebert_ds.train --config "$CONFIG" "$@"
