"""The base class of every user-facing error: the CLI prints its message as one line.

The bottom layer: it imports nothing from the package, so every layer (the pure ones included)
may raise a ``UserError``.
"""


class UserError(ValueError):
    """Bad input from the user (config, data, paths); the message says what to fix."""


# The exit status of a run stopped by a preemption notice after writing its checkpoint; the SLURM
# script requeues the job on it (75 is EX_TEMPFAIL: try again later).
REQUEUE_EXIT_CODE = 75


class Preempted(Exception):
    """The run stopped at a step boundary on a preemption notice, with a complete checkpoint:
    not a failure, so the CLI exits with ``REQUEUE_EXIT_CODE`` and one line."""


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an error's message (or its type), for one-line reports; ``limit``
    cuts a third-party message that packs everything into one very long line."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
