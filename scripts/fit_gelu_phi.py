"""Fit the normal-CDF approximation the layernorm_gelu kernels use for the exact (erf) GELU.

GELU(z) = z * Phi(z). The kernels evaluate, for a = |z|,

    t = 1 / (1 + C * a)
    p = t * Q(t) * exp2(-z*z * log2(e) / 2)          (= Phi(-a) = erfc(a / sqrt 2) / 2)
    Phi(z) = 1 - p if z > 0 else p

with Q a polynomial fitted here (minimax of the relative error of p by iteratively reweighted
least squares). Why not libdevice erff: ~23 SASS instructions per element against 11 + degree
here, and 0.5 * (1 + erf(z / sqrt 2)) loses all relative accuracy for z < -4 (1 + erf cancels),
while p stays relatively accurate in the tail. The backward reuses the exponential for
phi(z) = exp(-z*z/2) / sqrt(2 pi).

Run: python scripts/fit_gelu_phi.py  (prints C and Q for each degree, and the maximum relative
error of Phi evaluated in float32 arithmetic like the kernels). The kernels hold degree 6 for
fp16/bf16 outputs and degree 8 for fp32 (triton_kernels/layernorm_gelu_common.py,
csrc/layernorm_gelu/kernels.cuh).
"""

from __future__ import annotations

import numpy as np
from scipy.special import erfc, erfcx

SQRT2 = np.sqrt(2.0)


def fit(c: float, degree: int, iters: int = 60) -> tuple[float, np.ndarray]:
    """Q minimizing max |t Q(t) / erfcx(u) - 1| over t in (0, 1], u = (1/t - 1) / c."""
    n = 20000
    t = np.clip(0.5 - 0.5 * np.cos(np.pi * (np.arange(n) + 0.5) / n), 1e-7, 1.0)
    g = erfcx((1.0 / t - 1.0) / c) / t
    basis = np.vander(t, degree + 1, increasing=True)
    w = np.ones(n)
    best = (np.inf, None)
    for _ in range(iters):
        coef, *_ = np.linalg.lstsq(basis * (w / g)[:, None], w, rcond=None)
        r = basis @ coef / g - 1.0
        m = np.abs(r).max()
        if m < best[0]:
            best = (m, coef)
        w = w * (np.abs(r) / m + 0.05)
        w /= w.mean()
    return best


def kernel_constants(c: float, coef: np.ndarray) -> tuple[float, np.ndarray]:
    """In terms of a = |z| (not u = a / sqrt 2), with the 1/2 of Phi folded into Q."""
    return c / SQRT2, 0.5 * coef


def phi_fp32(z: np.ndarray, big_c: float, q: np.ndarray) -> np.ndarray:
    """Phi(z) evaluated in float32 step by step like the kernels."""
    f = np.float32
    z = z.astype(f)
    a = np.abs(z)
    t = f(1.0) / (f(1.0) + f(big_c) * a)
    acc = np.full_like(t, f(q[-1]))
    for k in q[-2::-1]:
        acc = acc * t + f(k)
    p = (acc * t) * np.exp2(z * (z * f(-0.5 / np.log(2.0))))
    return np.where(z > 0, f(1.0) - p, p)


def main() -> None:
    z = np.linspace(-9.0, 9.0, 720001)
    ref = 0.5 * erfc(-z / SQRT2)
    for degree in range(5, 10):
        fits = [(*fit(c, degree), c) for c in np.arange(0.30, 1.30, 0.05)]
        m, coef, c = min(fits, key=lambda r: r[0])
        big_c, q = kernel_constants(c, coef)
        err = np.abs(phi_fp32(z, big_c, q) / ref - 1.0)
        print(f"degree {degree}: fit {m:.1e}; fp32 Phi max rel err {err.max():.1e} "
              f"(z >= -6: {err[z >= -6].max():.1e})")
        print(f"  C = {big_c!r}")
        print("  Q (t^0 first) = [" + ", ".join(f"{v:.9e}" for v in q) + "]")


if __name__ == "__main__":
    main()
