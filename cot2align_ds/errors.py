"""The base class of every user-facing error: the CLI prints its message as one line."""


class UserError(ValueError):
    """Bad input from the user (config, data, paths); the message says what to fix."""


def user_error_types() -> tuple[type[Exception], ...]:
    """UserError plus the errors of the pure layers, which may not import this module."""
    from cot2align_ds.alignment.offsets import TokenizerError

    return (UserError, TokenizerError)
