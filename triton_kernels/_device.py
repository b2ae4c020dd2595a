"""Facts about a CUDA device that the launchers ask on every call, read once per device
(torch.cuda.get_device_properties costs microseconds of host time per call; every op's
launcher asks at least once per call)."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch


class DeviceFacts(NamedTuple):
    major: int
    minor: int
    sms: int
    smem_per_block_optin: int  # bytes
    smem_per_sm: int  # bytes


@functools.lru_cache(maxsize=None)
def _facts_of(index: int) -> DeviceFacts:
    p = torch.cuda.get_device_properties(index)
    return DeviceFacts(p.major, p.minor, p.multi_processor_count,
                       p.shared_memory_per_block_optin, p.shared_memory_per_multiprocessor)


def cuda_facts(device: torch.device) -> DeviceFacts:
    """Facts of a CUDA device (the current one when the device has no index)."""
    return _facts_of(device.index if device.index is not None else torch.cuda.current_device())
