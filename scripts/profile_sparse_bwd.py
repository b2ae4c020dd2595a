"""Where the sparse_attention backward's GPU time goes (dev tool, GPU only): per-kernel times
from torch.profiler for the bench config, and the dk/dv list-length spread (the sink blocks'
lists are the longest).

    python scripts/profile_sparse_bwd.py [--seq 32768] [--rows-dq 128] [--rows-dkdv 64]
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from deepkern.bench import sparse_attention as sb
from deepkern.triton_kernels import sparse_attention as kernels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--rows-dq", type=int, default=kernels.MAX_ROWS_DQ)
    ap.add_argument("--rows-dkdv", type=int, default=kernels.MAX_ROWS_DKDV)
    args = ap.parse_args()
    kernels.MAX_ROWS_DQ, kernels.MAX_ROWS_DKDV = args.rows_dq, args.rows_dkdv
    q, k, v, _ = sb._inputs(args.seq, False)
    dout = torch.randn_like(q)
    idx = sb._select(q, k)
    scale = sb.D ** -0.5
    out, lse = kernels.sparse_attention_fwd(q, k, v, idx, sb.BLOCK, True, scale)
    nb = kernels._num_blocks(args.seq, sb.BLOCK)
    offs, _ = kernels.transpose_indices(idx, nb)
    lens = (offs[1:] - offs[:-1]).float()
    print(f"S={args.seq}: dk/dv lists per key block: mean {lens.mean():.1f}, max {lens.max():.0f}, "
          f"share of entries in lists > 4x mean {(lens * (lens > 4 * lens.mean())).sum() / lens.sum():.1%}")

    def bwd():
        return kernels.sparse_attention_bwd(dout, q, k, v, out, lse, idx, sb.BLOCK, True, scale)

    for _ in range(3):
        bwd()
    torch.cuda.synchronize()
    reps = 5
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            bwd()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: e.device_time_total, reverse=True)
    total = sum(e.device_time_total for e in rows)
    print(f"backward: {total / reps / 1e3:.2f} ms of GPU time per call")
    for e in rows[:8]:
        print(f"  {e.device_time_total / reps / 1e3:8.3f} ms  {e.count // reps:3d}x  {e.key[:90]}")


if __name__ == "__main__":
    main()
