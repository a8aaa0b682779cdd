#!/usr/bin/env python3
"""Checks `kvferry-bench --json trace` rows (stdin): on every trace and capacity, kvferry's
default eviction keeps at least LRU's hit ratio, and more at small capacities (at most 5 % of
the distinct blocks); no row is above the offline optimum (that would be a replay bug). Hit
ratios are deterministic, so these are exact checks, not timing thresholds."""

import collections
import json
import sys

rows = [json.loads(line) for line in sys.stdin if line.strip()]
by = collections.defaultdict(dict)
passed = failed = 0


def check(ok, what):
    global passed, failed
    if ok:
        passed += 1
    else:
        failed += 1
        print(f"trace check FAILED: {what}")


for r in rows:
    check(r["hit_ratio"] <= r["limit_hit_ratio"] + 1e-9, f"{r} is above the optimum")
    if r["g3_blocks"] == 0:
        by[(r["trace"], r["capacity_fraction"])][r["policy"]] = r
check(len(by) > 0, "no DRAM-only rows")
for (trace, cap), pol in sorted(by.items()):
    default = [r for r in pol.values() if r["default"]]
    check(len(default) == 1 and "lru" in pol, f"{trace} at {cap}: a default row and an LRU row")
    if not default or "lru" not in pol:
        continue
    d, lru = default[0], pol["lru"]
    check(
        d["hit_ratio"] >= lru["hit_ratio"],
        f"{trace} at {cap}: {d['policy']} {d['hit_ratio']:.4f} below LRU {lru['hit_ratio']:.4f}",
    )
    if cap <= 0.05:
        check(
            d["hit_ratio"] > lru["hit_ratio"],
            f"{trace} at {cap}: {d['policy']} no better than LRU",
        )
    print(
        f"trace {trace} capacity {cap}: {d['policy']} {d['hit_ratio']:.3f} "
        f"(LRU {lru['hit_ratio']:.3f}, optimum {d['limit_hit_ratio']:.3f})"
    )
print(f"python: {passed} passed, {failed} failed (trace replay checks)")
sys.exit(1 if failed else 0)
