"""Plain-text spellings the CLI prints: sizes, counts, ages, times, numbers, publishers and watch events.

>>> size(5120), plural(1, "tensor"), age(75)
('5.0 KiB', '1 tensor', '1m15s')
"""

from __future__ import annotations

import json
import time
from typing import Any

__all__ = ["age", "compact_json", "describe_event", "number", "plural", "publisher_name", "size", "when"]


def size(n: int | None) -> str:
    """Bytes in binary units (``512 B``, ``1.5 MiB``); ``-`` for None."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def plural(count: int, word: str) -> str:
    """``1 tensor``, ``2 tensors``."""
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def age(seconds: float | None) -> str:
    """A duration in its two largest units (``4.2s``, ``6m40s``, ``1h23m``, ``2d03h``); ``-`` for None."""
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def when(ts: float | None) -> str:
    """A Unix time as local ``YYYY-MM-DD HH:MM:SS``; ``-`` for None."""
    return "-" if ts is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def compact_json(data: Any, limit: int = 60) -> str:
    """``data`` as one line of JSON, cut to ``limit`` characters with an ellipsis; empty for empty data."""
    if not data:
        return ""
    text = json.dumps(data, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def publisher_name(publisher: dict[str, Any]) -> str:
    """A manifest's publisher: its id, else ``host:pid``; ``-`` when unknown."""
    return str(publisher.get("id") or (f"{publisher.get('host')}:{publisher.get('pid')}" if publisher else "-"))


def number(x: Any) -> str:
    """A statistic in four significant digits; strings (``nan``, ``inf``) as they are; ``-`` for None."""
    if x is None:
        return "-"
    if isinstance(x, str):
        return x
    return f"{x:.4g}"


def describe_event(e: dict[str, Any]) -> str:
    """One line for an event of :meth:`redisbus.busview.BusView.watch`, stamped with its local time."""
    stamp = time.strftime("%H:%M:%S", time.localtime(e["time"]))
    kind = e["event"]
    if kind == "version":
        if "error" in e:
            return f"{stamp}  v{e['version']} committed ({e['error']})"
        meta = f"  {compact_json(e.get('metadata'))}" if e.get("metadata") else ""
        return (f"{stamp}  v{e['version']} committed  ({size(e['total_bytes'])}, {plural(e['tensors'], 'tensor')}, "
                f"by {publisher_name(e.get('publisher') or {})}){meta}")
    if kind == "applied":
        was = f"was v{e['previous']}" if e.get("previous") is not None else "first"
        lag = e.get("lag")
        lag = f", {lag} behind" if lag and lag > 0 else f", {-lag} ahead of latest" if lag and lag < 0 else ""
        return f"{stamp}  {e['worker']} applied v{e['version']} ({was}{lag})"
    if kind == "joined":
        return f"{stamp}  {e['worker']} joined ({e['host']} pid {e['pid']}), nothing applied yet"
    if kind == "dead":
        return f"{stamp}  {e['worker']} is DEAD (no heartbeat for {age(e['heartbeat_age'])})"
    if kind == "alive":
        return f"{stamp}  {e['worker']} is alive again"
    if kind == "pin":
        if e["version"] is None:
            return f"{stamp}  unpinned (was v{e['previous']})"
        return f"{stamp}  pinned at v{e['version']}"
    return f"{stamp}  {json.dumps(e, default=str)}"  # pragma: no cover
