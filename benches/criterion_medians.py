#!/usr/bin/env python3
"""Prints the median time per iteration of every benchmark in target/criterion, as a table.

Run after `cargo bench --bench keyspace`: `python3 benches/criterion_medians.py`.
Criterion's console line shows the mean (slope) estimate; the median per iteration is in
`target/criterion/<group>/<bench>/new/estimates.json`.
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
# The groups benches/keyspace.rs defines (other benches share target/criterion).
GROUPS = ("put", "get", "range_", "merge_", "delta_since_", "snapshot_")


def human(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns:.3g} ns"


print("| benchmark | median | mean | median abs. dev. |")
print("|---|---|---|---|")
for path in sorted(root.glob("**/new/estimates.json")):
    estimates = json.loads(path.read_text())
    bench = json.loads((path.parent / "benchmark.json").read_text())
    if not bench["group_id"].startswith(GROUPS):
        continue
    median = estimates["median"]["point_estimate"]
    mean = estimates["mean"]["point_estimate"]
    mad = estimates["median_abs_dev"]["point_estimate"]
    print(f"| {bench['full_id']} | {human(median)} | {human(mean)} | {human(mad)} |")
