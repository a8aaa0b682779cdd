#!/usr/bin/env bash
# The GPU checks of kvferry in one script, for a GPU machine without a Rust toolchain.
#
#   bash bench/gpu-check.sh pack [DIR]   # here: build the GPU test binaries and kvferry-bench
#                                        # (release, x86-64) and a UCX built with CUDA into DIR
#   bash bench/gpu-check.sh run [DIR]    # there: GPU tests, then kvferry-bench gpu; logs and
#                                        # JSON rows go to $OUT (default DIR/out)
#
# DIR defaults to .gpu (ignored by git). Environment for `run`: KVFERRY_GPU_BENCH_ARGS replaces
# the benchmark's arguments; KVFERRY_GPU_MODELS lists the model,dtype pairs to bench.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
dir=${2:-.gpu}

pack() {
    set -e
    mkdir -p "$dir"
    local bins
    bins=$(cargo test --release --locked --no-run --message-format=json -p kvtier --test cuda 2>/dev/null;
           cargo test --release --locked --no-run --message-format=json -p kvferry --test gpu_net 2>/dev/null)
    for t in cuda gpu_net; do
        local exe
        exe=$(echo "$bins" | python3 -c "
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get('reason') == 'compiler-artifact' and m['target']['name'] == '$t' and m.get('executable'):
        print(m['executable'])" | tail -1)
        cp "$exe" "$dir/test-$t"
        strip --strip-debug "$dir/test-$t"
    done
    cargo build --release --locked -p kvferry-bench
    cp target/release/kvferry-bench "$dir/"
    strip --strip-debug "$dir/kvferry-bench"
    # UCX with CUDA: the libucx-cu12 wheel's libraries, in the wheel's own relative layout (its
    # CUDA module finds the bundled CUDA runtime through an $ORIGIN rpath).
    local site
    site=$(python3 -c "import libucx, os; print(os.path.dirname(os.path.dirname(libucx.__file__)))" 2>/dev/null || true)
    if [ -n "$site" ]; then
        mkdir -p "$dir/site/libucx/lib/ucx" "$dir/site/libucx_cu12.libs"
        cp -L "$site"/libucx/lib/lib{ucp,ucs,uct,ucm,ucs_signal}.so.0 "$dir/site/libucx/lib/"
        cp -L "$site"/libucx/lib/ucx/lib{uct_cuda,ucm_cuda,uct_cma}.so.0 "$dir/site/libucx/lib/ucx/"
        cp -L "$site"/libucx_cu12.libs/libcudart-*.so* "$dir/site/libucx_cu12.libs/"
    else
        echo "note: no libucx wheel here (pip install libucx-cu12); the UCX GPU test will skip" >&2
    fi
    # The wheel (abi3) for the connector check, which drives it on torch CUDA tensors.
    rm -f "$dir"/kvferry-*.whl
    python3 -m pip wheel -q --disable-pip-version-check --no-deps -w "$dir" ./python
    du -sh "$dir"
}

run() {
    local out=${OUT:-$dir/out}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv 2>&1 | tee "$out/gpu.txt"
    # NVRTC for the copy kernel: the toolkit's or a wheel's, under the name the loader tries.
    mkdir -p /tmp/kvferry-lib
    local nvrtc
    nvrtc=$(find / -xdev \( -name 'libnvrtc.so.1[0-9]*' -o -name 'libnvrtc.so' \) -not -path '*/proc/*' 2>/dev/null | grep -v builtins | head -1)
    if [ -n "$nvrtc" ]; then
        ln -sf "$nvrtc" /tmp/kvferry-lib/libnvrtc.so
        export LD_LIBRARY_PATH="/tmp/kvferry-lib:$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        echo "nvrtc: $nvrtc"
    fi
    if [ -e "$dir/site/libucx/lib/libucp.so.0" ]; then
        export KVFERRY_UCX_LIB="$PWD/$dir/site/libucx/lib/libucp.so.0"
    fi
    local rc=0
    "$dir/test-cuda" --test-threads=1 --nocapture 2>&1 | tee "$out/test-cuda.log" || rc=1
    "$dir/test-gpu_net" --test-threads=1 --nocapture 2>&1 | tee "$out/test-gpu_net.log" || rc=1
    : > "$out/gpu.jsonl"
    local pairs=${KVFERRY_GPU_MODELS:-"8b,bf16 8b,fp8 70b,bf16 70b-tp8,bf16"}
    for p in $pairs; do
        local model=${p%,*} dtype=${p#*,}
        # shellcheck disable=SC2086
        timeout "${KVFERRY_GPU_BENCH_TIMEOUT:-120}" "$dir/kvferry-bench" --json gpu --model "$model" --dtype "$dtype" ${KVFERRY_GPU_BENCH_ARGS:-} \
            >>"$out/gpu.jsonl" 2>>"$out/bench.log" || { rc=1; tail -3 "$out/bench.log"; }
    done
    grep -E "^gpu: auto|unavailable" "$out/bench.log" | sort -u | head -50
    python3 - "$out/gpu.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
print(f"{'model':8} {'dt':4} {'path':10} {'batch':>5} {'method':16} {'GB/s':>7} {'limit':>7} {'ratio':>6} {'x naive':>7}")
for r in rows:
    print(f"{r['model']:8} {r['dtype']:4} {r['path']:10} {r['batch']:5d} {r['method']:16} {r['gbps']:7.1f} {r['limit_gbps']:7.1f} {r['ratio']:6.2f} {r['vs_naive']:7.2f}")
EOF
    # The connector as vLLM drives it, on CUDA tensors laid out as vLLM 0.32 allocates them:
    # offload G1->G2->G3->G1 and P/D (device memory over UCX, staged over TCP), bit-exact.
    local whl
    whl=$(ls "$dir"/kvferry-*.whl 2>/dev/null | head -1)
    if [ -n "$whl" ] && python3 -c "import torch" 2>/dev/null; then
        rm -rf "$dir/py" && python3 -m pip install -q --no-deps --no-index --target "$dir/py" "$whl"
        PYTHONPATH="$PWD/$dir/py" timeout "${KVFERRY_GPU_CHECK_TIMEOUT:-180}" \
            python3 bench/gpu_connector_check.py --device cuda 2>&1 | tee "$out/connector.jsonl" || rc=1
    else
        echo "note: no kvferry wheel in $dir or no torch here; the connector check did not run" >&2
        rc=1
    fi
    return $rc
}

case "$mode" in
    pack) pack ;;
    run) run ;;
    *) echo "usage: $0 pack|run [DIR]" >&2; exit 2 ;;
esac
