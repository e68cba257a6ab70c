#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher (pdsh/ssh to every host in the hostfile).
#
#   launch/multinode.sh HOSTFILE [deepspeed launcher flags ...] -- [hydra overrides ...]
#   launch/multinode.sh launch/hostfile.example --master_port 29600 --include "node1:0,1@node2:0,1" -- \
#       model=llama3_8b model.name_or_path=/models/llama3-8b data=alpaca data.path=/data/alpaca.json \
#       train.max_steps=2000 logger=wandb run.dir=/shared/runs/llama3
#
# DEEPSPEED=/path/to/deepspeed picks the launcher (default: this repository's .venv/bin/deepspeed).
# Without "--", every argument after HOSTFILE is a Hydra override. Launcher flags are DeepSpeed's own
# (deepspeed --help): --master_addr/--master_port, --include/--exclude, --num_nodes/--num_gpus,
# --launcher pdsh|openmpi|mvapich|slurm|..., --ssh_port.
#
# What the DeepSpeed launcher needs: passwordless ssh from this node to every host of the hostfile
# (and pdsh installed here, the default --launcher), this repository and its .venv at the same path
# on every host, and run.dir on a file system every node can reach (every rank writes its part of
# each checkpoint there; only rank 0 writes logs and metrics). Without ssh, start torchrun on each
# node instead (README, "Many nodes").
#
# Environment: DeepSpeed copies the variables listed in ./.deepspeed_env (KEY=VALUE per line) and
# those starting with NCCL_, PYTHON, MV2_, UCX_ to every remote rank. This script writes the W&B
# ones there (WANDB_API_KEY, WANDB_ENTITY, WANDB_PROJECT, WANDB_MODE, WANDB_BASE_URL) so rank 0 on a
# remote node can log online; remove .deepspeed_env afterwards if it holds a key you do not want
# left on disk (it is in .gitignore).
set -euo pipefail
hostfile=${1:?usage: launch/multinode.sh HOSTFILE [launcher flags ...] -- [hydra overrides ...]}
shift
launcher_flags=()
if [[ " $* " == *" -- "* ]]; then
  while [[ $# -gt 0 && "$1" != "--" ]]; do launcher_flags+=("$1"); shift; done
  shift  # the "--"
fi
cd "$(dirname "$0")/.."
: > .deepspeed_env
for var in WANDB_API_KEY WANDB_ENTITY WANDB_PROJECT WANDB_MODE WANDB_BASE_URL; do
  if [[ -n "${!var:-}" ]]; then echo "$var=${!var}" >> .deepspeed_env; fi
done
echo "PYTHONPATH=$PWD" >> .deepspeed_env
exec "${DEEPSPEED:-.venv/bin/deepspeed}" --hostfile "$hostfile" "${launcher_flags[@]}" launch/train.py "$@"
