"""The SASS instructions where a kernel's warps stall most, from an ncu report.

    ncu --section SourceCounters --section WarpStateStats -k regex:wgmma_kernel -c 1 \\
        -o prof python3 my_case.py
    ncu -i prof.ncu-rep --page source --print-source sass --csv > prof_sass.csv
    python scripts/ncu_stalls.py prof_sass.csv [--top 25]

Prints, per instruction (most samples first): stall samples, its index in the listing,
times executed, the SASS. This is how the serialized wgmmas of the int4 kernel showed up
(docs/perf-notes/int4_matmul.md, session (o)): the top rows were `WARPGROUP.DEPBAR.LE gsb0,
0x0` after every HGMMA. Runs anywhere (reads the CSV only).
"""

from __future__ import annotations

import argparse
import csv


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    with open(args.csv, newline="") as f:
        rows = list(csv.reader(f))
    # Row 0 names the kernel, row 1 holds the column names, then one row per instruction.
    head, data = rows[1], rows[2:]
    src = head.index("Source")
    samples = head.index("Warp Stall Sampling (All Samples)")
    executed = head.index("Instructions Executed")
    total = sum(int(r[samples] or 0) for r in data)
    print(f"{rows[0][1] if len(rows[0]) > 1 else rows[0][0]}")
    print(f"{total} stall samples over {len(data)} instructions")
    ranked = sorted(enumerate(data), key=lambda e: -int(e[1][samples] or 0))[: args.top]
    for i, r in ranked:
        n = int(r[samples] or 0)
        print(f"{n:7d} {100 * n / max(total, 1):5.1f}%  #{i:<5d} executed {r[executed]:>9}  {r[src].strip()}")


if __name__ == "__main__":
    main()
