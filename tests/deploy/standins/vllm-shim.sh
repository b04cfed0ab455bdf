#!/bin/sh
# `vllm serve MODEL ARGS...` as the official image runs it, through the module entry point.
set -e
if [ "$1" != serve ]; then echo "vllm stand-in: only 'serve' is supported" >&2; exit 2; fi
shift
model="$1"
shift
exec /opt/vllm/bin/python -m vllm.entrypoints.openai.api_server --model "$model" "$@"
