#!/usr/bin/env bash
# with_mps.sh COMMAND...: runs COMMAND with its processes sharing the GPU through an MPS server of their own (a
# private pipe directory, quit afterwards), instead of time-slicing one context after another.
set -u
dir=$(mktemp -d)
export CUDA_MPS_PIPE_DIRECTORY=$dir/pipe CUDA_MPS_LOG_DIRECTORY=$dir/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d || { echo "with_mps.sh: the MPS control daemon did not start" >&2; exit 1; }
"$@"
rc=$?
echo quit | nvidia-cuda-mps-control
exit $rc
