#!/usr/bin/env bash
# Multi-node training with the DeepSpeed launcher (pdsh/ssh to every host in the hostfile).
#
#   launch/multinode.sh launch/hostfile.example model=llama3_8b model.name_or_path=/models/llama3-8b \
#       data=alpaca data.path=/data/alpaca.json train.max_steps=2000 logger=wandb
#
# Environment: DeepSpeed copies the variables listed in ./.deepspeed_env (KEY=VALUE per line) and
# those starting with NCCL_, PYTHON, MV2_, UCX_ to every remote rank. This script writes the W&B
# ones there (WANDB_API_KEY, WANDB_ENTITY, WANDB_PROJECT, WANDB_MODE, WANDB_BASE_URL) so rank 0 on a
# remote node can log online; remove .deepspeed_env afterwards if it holds a key you do not want
# left on disk (it is in .gitignore).
#
# All ranks use one run directory, chosen by global rank 0 (runs/<timestamp> unless run.dir is
# given) and broadcast. Only rank 0 writes logs and metrics, but every rank writes its part of each
# checkpoint there: give run.dir=/shared/path on a file system every node can reach.
set -euo pipefail
hostfile=${1:?usage: launch/multinode.sh HOSTFILE [hydra overrides...]}
shift
cd "$(dirname "$0")/.."
: > .deepspeed_env
for var in WANDB_API_KEY WANDB_ENTITY WANDB_PROJECT WANDB_MODE WANDB_BASE_URL; do
  if [[ -n "${!var:-}" ]]; then echo "$var=${!var}" >> .deepspeed_env; fi
done
echo "PYTHONPATH=$PWD" >> .deepspeed_env
exec .venv/bin/deepspeed --hostfile "$hostfile" launch/train.py "$@"
