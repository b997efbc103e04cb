"""The user's errors, apart from the library's bugs: what the commands print as one line.

A `UserError` is the input's or the environment's (a flag, a setting, a file, the disk, a
signal); the commands print its message as one line and exit 2 (a Fault: its own status). Any
other exception is a bug and shows its traceback. `InputError` is a bad value the user gave
(a ValueError as well, so `except ValueError` keeps catching it).
"""
from __future__ import annotations

import importlib
from types import ModuleType


class UserError(Exception):
  """A failure of the input or the environment: one line, no traceback, exit status 2."""


class InputError(UserError, ValueError):
  """A bad value given by the user: a flag, a setting, a file's content, a name."""


def optional(module: str, extra: str, needed_for: str) -> ModuleType:
  """Import an optional dependency; without it, a UserError naming the extra that installs it."""
  try:
    return importlib.import_module(module)
  except ModuleNotFoundError as e:
    raise UserError(f"{needed_for} needs {e.name}, which is not installed: pip install -e .[{extra}]"
                    ) from None
