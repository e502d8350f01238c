#!/usr/bin/env bash
# The GPU work lives with the experiments: experiments/gpu_check.sh (this forwards to it).
exec bash "$(dirname "$0")/../experiments/gpu_check.sh" "$@"
