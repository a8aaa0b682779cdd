#!/usr/bin/env bash
# kvferry in real vLLM on one CPU machine, in one command: installs vLLM's CPU build into a cached
# virtual environment (the first time: a few minutes and ~6 GB), installs kvferry into it with
# pip, makes a tiny random Llama locally, then runs python/examples/vllm_demo.py: a prefill and a
# decode `vllm serve` behind kvferry's proxy, then offload and reuse of a long prefix.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=$(bash python/tests/e2e/setup_vllm.sh)
"$venv/bin/python" -m pip install -q --disable-pip-version-check ./python
model_dir=$(mktemp -d)
trap 'rm -rf "$model_dir"' EXIT
"$venv/bin/python" python/tests/e2e/make_tiny_model.py "$model_dir/tiny" >/dev/null 2>&1
"$venv/bin/python" python/examples/vllm_demo.py --model "$model_dir/tiny" "$@"
