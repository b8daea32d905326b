"""The base class of every user-facing error: the CLI prints its message as one line."""


class UserError(ValueError):
    """Bad input from the user (config, data, paths); the message says what to fix."""
