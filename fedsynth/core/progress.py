"""The one progress protocol: how far a long step has got, for a bar the CLI draws."""

from __future__ import annotations

from typing import Protocol

__all__ = ["Progress"]


class Progress(Protocol):
    """Called as a long step goes on: ``done`` of ``total`` units, and, where a caller
    runs several steps, which one (``stage``). Library code never prints; the CLI
    renders these calls with rich."""

    def __call__(self, done: int, total: int, stage: str = "") -> None: ...
