"""Errors of the offline tools; the CLIs print them as one line and exit nonzero."""


class InputError(ValueError):
    """A problem with the user's inputs or options; the message names the input and the fix."""
