"""What the package says about bad input: one exception type and one warning type.

`InputError` is raised with a one-line message that names the problem and the fix; the CLI
prints it and exits with code 2 (no traceback). `FateZeroWarning` marks input the official code
accepts silently but that probably is not what the user meant.
"""
import warnings


class InputError(ValueError):
    """Bad user input: a missing file, a wrong size, an unknown option value."""


class FateZeroWarning(UserWarning):
    """Input the official code accepts silently but that probably is not what the user meant."""


def warn_fatezero(message: str) -> None:
    warnings.warn(message, FateZeroWarning, stacklevel=3)
