"""Dev check: times the Triton layernorm_gelu backward through autograd and called directly,
to find where the two differ (H100 bench: fwd+bwd 1517 us vs fwd 250 + direct bwd 511 us)."""

import torch
import triton.testing

import deepkern
from deepkern.triton_kernels import layernorm_gelu as tk


def t(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median") * 1e3


torch.manual_seed(0)
rows, n = 16384, 8192
x = (torch.randn(rows, n, device="cuda", dtype=torch.bfloat16) * 2 + 0.5).requires_grad_(True)
w = (torch.rand(n, device="cuda", dtype=torch.bfloat16) + 0.5).requires_grad_(True)
b = (torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.5).requires_grad_(True)
dy = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
for be in ("triton", "cuda"):
    y = deepkern.layernorm_gelu(x, w, b, backend=be)
    print(be, "fwd", round(t(lambda: deepkern.layernorm_gelu(x, w, b, backend=be)), 1),
          "fwd+bwd", round(t(lambda: torch.autograd.grad(deepkern.layernorm_gelu(x, w, b, backend=be), (x, w, b), dy)), 1),
          "bwd only (retain graph)", round(t(lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)), 1))
_, _, mean, rstd = tk.layernorm_gelu_fwd(x.detach(), w.detach(), b.detach(), None, 1e-5, False, False)
print("triton direct bwd", round(t(lambda: tk.layernorm_gelu_bwd(dy, x.detach(), w.detach(), b.detach(), mean, rstd, False, False)), 1))
print("triton op bwd", round(t(lambda: torch.ops.deepkern_triton.layernorm_gelu_bwd(dy, x.detach(), w.detach(), b.detach(), mean, rstd, False, False)), 1))

# Kernel-level view of one forward+backward per backend: which kernels run and for how long.
from torch.profiler import ProfilerActivity, profile

for be in ("triton", "cuda"):
    fn = lambda: torch.autograd.grad(deepkern.layernorm_gelu(x, w, b, backend=be), (x, w, b), dy)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    print(f"--- {be}: kernels over 5 fwd+bwd")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
