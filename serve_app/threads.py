"""Torch thread count inside a replica: explicit, or the replica's CPU allotment (at least 1)."""
from __future__ import annotations

import ray
import torch


def set_torch_threads(n: int | None) -> int:
    if n is None:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        n = max(1, int(round(cpus)))
    torch.set_num_threads(n)
    return n
