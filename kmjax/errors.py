"""The errors a user can fix, as one family.

Every error that says "your input is wrong, here is how to fix it" (a bad argument, config, data
set, saved file or run folder) is a ``KmjaxError``; the command line turns exactly these into exit
code 2 with the message. Anything else that escapes is a bug (exit 1, with its traceback), even a
plain ``ValueError`` raised inside NumPy or JAX. Each member also derives from the built-in error
it used to be, so ``except ValueError`` in existing code keeps working.
"""

from __future__ import annotations

__all__ = ["KmjaxError", "InputError", "InputTypeError", "ConfigError", "DataError", "FileFormatError", "ChecksumError", "RunError"]


class KmjaxError(Exception):
    """Something the user can fix; the message says what was wrong and how to fix it."""


class InputError(KmjaxError, ValueError):
    """A bad argument value given to a kmjax function (shape, range, choice, finiteness)."""


class InputTypeError(KmjaxError, TypeError):
    """An argument of the wrong type given to a kmjax function (or a traced value to a host-level one)."""


class ConfigError(KmjaxError, ValueError):
    """A config file or override that cannot be used; the message says which key and why."""


class DataError(KmjaxError):
    """A problem with a data set's files; the message names the file and how to fix it."""


class FileFormatError(KmjaxError, ValueError):
    """A file that is not the kmjax artifact it should be (or fails its checksum); the message names
    the file and the problem."""


class ChecksumError(FileFormatError):
    """A file whose bytes do not match the checksums kmjax wrote with it (changed on disk, damaged,
    or without checksums where they are required): never read as if it were what was saved."""


class RunError(KmjaxError, ValueError):
    """A run folder, stage folder or checkpoint that cannot be used as asked; the message says why
    and what to do."""
