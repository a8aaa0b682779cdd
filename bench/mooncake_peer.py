"""Mooncake's Transfer Engine as a peer of `kvferry-bench net --peer mooncake`: a target or an
initiator in its own process, P2P handshake (no metadata server), protocol tcp, DRAM.

    mooncake_peer.py target BYTES          prints: ready PORT ADDR
    mooncake_peer.py initiator PORT ADDR BYTES
        prints: ready
        stdin:  row read|write BLOCK N MIN  -> ok MEDIAN_S SPREAD RUNS | err WHY
                (local block i <- remote block (i*7) % N, as kvferry's rows; one warm-up, then
                MIN timed batch transfers, more (up to 4*MIN, at most 64) until the
                interquartile range is within 10 % of the median)

Both exit when stdin closes. Needs `pip install mooncake-transfer-engine-non-cuda`.
"""

import ctypes
import sys
import time

from mooncake.engine import TransferEngine


def engine(size):
    te = TransferEngine()
    if te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") != 0:
        raise SystemExit("err Mooncake's engine did not initialize")
    buf = ctypes.create_string_buffer(size)
    addr = ctypes.addressof(buf)
    if te.register_memory(addr, size) != 0:
        raise SystemExit("err Mooncake refused to register the buffer")
    return te, buf, addr


def spread(v):
    s = sorted(v)
    q = lambda p: s[round((len(s) - 1) * p)]
    m = q(0.5)
    return m, ((q(0.75) - q(0.25)) / m) if m > 0 else 0.0


def main():
    mode = sys.argv[1]
    if mode == "target":
        te, buf, addr = engine(int(sys.argv[2]))
        print(f"ready {te.get_rpc_port()} {addr}", flush=True)
        sys.stdin.read()
        return
    port, raddr, size = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    te, buf, addr = engine(size)
    target = f"127.0.0.1:{port}"
    print("ready", flush=True)
    for line in sys.stdin:
        f = line.split()
        if len(f) != 5 or f[0] != "row":
            print("err bad command", flush=True)
            continue
        op, block, n, least = f[1], int(f[2]), int(f[3]), max(3, int(f[4]))
        if block * n > size:
            print("err the row does not fit the buffer", flush=True)
            continue
        bufs = [addr + i * block for i in range(n)]
        peers = [raddr + ((i * 7) % n) * block for i in range(n)]
        lens = [block] * n
        xfer = te.batch_transfer_sync_read if op == "read" else te.batch_transfer_sync_write
        times, most = [], min(64, 4 * least)
        failed = None
        for rep in range(most + 1):
            t = time.perf_counter()
            rc = xfer(target, bufs, peers, lens)
            dt = time.perf_counter() - t
            if rc != 0:
                failed = f"err transfer returned {rc}"
                break
            if rep > 0:
                times.append(dt)
                if len(times) >= least and spread(times)[1] <= 0.10:
                    break
        if failed:
            print(failed, flush=True)
            continue
        m, s = spread(times)
        print(f"ok {m} {s} {len(times)}", flush=True)


if __name__ == "__main__":
    main()
