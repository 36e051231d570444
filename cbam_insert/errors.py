"""The package's own error type: everything a user can get wrong raises ``CBAMInsertError``."""

from __future__ import annotations

import importlib.util
import re
import unicodedata

__all__ = ["CBAMInsertError", "escape", "first_line", "require"]


class CBAMInsertError(Exception):
    """A mistake in what the user asked for: the message says what to do instead.

    The CLI prints the message as one line on stderr and exits with status 1.
    """


def first_line(exc: BaseException) -> str:
    """The line of an exception's message that says what went wrong, without terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    _, marker, reason = text.partition("WeightsUnpickler error:")  # torch.load's long weights-only message
    lines = (reason.split(". Please use")[0] if marker else text).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def require(module: str, purpose: str) -> None:
    """Raise a one-line error naming the extra to install when an optional package is missing."""
    if importlib.util.find_spec(module) is None:
        raise CBAMInsertError(f"{purpose} needs the {module} package: pip install 'cbam-insert[export]'")


def escape(text: object, limit: int = 200) -> str:
    """``text`` with every control, format (bidi) and non-printable character escaped, shortened."""
    s = str(text)
    out = []
    for ch in s[:limit]:
        if ch.isprintable() and unicodedata.category(ch) not in ("Cf", "Cs", "Co"):
            out.append(ch)
        else:
            out.append(ascii(ch)[1:-1])
    return "".join(out) + ("…" if len(s) > limit else "")
