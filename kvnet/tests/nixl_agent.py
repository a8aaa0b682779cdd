"""A stock NIXL agent (PyPI `nixl-cu12`, UCX backend) driven line by line over stdin/stdout: the
far side of kvferry's NIXL interop tests and of `kvferry-bench net --peer nixl`.

usage: python3 nixl_agent.py NAME LISTEN_PORT BYTES SEED [noprog]

It registers BYTES of DRAM filled with pattern(SEED) (byte i = (i * 131 + SEED) % 251), serves
NIXL's side channel on LISTEN_PORT, prints `ready ADDR BYTES`, then answers each command with
one line, `ok ...` or `err ...`. `noprog` turns NIXL's progress thread off: it busy-polls a core,
which distorts timings on small machines; a Python thread then polls every 200 µs instead (as
kvferry's UCX thread does when idle).

  md                          our metadata blob (hex)
  addmd HEX                   add_remote_agent(blob) -> ok NAME
  fetch NAME PORT             fetch_remote_metadata from 127.0.0.1:PORT, wait until loaded
  sendmd PORT                 send_local_metadata to 127.0.0.1:PORT
  invalidate PORT             invalidate_local_metadata at 127.0.0.1:PORT
  xfer OP PEER RADDR BLOCK N NOTIF_HEX
                              OP (READ|WRITE) N blocks of BLOCK bytes: local block i at offset
                              i*BLOCK, remote block i at RADDR + (N-1-i)*BLOCK (reversed, so
                              nothing coalesces); NOTIF_HEX '-' for none -> ok SECONDS
  notifs N SECS               wait for N notifications -> ok NAME:HEX ...
  notify PEER HEX             send_notif
  sha OFF LEN                 sha256 of our buffer's [OFF, OFF+LEN) -> ok HEX
  fill SEED                   refill our buffer with pattern(SEED)
  quit                        leave (os._exit: NIXL's bundled libraries crash in exit handlers)
"""
import hashlib
import os
import sys
import threading
import time

import numpy as np

try:
    from nixl_cu12._api import nixl_agent, nixl_agent_config
except ImportError:  # the CUDA 13 flavour
    from nixl_cu13._api import nixl_agent, nixl_agent_config

HOST = "127.0.0.1"


def pattern(size, seed):
    return ((np.arange(size, dtype=np.uint64) * 131 + seed) % 251).astype(np.uint8)


def reply(line):
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main():
    name, port, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    prog = not (len(sys.argv) > 5 and sys.argv[5] == "noprog")
    cfg = nixl_agent_config(
        enable_prog_thread=prog, enable_listen_thread=True, listen_port=port, backends=["UCX"]
    )
    agent = nixl_agent(name, cfg)
    buf = pattern(size, seed)
    base = buf.ctypes.data
    agent.register_memory([(base, size, 0, "")], "DRAM")
    notifs = []
    lock = threading.Lock()

    def collect():
        with lock:
            for peer, msgs in agent.get_new_notifs().items():
                notifs.extend((peer, m) for m in msgs)

    if not prog:

        def poll():
            while True:
                collect()  # get_new_notifs makes progress when no progress thread runs
                time.sleep(0.0002)

        threading.Thread(target=poll, daemon=True).start()
    reply(f"ready {base} {size}")
    for line in sys.stdin:
        w = line.split()
        if not w:
            continue
        try:
            cmd = w[0]
            if cmd == "md":
                reply("ok " + agent.get_agent_metadata().hex())
            elif cmd == "addmd":
                peer = agent.add_remote_agent(bytes.fromhex(w[1]))
                reply("ok " + (peer.decode() if isinstance(peer, bytes) else str(peer)))
            elif cmd == "fetch":
                agent.fetch_remote_metadata(w[1], HOST, int(w[2]))
                deadline = time.time() + 10
                while not agent.check_remote_metadata(w[1]):
                    if time.time() > deadline:
                        raise RuntimeError("metadata never arrived")
                    time.sleep(0.005)
                reply("ok")
            elif cmd == "sendmd":
                agent.send_local_metadata(HOST, int(w[1]))
                reply("ok")
            elif cmd == "invalidate":
                agent.invalidate_local_metadata(HOST, int(w[1]))
                reply("ok")
            elif cmd == "xfer":
                op, peer, raddr, block, n = w[1], w[2], int(w[3]), int(w[4]), int(w[5])
                notif = b"" if w[6] == "-" else bytes.fromhex(w[6])
                local = agent.get_xfer_descs([(base + i * block, block, 0) for i in range(n)], "DRAM")
                remote = agent.get_xfer_descs(
                    [(raddr + (n - 1 - i) * block, block, 0) for i in range(n)], "DRAM"
                )
                t = time.perf_counter()
                h = agent.initialize_xfer(op, local, remote, peer, notif)
                state = agent.transfer(h)
                deadline = time.time() + 60
                while state not in ("DONE", "ERR"):
                    if time.time() > deadline:
                        raise RuntimeError("transfer timed out")
                    state = agent.check_xfer_state(h)
                secs = time.perf_counter() - t
                agent.release_xfer_handle(h)
                if state == "ERR":
                    raise RuntimeError(f"{op} failed")
                reply(f"ok {secs}")
            elif cmd == "notifs":
                want, deadline = int(w[1]), time.time() + float(w[2])
                while len(notifs) < want and time.time() < deadline:
                    collect()
                    time.sleep(0.001)
                with lock:
                    got, notifs[:] = notifs[:want], notifs[want:]
                reply("ok " + " ".join(f"{p}:{m.hex()}" for p, m in got))
            elif cmd == "notify":
                agent.send_notif(w[1], bytes.fromhex(w[2]))
                reply("ok")
            elif cmd == "sha":
                off, n = int(w[1]), int(w[2])
                reply("ok " + hashlib.sha256(buf[off : off + n].tobytes()).hexdigest())
            elif cmd == "fill":
                buf[:] = pattern(size, int(w[1]))
                reply("ok")
            elif cmd == "quit":
                break
            else:
                reply("err unknown command " + cmd)
        except Exception as e:  # the test reads the reason
            reply(f"err {type(e).__name__}: {e}".replace("\n", " "))
    os._exit(0)


if __name__ == "__main__":
    main()
