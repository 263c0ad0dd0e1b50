"""Small helpers shared by the bus tests: policies with every dtype, snapshots, polling."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from tensordict import TensorDict, TensorDictBase


def make_policy(seed: int = 0) -> TensorDict:
    """A nested TensorDict with float, half, bfloat16, integer and bool leaves."""
    g = torch.Generator().manual_seed(seed)
    return TensorDict(
        {
            "actor": {
                "w": torch.randn(16, 8, generator=g),
                "b": torch.randn(8, generator=g).to(torch.float16),
                "norm": {"scale": torch.randn(8, generator=g).to(torch.bfloat16)},
            },
            "steps": torch.randint(0, 2**40, (3,), generator=g),
            "mask": torch.rand(5, generator=g) > 0.5,
            "codes": torch.randint(0, 255, (7,), generator=g).to(torch.uint8),
            "scalar": torch.tensor(float(seed)),
            "empty": torch.zeros(0, 4),
        },
        batch_size=[],
    )


def zeros_like_policy() -> TensorDict:
    return make_policy(0).apply(torch.zeros_like)


def snapshot(td: TensorDictBase) -> TensorDict:
    return td.clone()


def bit_identical(a: TensorDictBase, b: TensorDictBase) -> bool:
    """Every leaf equal bit for bit (NaN-safe: compares raw bytes)."""
    ka = sorted(a.keys(include_nested=True, leaves_only=True), key=str)
    kb = sorted(b.keys(include_nested=True, leaves_only=True), key=str)
    if ka != kb:
        return False
    for k in ka:
        x, y = a[k], b[k]
        if x.dtype != y.dtype or x.shape != y.shape:
            return False
        if not torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8)):
            return False
    return True


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
