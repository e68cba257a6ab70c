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
# Environment of the remote ranks. DeepSpeed forwards the variables of its env file (KEY=VALUE per
# line) and those starting with NCCL_, PYTHON, MV2_, UCX_, MLFLOW by putting "export KEY=VALUE; ..."
# on the command line of pdsh (or mpirun/srun: visible in `ps` on this host) and logging that
# command. So this script forwards W&B's settings (WANDB_ENTITY, WANDB_PROJECT, WANDB_MODE,
# WANDB_BASE_URL) that way, but never the key: WANDB_API_KEY is written to a file readable by you
# alone (mode 0600, in FALQON_SECRETS_DIR, default ~/.cache/falqon_dist/secrets), only its path
# travels (FALQON_WANDB_KEY_FILE), rank 0 reads it into its own environment just before W&B starts
# (falqon_dist/train/wandb_logger.py, never logging it), and the file is removed when this script
# exits (a `kill -9` of this script leaves it there, still 0600). FALQON_SECRETS_DIR must be at the
# same path on the host of rank 0 (your home usually is, on a cluster); where it is not, rank 0
# warns and W&B runs without the key (offline with wandb.mode=auto). WANDB_API_KEY is removed from
# the launcher's own environment too, so every rank, local or remote, gets it the same way.
#
# The env file itself is a temporary file (DS_ENV_FILE), removed at exit: ./.deepspeed_env is neither
# written nor read (older versions of this script rewrote it on every run), ~/.deepspeed_env (or an
# absolute DS_ENV_FILE of yours) is copied into it. Either holding WANDB_API_KEY is refused: DeepSpeed
# would put the key on the command line.
set -euo pipefail
usage="usage: launch/multinode.sh HOSTFILE [launcher flags ...] -- [hydra overrides ...]"
hostfile=${1:?$usage}
shift
launcher_flags=()
if [[ " $* " == *" -- "* ]]; then
  while [[ $# -gt 0 && "$1" != "--" ]]; do launcher_flags+=("$1"); shift; done
  shift  # the "--"
fi
cd "$(dirname "$0")/.."

fail() { echo "launch/multinode.sh: error: $*" >&2; exit 2; }
holds_key() { [[ -f "$1" ]] && grep -Eq '^[[:space:]]*WANDB_API_KEY[[:space:]]*=' "$1"; }

if holds_key .deepspeed_env; then
  fail "$PWD/.deepspeed_env holds WANDB_API_KEY (an older launch/multinode.sh wrote it there, readable by" \
       "every user of this machine): delete that file; the key now travels in a file only you can read"
fi
user_env=${DS_ENV_FILE:-.deepspeed_env}
[[ "$user_env" == /* ]] || user_env="$HOME/$user_env"
if holds_key "$user_env"; then
  fail "$user_env holds WANDB_API_KEY: DeepSpeed would put it on pdsh's command line (visible in ps) and" \
       "log it; remove that line and export WANDB_API_KEY instead (this script forwards it in a 0600 file)"
fi

umask 077  # every file below: readable by you alone
secrets_dir=${FALQON_SECRETS_DIR:-$HOME/.cache/falqon_dist/secrets}
mkdir -p "$secrets_dir" || fail "FALQON_SECRETS_DIR=$secrets_dir cannot be created"
env_file=$(mktemp "$secrets_dir/deepspeed_env.XXXXXX")
key_file=""
cleanup() { rm -f "$env_file" ${key_file:+"$key_file"}; }
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

if [[ -f "$user_env" ]]; then
  grep -v '^[[:space:]]*$' "$user_env" >> "$env_file" || true  # DeepSpeed's reader fails on an empty line
fi
for var in WANDB_ENTITY WANDB_PROJECT WANDB_MODE WANDB_BASE_URL; do
  if [[ -n "${!var:-}" ]]; then printf '%s=%s\n' "$var" "${!var}" >> "$env_file"; fi
done
if [[ -n "${WANDB_API_KEY:-}" ]]; then
  key_file=$(mktemp "$secrets_dir/wandb_key.XXXXXX")
  printf '%s\n' "$WANDB_API_KEY" > "$key_file"  # printf is a builtin: the key is on no command line
  printf 'FALQON_WANDB_KEY_FILE=%s\n' "$key_file" >> "$env_file"
  export FALQON_WANDB_KEY_FILE="$key_file"  # a rank started locally (one host) inherits it
  unset WANDB_API_KEY
fi
echo "PYTHONPATH=$PWD" >> "$env_file"
# An absolute DS_ENV_FILE: DeepSpeed joins it to ~ and to . and gets this one file both times.
DS_ENV_FILE=$env_file "${DEEPSPEED:-.venv/bin/deepspeed}" --hostfile "$hostfile" "${launcher_flags[@]}" \
  launch/train.py "$@"
