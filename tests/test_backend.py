"""Backend choice (deepkern._backend): explicit, env default, auto, and clear refusals."""

import pytest
import torch

import deepkern
from deepkern import _backend


def test_requested_values(monkeypatch):
    monkeypatch.delenv("DEEPKERN_BACKEND", raising=False)
    assert _backend.requested(None) == "auto"
    for name in ("auto", "cuda", "triton", "torch"):
        assert _backend.requested(name) == name
    with pytest.raises(ValueError, match="backend='gpu'"):
        _backend.requested("gpu")
    monkeypatch.setenv("DEEPKERN_BACKEND", "torch")
    assert _backend.requested(None) == "torch"
    monkeypatch.setenv("DEEPKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"\$DEEPKERN_BACKEND='fast'"):
        _backend.requested(None)


def test_choose():
    reasons = {"cuda": "no GPU", "triton": None, "torch": None}
    assert _backend.choose("op", "auto", reasons, ("cuda", "triton", "torch")) == "triton"
    assert _backend.choose("op", "torch", reasons, ("cuda", "triton")) == "torch"
    with pytest.raises(deepkern.BackendUnavailableError, match="op: backend 'cuda' cannot serve this call: no GPU"):
        _backend.choose("op", "cuda", reasons, ("cuda",))
    assert _backend.choose("op", "auto", {"cuda": "x", "triton": "y", "torch": None}, ("cuda", "triton")) == "torch"


def test_env_default_is_explicit(monkeypatch):
    monkeypatch.setenv("DEEPKERN_BACKEND", "cuda")
    with pytest.raises(deepkern.BackendUnavailableError, match="cuda"):
        deepkern.layernorm_gelu(torch.randn(2, 8))
    monkeypatch.setenv("DEEPKERN_BACKEND", "torch")
    assert deepkern.layernorm_gelu(torch.randn(2, 8)).shape == (2, 8)


def test_auto_on_cpu_uses_torch(monkeypatch):
    monkeypatch.delenv("DEEPKERN_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reasons = _backend.device_reasons(torch.device("cpu"))
    assert reasons["torch"] is None and reasons["cuda"] is not None and reasons["triton"] is not None


def test_availability_lists_every_op():
    table = _backend.availability(torch.device("cpu"))
    assert "layernorm_gelu" in table
    assert set(table["layernorm_gelu"]) == {"cuda", "triton", "torch"}
