"""How an expected user error ends: one line on stderr naming the problem and the fix, exit code
2, no traceback. Anything else (a bug) still raises with its traceback.

Used by the ``moe-empathy`` command (:mod:`moe_empathy.cli`) and by the entry points that run
without it (``python -m moe_empathy.train.trainer`` under ``accelerate launch``).
"""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Callable

__all__ = ["USER_ERRORS", "report_user_error", "run_command"]

# Exceptions that report a user's mistake (their message names the file or key and the fix);
# train.config.ConfigError is a ValueError.
USER_ERRORS = (
    FileExistsError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError,
)


def report_user_error(err: BaseException) -> int:
    """Prints ``err`` as one line on stderr.

    Args:
        err: the user's error.

    Returns:
        The exit code, 2.
    """
    print(f"moe-empathy: error: {' '.join(str(err).split()) or type(err).__name__}", file=sys.stderr)
    return 2


def run_command(func: Callable[[argparse.Namespace], object], args: argparse.Namespace) -> int:
    """Runs ``func(args)``; a user error ends as one line on stderr, Ctrl-C as a short note.

    Args:
        func: the command's function.
        args: its parsed arguments.

    Returns:
        The exit code: 0, 2 for a user error, 130 for Ctrl-C.
    """
    try:
        func(args)
    except USER_ERRORS as err:
        return report_user_error(err)
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT):  # a full disk is the user's to fix; other OS errors are bugs
            raise
        return report_user_error(err)
    except KeyboardInterrupt:
        print("moe-empathy: interrupted (Ctrl-C)", file=sys.stderr)
        return 130
    return 0
