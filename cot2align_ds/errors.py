"""The base class of every user-facing error: the CLI prints its message as one line.

The bottom layer: it imports nothing from the package, so every layer (the pure ones included)
may raise a ``UserError``.
"""


class UserError(ValueError):
    """Bad input from the user (config, data, paths); the message says what to fix."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (or its type), for one-line reports; ``limit``
    cuts a third-party message that packs everything into one very long line."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
