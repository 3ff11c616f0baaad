#!/usr/bin/env bash
# Several nodes through the deepspeed launcher over ssh/pdsh, from the first host.
#   HOSTFILE=launch/hostfile MASTER_ADDR=node1 bash launch/multinode.sh CONFIG [args...]
# Variables: HOSTFILE (lines "hostname slots=N", see hostfile.example), MASTER_ADDR (reachable
# address of the first host), MASTER_PORT (default 29500), NCCL_SOCKET_IFNAME / NCCL_IB_HCA as
# your fabric needs (exported to every node through .deepspeed_env in the working directory).
# Without ssh between nodes, start this on every node with NO_SSH=1 NODE_RANK=<i>.
# Every node must see the repo (same path), the .venv and the data shards.
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${1:?usage: launch/multinode.sh CONFIG [args...]}; shift
PY=${PY:-.venv/bin/python}
HOSTFILE=${HOSTFILE:-launch/hostfile}
[ -f "$HOSTFILE" ] || { echo "hostfile $HOSTFILE not found (copy launch/hostfile.example)" >&2; exit 2; }
ARGS=(--hostfile "$HOSTFILE" --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}")
if [ -n "${NO_SSH:-}" ]; then
  ARGS+=(--no_ssh --node_rank "${NODE_RANK:?set NODE_RANK with NO_SSH}")
fi
if [ -n "${NUM_GPUS:-}" ]; then ARGS+=(--num_gpus "$NUM_GPUS"); fi
exec "$PY" -m deepspeed.launcher.runner "${ARGS[@]}" --module imagebert_ds.train --config "$CONFIG" "$@"
