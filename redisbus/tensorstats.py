"""Statistics of one tensor, and how two tensors (or two whole versions) differ, in bounded memory.

Both work slice by slice in float64 on any allowed dtype (bool and integers
as numbers, complex over magnitudes or parts), so a large tensor never needs
a full float64 copy.

>>> s = tensor_stats(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
>>> (s.min, s.max, s.mean, s.nan, s.inf)
(1.0, 3.0, 2.0, 1, 1)
"""

from __future__ import annotations

import math

import torch

from .buffers import HostBuffer
from .records import DiffResult, TensorDiff, TensorStats
from .wire import Manifest, TensorEntry, format_key

__all__ = ["STATS_SLICE", "diff_versions", "tensor_diff", "tensor_stats"]

#: Elements per slice when computing statistics (bounds the float64 scratch memory).
STATS_SLICE = 1 << 22


def tensor_stats(tensor: torch.Tensor) -> TensorStats:
    """Min, max, mean and L2 norm over the finite elements, and NaN / Inf counts.

    Works on any allowed dtype (bool and integers as numbers, complex over
    magnitudes), slice by slice in float64, so memory stays bounded.

    Args:
        tensor: a CPU tensor of any shape.

    Returns:
        The statistics; ``min``, ``max`` and ``mean`` are None without a finite element.

    >>> tensor_stats(torch.tensor([3, 4])).norm
    5.0
    """
    flat = tensor.reshape(-1)
    if flat.is_complex():
        flat = flat.abs()
    n = flat.numel()
    lo, hi, total, squares, finite, nans, infs = math.inf, -math.inf, 0.0, 0.0, 0, 0, 0
    for start in range(0, n, STATS_SLICE):
        x = flat[start : start + STATS_SLICE].to(torch.float64)
        ok = torch.isfinite(x)
        nan_count = int(torch.isnan(x).sum())
        good = x[ok]
        nans += nan_count
        infs += x.numel() - good.numel() - nan_count
        if good.numel():
            finite += good.numel()
            lo = min(lo, float(good.min()))
            hi = max(hi, float(good.max()))
            total += float(good.sum())
            squares += float((good * good).sum())
    return TensorStats(
        numel=n,
        finite=finite,
        nan=nans,
        inf=infs,
        min=lo if finite else None,
        max=hi if finite else None,
        mean=total / finite if finite else None,
        norm=math.sqrt(squares),
    )


def tensor_diff(key: str, old: TensorEntry, new: TensorEntry, a: torch.Tensor, b: torch.Tensor) -> TensorDiff:
    """How tensor ``key`` changed from ``a`` (described by ``old``) to ``b`` (described by ``new``).

    NaN where both have NaN counts as unchanged; a complex element changed
    when either part did.

    >>> e = TensorEntry(("w",), "float32", (2,), 0, 8)
    >>> tensor_diff("w", e, e, torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])).elements_changed
    1
    """
    base = {"key": key, "old_dtype": old.dtype, "new_dtype": new.dtype, "old_shape": list(old.shape), "new_shape": list(new.shape)}
    if old.dtype != new.dtype:
        return TensorDiff(change="dtype", **base)
    if old.shape != new.shape:
        return TensorDiff(change="shape", **base)
    if torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)):
        return TensorDiff(change="unchanged", elements_changed=0, max_abs=0.0, rel_l2=0.0, **base)
    fa, fb = a.reshape(-1), b.reshape(-1)
    changed, max_abs, diff_sq, base_sq = 0, 0.0, 0.0, 0.0
    for start in range(0, fa.numel(), STATS_SLICE):
        x, y = fa[start : start + STATS_SLICE], fb[start : start + STATS_SLICE]
        if x.is_complex():
            x, y = torch.view_as_real(x), torch.view_as_real(y)
        x, y = x.to(torch.float64), y.to(torch.float64)
        d = (x - y).abs()
        same = (x == y) | (torch.isnan(x) & torch.isnan(y))
        if d.dim() > 1:  # complex: an element changed when either part did
            same = same.all(dim=-1)
        changed += int((~same).sum())
        d = torch.where(torch.isnan(x) & torch.isnan(y), torch.zeros_like(d), d)
        if d.numel():
            max_abs = max(max_abs, float(d.max()))
        diff_sq += float((d * d).sum())
        base_sq += float((x * x).sum())
    if base_sq > 0:
        rel = math.sqrt(diff_sq) / math.sqrt(base_sq)
    else:
        rel = 0.0 if diff_sq == 0 else math.inf
    return TensorDiff(change="changed", elements_changed=changed, max_abs=max_abs, rel_l2=rel, **base)


def diff_versions(old: Manifest, old_blob: HostBuffer, new: Manifest, new_blob: HostBuffer) -> DiffResult:
    """Compare two pulled versions tensor by tensor, matching tensors by their dotted names.

    Args:
        old: the older version's manifest; ``old_blob`` holds its bytes.
        new: the newer version's manifest; ``new_blob`` holds its bytes.

    Returns:
        One :class:`TensorDiff` per name in either version, sorted by name.
    """
    before = {format_key(e.key): e for e in old.tensors}
    after = {format_key(e.key): e for e in new.tensors}
    rows = []
    for key in sorted(before.keys() | after.keys()):
        a, b = before.get(key), after.get(key)
        if a is None:
            rows.append(TensorDiff(key, "added", None, b.dtype, None, list(b.shape)))  # type: ignore[union-attr]
        elif b is None:
            rows.append(TensorDiff(key, "removed", a.dtype, None, list(a.shape), None))
        else:
            rows.append(tensor_diff(key, a, b, old_blob.view(a), new_blob.view(b)))
    return DiffResult(old.version, new.version, rows)
