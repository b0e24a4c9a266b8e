"""The one exception type for bad user input.

Raised with a one-line message that names the problem and the fix; the CLI prints it and
exits with code 2 (no traceback).
"""


class InputError(ValueError):
    """Bad user input: a missing file, a wrong size, an unknown option value."""
