"""NIXL's own agents on the same loopback pattern as `kvferry-bench net`: two agents in one
process, UCX backend, DRAM, a READ or WRITE of `batch` blocks of `block` bytes scattered on the
target, median of `repeat` timed runs. Prints one JSON object per row. Run by
`kvferry-bench net --nixl`; needs `pip install --no-deps nixl nixl-cu12 numpy`.

usage: python3 nixl_peer.py BLOCK_BYTES[,..] BATCH[,..] REPEAT MAX_BYTES
"""
import json
import os
import statistics
import sys
import time

import numpy as np

try:
    from nixl_cu12._api import nixl_agent, nixl_agent_config
except ImportError:  # the CUDA 13 flavour
    from nixl_cu13._api import nixl_agent, nixl_agent_config


def main():
    blocks = [int(x) for x in sys.argv[1].split(",")]
    batches = [int(x) for x in sys.argv[2].split(",")]
    repeat = int(sys.argv[3])
    max_bytes = int(sys.argv[4])
    cfg = nixl_agent_config(backends=["UCX"])
    init, target = nixl_agent("nixl-init", cfg), nixl_agent("nixl-target", cfg)
    size = max(max_bytes, max(blocks))
    a = np.ones(size, dtype=np.uint8)
    b = np.full(size, 2, dtype=np.uint8)
    init.register_memory([(a.ctypes.data, size, 0, "")], "DRAM")
    target.register_memory([(b.ctypes.data, size, 0, "")], "DRAM")
    init.add_remote_agent(target.get_agent_metadata())
    target.add_remote_agent(init.get_agent_metadata())
    for block in blocks:
        for want in batches:
            n = max(1, min(want, size // block))
            local = init.get_xfer_descs([(a.ctypes.data + i * block, block, 0) for i in range(n)], "DRAM")
            remote = init.get_xfer_descs(
                [(b.ctypes.data + ((i * 7) % n) * block, block, 0) for i in range(n)], "DRAM"
            )
            for op in ("READ", "WRITE"):
                times = []
                for rep in range(repeat + 1):
                    t = time.perf_counter()
                    h = init.initialize_xfer(op, local, remote, "nixl-target")
                    init.transfer(h)
                    while True:
                        st = init.check_xfer_state(h)
                        if st == "DONE":
                            break
                        if st == "ERR":
                            raise SystemExit(f"NIXL {op} failed")
                    if rep > 0:
                        times.append(time.perf_counter() - t)
                    init.release_xfer_handle(h)
                secs = statistics.median(times)
                print(json.dumps({"op": op.lower(), "block_bytes": block, "batch": n, "gbps": block * n / secs / 1e9}))
                sys.stdout.flush()
    # NIXL's bundled libraries crash in their exit handlers; leave without running them.
    os._exit(0)


if __name__ == "__main__":
    main()
