#!/usr/bin/env bash
# Multi-node training with torchrun: run one copy on every node (by hand, or via launch/slurm.sbatch).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-01 launch/torchrun.sh --recipe launch/recipes/production.yaml   # on node-01
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node-01 launch/torchrun.sh --recipe launch/recipes/production.yaml   # on node-02
#
# Each copy starts NPROC_PER_NODE ranks; node NODE_RANK's ranks get global ranks
# NODE_RANK * NPROC_PER_NODE ... +NPROC_PER_NODE-1, and all meet at MASTER_ADDR:MASTER_PORT
# (static rendezvous: node 0 hosts the store). Each node keeps its own environment.
#
# Environment (defaults in brackets):
#   NNODES          number of nodes [1]
#   NODE_RANK       this node's index, 0 .. NNODES-1 [0]
#   NPROC_PER_NODE  ranks per node [the GPUs nvidia-smi lists, else 1]
#   MASTER_ADDR     address of node 0 that every node can reach [127.0.0.1]
#   MASTER_PORT     free TCP port on node 0 [29500]
#   DS_CONFIG       DeepSpeed engine config [ds_configs/zero3.json]
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
    [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
fi

exec torchrun \
    --nnodes "${NNODES:-1}" \
    --node_rank "${NODE_RANK:-0}" \
    --nproc_per_node "$NPROC_PER_NODE" \
    --master_addr "${MASTER_ADDR:-127.0.0.1}" \
    --master_port "${MASTER_PORT:-29500}" \
    "$REPO/dsclip/train.py" --deepspeed_config "${DS_CONFIG:-$REPO/ds_configs/zero3.json}" "$@"
