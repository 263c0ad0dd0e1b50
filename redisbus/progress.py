"""Progress reporting of long transfers: the protocol the operator API calls, and a silent default.

>>> class Printer:
...     def start(self, description: str, total: int) -> None:
...         print(description, total)
...     def advance(self, amount: int) -> None:
...         pass
>>> report: Progress = Printer()
>>> report.start("reading v7", 1024)
reading v7 1024
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["NoProgress", "Progress"]


class Progress(Protocol):
    """Receives progress of a long transfer (the CLI draws a bar from it)."""

    def start(self, description: str, total: int) -> None:
        """A transfer of ``total`` bytes begins."""

    def advance(self, amount: int) -> None:
        """``amount`` more bytes are done."""


class NoProgress:
    """A :class:`Progress` that reports nothing (the default when the caller passes none)."""

    def start(self, description: str, total: int) -> None:
        pass

    def advance(self, amount: int) -> None:
        pass
