"""The package's own error type: everything a user can get wrong raises ``CBAMInsertError``."""

from __future__ import annotations

__all__ = ["CBAMInsertError"]


class CBAMInsertError(Exception):
    """A mistake in what the user asked for: the message says what to do instead.

    The CLI prints the message as one line on stderr and exits with status 1.
    """
