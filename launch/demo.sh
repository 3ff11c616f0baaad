#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, make the toy data, run the two pre-training
# stages through the deepspeed launcher (2 CPU ranks, or all GPUs), print zero-shot R@1/5/10.
#   bash launch/demo.sh [--out DIR] [--set key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export WANDB_MODE=${WANDB_MODE:-offline}
exec .venv/bin/imagebert-ds demo "$@"
