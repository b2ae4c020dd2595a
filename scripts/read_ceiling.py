"""How fast can the int4_matmul M=1 case possibly be under the bench's timing? Times the
fastest plain read of as many bytes as each bench weight holds (packed codes + scales +
zeros): Triton kernels that only load and sum int32 words (one block per program, or a
grid-stride loop; several block sizes and warps), and torch.sum, each as a CUDA-graph replay
after the L2 clear (the bench's timing). GPU only: python scripts/read_ceiling.py"""
import torch, triton, triton.language as tl, triton.testing
from deepkern.bench.harness import graphed

@triton.jit
def read_blocks(src, out, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(src + offs, mask=offs < n, other=0, eviction_policy="evict_first")
    tl.store(out + pid, tl.sum(v, 0))

@triton.jit
def read_stride(src, out, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], tl.int32)
    for start in range(pid * BLOCK, n, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(src + offs, mask=offs < n, other=0, eviction_policy="evict_first")
    tl.store(out + pid, tl.sum(acc, 0))

def t(fn):
    return triton.testing.do_bench(graphed(fn), warmup=25, rep=100, return_mode="median") * 1e3

sms = torch.cuda.get_device_properties(0).multi_processor_count
for mb, name in ((35.65, "8192x8192 int4"), (125.3, "8192x28672 int4"), (8.9, "4096x4096 int4")):
    n = int(mb * 1e6) // 4
    # fp32 data for torch.sum (its int32 sum takes a slow int64 path: 82 us at 35.7 MB on the
    # H100, against 25.5 for fp32), read as int32 words by the Triton kernels.
    src_f = torch.randn(n, device="cuda", dtype=torch.float32)
    src = src_f.view(torch.int32)
    out = torch.empty(n // 256 + 1, device="cuda", dtype=torch.int32)
    res = {"torch.sum": t(lambda: src_f.sum())}
    for B in (1024, 2048, 4096, 8192):
        for w in (4, 8):
            res[f"blocks B{B} w{w}"] = t(lambda: read_blocks[(triton.cdiv(n, B),)](src, out, n, BLOCK=B, num_warps=w))
    for B in (1024, 2048, 4096):
        for per_sm in (4, 8, 16):
            res[f"stride B{B} x{per_sm}"] = t(lambda: read_stride[(sms * per_sm,)](src, out, n, BLOCK=B, num_warps=4))
    best = min(res, key=res.get)
    print(f"{name} ({mb} MB): torch.sum {res['torch.sum']:.1f} us; best {best} {res[best]:.1f} us "
          f"= {mb * 1e6 / res[best] / 1e6:.2f} TB/s", flush=True)
    print("   " + " ".join(f"{k}:{v:.1f}" for k, v in sorted(res.items(), key=lambda kv: kv[1])[:6]), flush=True)
