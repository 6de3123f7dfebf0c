"""The error type every part raises for a problem the user can fix; the CLI prints it as one line."""


class LookalikeError(Exception):
    """A problem with the user's input or setup, explained in one sentence (no traceback needed)."""
