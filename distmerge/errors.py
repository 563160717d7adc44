"""User-facing errors. Each one names what is wrong (file, tensor, value) and how to fix it.

They subclass ValueError (bad input) or OSError (storage), so callers can catch broad families, and
the CLI prints them without a traceback.
"""

from __future__ import annotations


class DistmergeError(Exception):
    """Base of every error distmerge raises on purpose for a user to read."""


class StorageError(DistmergeError, OSError):
    """A URL cannot be read or written: missing, unreachable, permission denied, bad range."""


class CheckpointError(DistmergeError, ValueError):
    """A checkpoint is malformed or unsupported. The message names the file, the tensor and the fix."""

    def __init__(self, message: str, *, file: str | None = None, tensor: str | None = None, fix: str = ""):
        where = []
        if file:
            where.append(f"file {file}")
        if tensor:
            where.append(f"tensor {tensor!r}")
        prefix = f"{', '.join(where)}: " if where else ""
        suffix = f" Fix: {fix}" if fix else ""
        super().__init__(f"{prefix}{message}.{suffix}")
        self.file = file
        self.tensor = tensor
        self.fix = fix


class RecipeError(DistmergeError, ValueError):
    """A recipe or run option is invalid. The message names the field, the bad value and the fix."""


class MergeError(DistmergeError, ValueError):
    """Inputs cannot be merged together (names, shapes or dtypes disagree)."""
