"""The one base class of nerbatch's expected errors.

Anything raised as a `NerbatchError` is the user's to fix (bad data, a wrong model, an option out of
range); its message names the file, row, key or model at fault, and the command line prints it as one
line with exit status 1. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class NerbatchError(Exception):
    """A user error: the message says what is wrong and what to do."""


class OptionError(NerbatchError):
    """An option value that cannot work (a stride longer than half a window, an unknown choice)."""
