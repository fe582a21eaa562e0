"""The errors a user can cause, kept apart from bugs.

Every check of user input (a config value, a file, a size that cannot fit in memory) raises a
``UserError``; the command line prints such errors as one line ``error: …`` and exits with status 2
(``sparse_elbo.cli``). Anything else is a bug and keeps its traceback. Each class also derives from the
built-in exception a caller would expect (``ValueError`` for a bad value, ``FileNotFoundError`` for a
missing file, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input: the message names the config key, the value and what is allowed."""


class ConfigError(UserError, ValueError):
    """A config value (or a value in a user's file) that is not allowed. ``key``: the argument the message
    starts with, when it names one; ``under(path)`` names it by its place in the config instead."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key

    def under(self, path: str) -> ConfigError:
        """The same error naming ``path.key`` (``trainer.max_epochs``) instead of ``key`` (``max_epochs``)."""
        message = str(self)
        if not path or self.key is None or not message.startswith(self.key):
            return self
        return ConfigError(f"{path}.{message}", key=f"{path}.{self.key}")


class ConfigKeyError(UserError, KeyError):
    """A key (a config key, or a variable in a user's file) that does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder named in the config that does not exist."""


class UnreadableFileError(UserError, OSError):
    """A file that exists but cannot be read: one a run is still writing, or a damaged one."""


class MissingExtraError(UserError, ImportError):
    """A tool whose optional dependencies are not installed: the message names the extra to install."""


class InsufficientMemoryError(UserError, MemoryError):
    """A run whose arrays cannot fit in the memory of its device, found before allocating them."""


class ExistingFileError(UserError, FileExistsError):
    """An output file that already exists: a run never overwrites another."""


def reason(error: BaseException) -> str:
    """The first line of a library's message (e.g. imageio's list of plugins that might read a file), for a
    one-line user error that quotes why a file could not be read."""
    lines = str(error).strip().splitlines()
    return lines[0].strip() if lines else type(error).__name__
