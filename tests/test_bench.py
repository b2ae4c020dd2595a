"""The bench harness's CUDA-graph timing (bench/harness.py: graphed, time_graph_ms)."""

import pytest
import torch


@pytest.mark.cuda
def test_graphed_replay_reruns_the_work_and_times_it():
    from deepkern.bench.harness import graphed, time_graph_ms

    x = torch.randn(1 << 20, device="cuda")
    out = torch.empty_like(x)
    replay = graphed(lambda: torch.mul(x, 2.0, out=out))
    out.fill_(float("nan"))
    x.copy_(torch.randn_like(x))  # the replay reads x's memory now, not a captured copy
    replay()
    torch.cuda.synchronize()
    assert torch.equal(out, x * 2.0)
    ms = time_graph_ms(lambda: torch.mul(x, 2.0, out=out), rep_ms=20, rounds=1)
    assert 0.0 < ms < 10.0
