#!/usr/bin/env bash
# Train on one node: `cot2align train` on every local GPU through the deepspeed launcher.
#
#   launchers/local.sh CONFIG [cot2align train args...]
#   GPUS=4 launchers/local.sh paper_A --set train.grad_accum=2
#
# CONFIG is a shipped recipe name or a YAML path; everything after it goes to `cot2align train`
# unchanged. Hyperparameters live in the config and in --set overrides, never here.
#
# Environment:
#   GPUS         ranks to start (default: every accelerator DeepSpeed detects, honouring
#                CUDA_VISIBLE_DEVICES). On a CPU-only machine DeepSpeed uses its CPU accelerator
#                with gloo; set GPUS=2 to run two ranks.
#   MASTER_PORT  rendezvous port (default: a free port, so two runs on one machine never collide)
#   DEEPSPEED    the launcher executable (default: deepspeed on PATH)
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: $0 CONFIG [cot2align train args...]" >&2
  exit 2
fi
config=$1
shift

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

launcher_args=(--master_port "${MASTER_PORT:-$(free_port)}")
if [[ -n "${GPUS:-}" ]]; then
  launcher_args+=(--num_gpus "$GPUS")
fi

# The launcher passes --local_rank=N before the command; `cot2align` accepts it at the top level.
exec "${DEEPSPEED:-deepspeed}" "${launcher_args[@]}" --module cot2align_ds.cli \
  train --config "$config" "$@"
