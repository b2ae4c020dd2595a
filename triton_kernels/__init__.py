"""Triton kernels and their launchers, one module per op (installed as deepkern.triton_kernels).
Modules are imported lazily by deepkern.ops so that importing deepkern does not import Triton."""
