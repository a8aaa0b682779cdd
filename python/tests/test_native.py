"""kvferry's Python package without vLLM: the extension loads from an installed wheel, two
connectors move real bytes between host buffers over loopback, the scheduler half plans, and
Rust errors arrive as KvferryError with the Rust message.

    python python/tests/test_native.py      # exits non-zero on the first failure
"""

import ctypes
import time

import kvferry
from kvferry import Connector, KvferryError
from kvferry._native import Scheduler

BLOCKS, HEADS, HEAD, TOKENS = 16, 2, 64, 32
# [blocks, heads, tokens, K|V channels] of float32, as vLLM's CPU engine lays out each layer.
ELEMS = BLOCKS * HEADS * TOKENS * 2 * HEAD
STRIDES = [HEADS * TOKENS * 2 * HEAD, TOKENS * 2 * HEAD, 2 * HEAD, 1]


def cache(seed):
    buf = (ctypes.c_float * (2 * ELEMS))()  # two layers
    for i in range(0, 2 * ELEMS, 97):
        buf[i] = float((i * seed) % 1000)
    return buf


def register(conn, buf):
    conn.register_cache(
        kv_heads=HEADS,
        head_size=HEAD,
        dtype="float32",
        block_tokens=TOKENS,
        num_blocks=BLOCKS,
        base=ctypes.addressof(buf),
        layer_offsets=[0, ELEMS * 4],
        strides=STRIDES,
    )


def block(buf, layer, b):
    start = layer * ELEMS + b * STRIDES[0]
    return list(buf[start : start + STRIDES[0]])


def until(conn, pred, timeout=20.0):
    got = ([], [], [])
    deadline = time.time() + timeout
    while time.time() < deadline:
        s, r, e = conn.poll()
        got[0].extend(s), got[1].extend(r), got[2].extend(e)
        if pred(got):
            return got
        time.sleep(0.01)
    raise AssertionError(f"timed out: {got}")


def test_pull_between_two_connectors():
    src, dst = cache(3), cache(5)
    prefill = Connector("py-prefill", pd=True, host="127.0.0.1")
    decode = Connector("py-decode", pd=True, host="127.0.0.1")
    register(prefill, src)
    register(decode, dst)
    grant = 0x1234_0000_0001  # the scheduler's offer generation (instance 0x1234, offer 1)
    prefill.finish("p", grant, [2, 7])
    from kvferry._native import blocks_digest

    decode.pull(
        "d", "127.0.0.1", prefill.listen_port(), "p", 1, grant, blocks_digest([2, 7]), [2, 7], [9, 4]
    )
    s, r, errors = until(decode, lambda g: "d" in g[1])
    assert errors == [], errors
    for layer in (0, 1):
        assert block(dst, layer, 9) == block(src, layer, 2)
        assert block(dst, layer, 4) == block(src, layer, 7)
    until(prefill, lambda g: "p" in g[0])
    assert decode.counters()["pulled_blocks"] == 2
    assert prefill.counters()["pulls_served"] == 1


def test_offload_round_trip_and_events():
    buf = cache(7)
    c = Connector("py-offload", dram_blocks=8)
    register(c, buf)
    hashes = [bytes([i]) * 32 for i in range(3)]
    before = [block(buf, 1, b) for b in (1, 2, 3)]
    c.save("s", hashes, [1, 2, 3])
    c.finish("s")
    until(c, lambda g: "s" in g[0])
    assert c.lookup(hashes) == 3
    events = c.take_events()
    assert {(k, m) for k, _, m in events} == {("stored", "CPU")}, events
    for b in (10, 11, 12):
        for layer in (0, 1):
            start = layer * ELEMS + b * STRIDES[0]
            for i in range(start, start + STRIDES[0]):
                buf[i] = 0.0
    c.load("l", hashes, [10, 11, 12])
    _, r, errors = until(c, lambda g: "l" in g[1])
    assert errors == []
    assert [block(buf, 1, b) for b in (10, 11, 12)] == before


def test_scheduler_plans_loads_from_the_mirror():
    s = Scheduler("py-sched", block_size=4, offload=True, pd=False, host="127.0.0.1", port=5000)
    hashes = [bytes([i]) * 32 for i in range(4)]
    s.apply([("stored", h, "CPU") for h in hashes[:3]])
    assert s.matched("r", None, 16, 16, hashes, 0) == 12
    s.allocated("r", None, [5, 6, 7, 8], 12)
    step = s.take_step()
    assert step["loads"] == [("r", hashes[:3], [5, 6, 7])], step


def test_rust_errors_are_python_exceptions():
    for bad, needle in [
        (lambda: Connector("x", pd=True, transport="carrier-pigeon"), "transport"),
        (lambda: Connector("x", dram_blocks=4).save("r", [b"h" * 32], [1]), "offload"),
        (lambda: Connector("x").lookup([b""]), "empty"),
    ]:
        try:
            bad()
        except KvferryError as e:
            assert needle in str(e).lower(), str(e)
        else:
            raise AssertionError(f"no error for {needle}")


def test_side_channel_addresses_follow_nixl_conventions():
    from kvferry.addressing import NIXL_DEFAULT_PORT, side_channel

    env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "10.1.2.3", "VLLM_NIXL_SIDE_CHANNEL_PORT": "7000"}
    # llm-d: the pod IP from the environment, every interface bound, the port from it too.
    a = side_channel({}, env)
    assert (a.advertise, a.bind, a.base_port) == ("10.1.2.3", "0.0.0.0", 7000), a
    # The extra config's keys win over the environment.
    a = side_channel({"host": "10.9.9.9", "port": 7100, "bind_host": "10.9.9.9"}, env)
    assert (a.advertise, a.bind, a.base_port) == ("10.9.9.9", "10.9.9.9", 7100), a
    # Rank-aware: base + data-parallel index x TP size (the core adds the TP rank).
    assert side_channel({}, env, tp_size=4, dp_index=2, dp_size=3).base_port == 7000 + 8
    # Loopback stays loopback; one rank needs no fixed port; several get NixlConnector's 5600.
    a = side_channel({}, {})
    assert (a.advertise, a.bind, a.base_port) == ("127.0.0.1", "127.0.0.1", None), a
    assert side_channel({}, {}, tp_size=2).base_port == NIXL_DEFAULT_PORT
    assert side_channel({}, {}, dp_index=1, dp_size=2).base_port == NIXL_DEFAULT_PORT + 1
    # An unspecified host is bound as given; what is advertised is an address a peer can dial.
    a = side_channel({}, {"VLLM_NIXL_SIDE_CHANNEL_HOST": "0.0.0.0", "VLLM_HOST_IP": "10.4.4.4"})
    assert (a.advertise, a.bind) == ("10.4.4.4", "0.0.0.0"), a
    # A decode-only engine: nothing reachable, no port needed, whatever the environment says.
    a = side_channel({}, env, kv_role="kv_consumer", tp_size=4)
    assert (a.advertise, a.bind, a.base_port) == ("127.0.0.1", "127.0.0.1", None), a
    try:
        side_channel({"port": 65534}, {}, tp_size=4)
    except ValueError as e:
        assert "out of range" in str(e)
    else:
        raise AssertionError("ports past 65535 are refused")


if __name__ == "__main__":
    print(f"kvferry {kvferry.__version__}")
    n = 0
    for name, fn in sorted(globals().items()):
        if name.startswith("test_") and callable(fn):
            fn()
            n += 1
            print(f"ok {name}")
    print(f"python: {n} passed, 0 failed")
