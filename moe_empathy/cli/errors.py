"""How ``moe-empathy`` reports a user's mistake: one line on stderr naming the problem and the
fix, exit code 2, no traceback (:mod:`moe_empathy.errors`, shared with the entry points that run
without this package); a command line that argparse refuses ends the same way."""

from __future__ import annotations

import argparse

# The package imports these two from here (the command line's error handling in one place).
from moe_empathy.errors import report_user_error, run_command

__all__ = ["ArgumentParser", "UsageError", "report_user_error", "run_command"]


class UsageError(Exception):
    """A command line that argparse refuses (unknown flag, bad value, missing argument)."""


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser whose errors raise :class:`UsageError` (one line, pointing at ``--help``)
    instead of printing the usage block and exiting; its sub-parsers are of this class too."""

    def error(self, message: str):
        raise UsageError(f"{message}; see `{self.prog} --help`")
