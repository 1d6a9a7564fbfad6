"""The one exception type users see: a clear message, no traceback (the CLI prints it)."""


class SaexportError(Exception):
    """Bad input or a mismatch between artifacts; the message says what and how to fix it."""
