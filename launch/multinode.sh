#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher and a hostfile.
#
#   launch/multinode.sh [train.py arguments ...]
#   launch/multinode.sh --recipe launch/recipes/production.yaml --set optim.lr=3e-5
#
# Run it on the first node of the hostfile: the launcher ssh-es (pdsh) into every node, changes
# to this working directory there and starts that node's ranks. Relative paths are relative to
# the working directory; the defaults are this repository's files. A remote shell does not
# inherit this one's environment, so the variables matching ENV_PREFIXES are written to
# .deepspeed_env (in the working directory, or DS_ENV_FILE), which the launcher exports on
# every node before starting its ranks. The launcher puts those exports on the pdsh command
# line (visible in `ps` on every node, and logged), so variables whose names look secret
# (SECRET_NAMES: tokens, keys, passwords) go instead into <DS_ENV_FILE>.secrets, readable by
# you only, which every rank reads at start-up (DSCLIP_SECRETS_FILE). Both files are removed
# when the launch ends; the working directory must be on storage every node shares.
# Without ssh between nodes (a scheduler starts one copy per node), set NODE_RANK on each
# node instead: each copy then starts only its own node's ranks (--no_ssh), in its own
# environment.
#
# Environment (defaults in brackets):
#   HOSTFILE      nodes and slots [launch/hostfile]; see launch/hostfile.example
#   DS_CONFIG     DeepSpeed engine config [ds_configs/zero3.json]
#   MASTER_ADDR   address of rank 0 that every node can reach [first host in HOSTFILE]
#   MASTER_PORT   free TCP port on the master [29500]
#   NODE_RANK     set: --no_ssh mode, this node's index in HOSTFILE; unset: launch all nodes via pdsh
#   DS_ENV_FILE   where the environment for the remote nodes is written [./.deepspeed_env]
#   ENV_PREFIXES  variables propagated through .deepspeed_env, as a regex of name prefixes
#                 [NCCL_|FI_|UCX_|OMP_NUM_THREADS|CUDA_|HF_|TRANSFORMERS_|WANDB_|TORCH_|DSCLIP_]
#   SECRET_NAMES  regex of name parts that mark a propagated variable as secret
#                 [TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL]
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
HOSTFILE=${HOSTFILE:-$REPO/launch/hostfile}
DS_CONFIG=${DS_CONFIG:-$REPO/ds_configs/zero3.json}
ENV_PREFIXES=${ENV_PREFIXES:-NCCL_|FI_|UCX_|OMP_NUM_THREADS|CUDA_|HF_|TRANSFORMERS_|WANDB_|TORCH_|DSCLIP_}
SECRET_NAMES=${SECRET_NAMES:-TOKEN|KEY|SECRET|PASSWORD|CREDENTIAL}

if [[ ! -f "$HOSTFILE" ]]; then
    echo "multinode.sh: hostfile $HOSTFILE not found: copy launch/hostfile.example to launch/hostfile and list your nodes" >&2
    exit 2
fi
MASTER_ADDR=${MASTER_ADDR:-$(awk '!/^[[:space:]]*#/ && NF {print $1; exit}' "$HOSTFILE")}
MASTER_PORT=${MASTER_PORT:-29500}

launcher=(deepspeed --hostfile "$HOSTFILE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT")
if [[ -n "${NODE_RANK:-}" ]]; then
    launcher+=(--no_ssh --node_rank "$NODE_RANK")
else
    # The launcher reads DS_ENV_FILE (a name in the working directory or home, or an absolute
    # path) and exports each KEY=VALUE line on every node (single-line values only).
    export DS_ENV_FILE=${DS_ENV_FILE:-.deepspeed_env}
    [[ "$DS_ENV_FILE" == /* ]] && secrets_file="$DS_ENV_FILE.secrets" || secrets_file="$PWD/$DS_ENV_FILE.secrets"
    trap 'rm -f "$DS_ENV_FILE" "$secrets_file"' EXIT
    rm -f "$DS_ENV_FILE" "$secrets_file"  # a file that exists keeps its mode when written again
    propagated=$(env | grep -E "^(${ENV_PREFIXES})[A-Za-z0-9_]*=" || true)
    (
        umask 077  # both files: readable by this user only
        printf '%s' "$propagated" | grep -vE "^[A-Za-z0-9_]*(${SECRET_NAMES})[A-Za-z0-9_]*=" > "$DS_ENV_FILE" || true
        printf '%s' "$propagated" | grep -E "^[A-Za-z0-9_]*(${SECRET_NAMES})[A-Za-z0-9_]*=" > "$secrets_file" || true
        if [[ -s "$secrets_file" ]]; then
            echo "DSCLIP_SECRETS_FILE=$secrets_file" >> "$DS_ENV_FILE"
        fi
    )
fi
# Not exec, so that the trap above removes the environment files when the launch ends; the
# launcher runs in the background and a SIGTERM / SIGINT to this script is passed on to it.
"${launcher[@]}" "$REPO/dsclip/train.py" --deepspeed_config "$DS_CONFIG" "$@" &
launcher_pid=$!
trap 'kill -TERM "$launcher_pid" 2>/dev/null || true' TERM INT
status=0
wait "$launcher_pid" || status=$?
while kill -0 "$launcher_pid" 2>/dev/null; do  # wait returned early for a signal: the ranks are saving
    status=0
    wait "$launcher_pid" || status=$?
done
exit "$status"
