#!/usr/bin/env python3
"""Summarises an ncu CSV (--page raw, metrics gpu__time_duration.sum, dram__bytes_read.sum,
launch__grid_size) of `cuda_bench --profile-decode`: the last decode step's kernels (from the
last embedding lookup on), grouped by name with count, total and median time and share of the
step, then one middle layer's kernels in launch order with the DRAM bytes each read and the rate."""
import csv
import statistics
import sys
from collections import OrderedDict


def num(r, key):
    try:
        return float((r.get(key, "") or "nan").replace(",", ""))
    except ValueError:
        return float("nan")


lines = open(sys.argv[1]).read().splitlines()  # the profiled program's own output comes first
header = next((i for i, l in enumerate(lines) if l.startswith('"ID"')), len(lines))
rows = [r for r in csv.DictReader(lines[header:]) if r.get("ID", "").strip().isdigit()]
short = lambda r: r["Kernel Name"].split("(")[0].replace("void ", "").split("<")[0][-40:]
names = [r["Kernel Name"] for r in rows]
starts = [i for i, n in enumerate(names) if "embed" in n]
if not starts:
    sys.exit("no embedding kernel among %d profiled kernels; the file starts:\n%s" %
             (len(rows), open(sys.argv[1]).read()[:1500]))
start = starts[-1]
step = rows[start:]
us = lambda r: num(r, "gpu__time_duration.sum") / 1e3
groups = OrderedDict()
for r in step:
    groups.setdefault(short(r), []).append(us(r))
total = sum(sum(v) for v in groups.values())
print("%d kernels, %.1f us of kernel time in the step" % (len(step), total))
for name, v in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
    print("%5.1f%% %4d x med %7.2f us  %s" % (100 * sum(v) / total, len(v), statistics.median(v), name))
marks = [i for i, r in enumerate(step) if "qkv_rope" in r["Kernel Name"]]
if len(marks) >= 3:
    m = len(marks) // 2
    a, b = marks[m] - 1, marks[m + 1] - 1  # from one layer's QKV GEMM to the next one's
    print("one layer, in order (us, DRAM MB read, GB/s, grid):")
    for r in step[a:b]:
        t, mb = us(r), num(r, "dram__bytes_read.sum") / 1e6
        print("  %7.2f us %8.2f MB %7.0f GB/s  grid %6s  %s" % (t, mb, mb / t * 1e3 if t else 0,
              r.get("launch__grid_size", "?"), short(r)))
