"""The read-only view of a zip archive that format readers are given.

The concrete, capped implementation lives in :mod:`biasinspect.readers.safe_zip`; readers of
torch-zip flavours (checkpoint, TorchScript, torch.export) depend only on this protocol.
"""

from __future__ import annotations

from typing import Protocol


class Archive(Protocol):
    """Member names and capped reads; never extracts anything to disk."""

    def names(self) -> list[str]:
        """All member names, in central-directory order."""
        ...

    def size(self, name: str) -> int:
        """Declared uncompressed size of a member (KeyError if absent)."""
        ...

    def read(self, name: str, limit: int) -> bytes:
        """Decompress one member; raise ResourceLimitError past ``limit`` bytes or the archive caps."""
        ...
