"""The one exception type users see."""


class DbquantError(Exception):
    """A user-facing error: one clear message naming the problem and what to do.

    The CLI prints it without a traceback; anything else that escapes is a bug.
    """
