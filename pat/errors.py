"""The one exception type a user of pat is meant to see."""

from __future__ import annotations

__all__ = ["PatError", "check", "first_line"]


class PatError(ValueError):
    """Bad input or state that the user can fix.

    The message is one line that names the argument and the value, e.g.
    ``sparsity must be in [0, 1). Got 1.5.`` The CLI prints it and exits with code 2;
    any other exception is a bug in pat.
    """


def check(condition: object, message: str) -> None:
    """Raise :class:`PatError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise PatError(message)


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name if it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
