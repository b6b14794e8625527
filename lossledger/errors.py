"""The one exception hierarchy of lossledger.

Every error raised on purpose is a :class:`LedgerError` and also the builtin a caller would expect
(``KeyError`` for an unknown id, ``ValueError`` for a bad value ...), so both ``except LedgerError`` and
``except ValueError`` work. Messages say what was wrong and what to do about it.
"""

from __future__ import annotations


class LedgerError(Exception):
    """Base class of every error lossledger raises on purpose."""


class LedgerWarning(UserWarning):
    """Something was discarded or looks wrong, but nothing failed."""


class LedgerNotFoundError(LedgerError, FileNotFoundError):
    """There is no ledger at the path."""


class LedgerExistsError(LedgerError, FileExistsError):
    """A ledger (or other data) is already at the path being created."""


class NotALedgerError(LedgerError, ValueError):
    """The path holds something that is not a lossledger store."""


class FormatVersionError(LedgerError, ValueError):
    """The ledger was written by a newer format version than this library reads."""


class CorruptLedgerError(LedgerError, ValueError):
    """A ledger's metadata is missing or unreadable."""


class ReadOnlyError(LedgerError, PermissionError):
    """A write was attempted on a ledger opened with mode ``"r"``."""


class RunLockedError(LedgerError, BlockingIOError):
    """Another writer holds the run."""


class RunClosedError(LedgerError, RuntimeError):
    """The run was closed; open it again with ``ledger.run(name)``."""


class InvalidNameError(LedgerError, ValueError):
    """A run or stream name is not a safe identifier."""


class InvalidDTypeError(LedgerError, TypeError):
    """Values or ids have a dtype lossledger cannot store (complex, strings, objects ...)."""


class ShapeMismatchError(LedgerError, ValueError):
    """Lengths or element shapes do not agree."""


class NonFiniteValueError(LedgerError, ValueError):
    """A logged value is NaN or infinite and the run does not allow that."""


class DuplicateSampleError(LedgerError, ValueError):
    """The same sample id was logged twice in one tick of one stream."""


class OutputPathError(LedgerError, FileNotFoundError):
    """A file to write (an export) cannot go where asked: its folder is missing, or the path is a folder."""


class InputPathError(LedgerError, FileNotFoundError):
    """A file to read (images for a report, a dataset) does not exist."""


class AdapterError(LedgerError, ValueError):
    """A framework adapter was set up wrongly (no run on the writing rank, an unknown layer, a resume mismatch)."""


class MissingDependencyError(LedgerError, ImportError):
    """An optional package a feature needs is not installed (the message names the extra that installs it)."""


class _KeyErrorMessage(KeyError):
    # KeyError.__str__ quotes its argument; show the message as written.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownSampleError(LedgerError, _KeyErrorMessage):
    """A sample id is not in the ledger (or outside ``0..n_samples-1``)."""


class UnknownRunError(LedgerError, _KeyErrorMessage):
    """No run of that name exists in the ledger."""


class UnknownStreamError(LedgerError, _KeyErrorMessage):
    """The run has no committed stream of that name."""


__all__ = [
    "AdapterError",
    "CorruptLedgerError",
    "DuplicateSampleError",
    "FormatVersionError",
    "InputPathError",
    "InvalidDTypeError",
    "InvalidNameError",
    "LedgerError",
    "LedgerExistsError",
    "LedgerNotFoundError",
    "LedgerWarning",
    "MissingDependencyError",
    "NonFiniteValueError",
    "NotALedgerError",
    "OutputPathError",
    "ReadOnlyError",
    "RunClosedError",
    "RunLockedError",
    "ShapeMismatchError",
    "UnknownRunError",
    "UnknownSampleError",
    "UnknownStreamError",
]
