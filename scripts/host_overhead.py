"""Host (CPU) time per call of each path, GPU work kept tiny (M=1, small weight), and a cProfile
of the public Triton int4_matmul call. Run on the GPU machine: python scripts/host_overhead.py"""
import cProfile, pstats, time, torch, torch.nn.functional as F
import deepkern
from deepkern.quant import quantize_int4
from deepkern.triton_kernels import int4_matmul as K
from deepkern.triton_kernels import layernorm_gelu as LK

w = quantize_int4(torch.randn(256, 1024, device="cuda", dtype=torch.float16) * 0.02, 128)
x = torch.randn(1, 1024, device="cuda", dtype=torch.float16)
dense = w.dequantize(torch.float16)
xl = torch.randn(64, 1024, device="cuda", dtype=torch.bfloat16)
lw = torch.rand(1024, device="cuda", dtype=torch.bfloat16); lb = torch.randn(1024, device="cuda", dtype=torch.bfloat16)
cases = {
    "F.linear": lambda: F.linear(x, dense),
    "int4 cuda": lambda: deepkern.int4_matmul(x, w, backend="cuda"),
    "int4 triton": lambda: deepkern.int4_matmul(x, w, backend="triton"),
    "int4 triton op": lambda: torch.ops.deepkern_triton.int4_matmul(x, w.packed, w.scales, w.zeros, 128, None),
    "int4 triton launcher": lambda: K.int4_matmul_fwd(x, w.packed, w.scales, w.zeros, 128, None),
    "ln cuda": lambda: deepkern.layernorm_gelu(xl, lw, lb, backend="cuda"),
    "ln triton": lambda: deepkern.layernorm_gelu(xl, lw, lb, backend="triton"),
    "ln triton launcher": lambda: LK.layernorm_gelu_fwd(xl, lw, lb, None, 1e-5, False, False),
}
for name, fn in cases.items():
    for _ in range(20): fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(300): fn()
    cpu = (time.perf_counter() - t) / 300 * 1e6
    torch.cuda.synchronize()
    print(f"{name:22s} {cpu:7.1f} us CPU per call", flush=True)
prof = cProfile.Profile()
prof.enable()
for _ in range(300): deepkern.int4_matmul(x, w, backend="triton")
prof.disable()
pstats.Stats(prof).sort_stats("tottime").print_stats(22)
