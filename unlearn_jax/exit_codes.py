"""Exit codes of every unlearn-jax command and tool, so that a job scheduler can tell outcomes apart.

    0    OK               the command did what was asked (a run completed, an export was written)
    1    FAILURE          an unexpected error: a bug, reported with a traceback
    2    USER_ERROR       a mistake the user can fix (UnlearnError: bad value, bad path, an output that
                          would replace something not ours, ...), one line on stderr; argparse's own
                          usage errors exit 2 too
    3    NON_FINITE_LOSS  training stopped on a NaN/inf loss; the last verified checkpoint is kept
    4    CHECKPOINT_CORRUPT  no checkpoint of the run passes its checksums and the run cannot resume
    74   IO_ERROR         the machine failed a read or write: disk full, quota, I/O error (sysexits EX_IOERR)
    75   WORKDIR_LOCKED   another live run holds the workdir's lock: retry later (sysexits EX_TEMPFAIL)
    130  SIGINT           stopped by Ctrl-C (128 + 2)
    143  SIGTERM          stopped by SIGTERM after saving a checkpoint (128 + 15): rerun the same
                          command to resume; a scheduler must not read this as success

A signal ending a run is reported the shell's way, 128 + the signal number (`signal_exit_code`).
An exception may carry its own code as an `exit_code` attribute (`for_exception` reads it), so that
the error classes of other modules need no entry here.
"""
from __future__ import annotations

import errno
import signal

OK = 0
FAILURE = 1
USER_ERROR = 2
NON_FINITE_LOSS = 3
CHECKPOINT_CORRUPT = 4
IO_ERROR = 74
WORKDIR_LOCKED = 75
SIGINT = 128 + signal.SIGINT
SIGTERM = 128 + signal.SIGTERM

# OS errors the machine causes (not the user's paths or permissions).
_MACHINE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO}


def signal_exit_code(signum: int) -> int:
    """128 + the signal number: the code a shell reports for a process ended by that signal."""
    return 128 + int(signum)


def for_exception(e: BaseException) -> int:
    """The exit code for an exception that ends a command (FAILURE for one that is not foreseen)."""
    code = getattr(e, "exit_code", None)
    if isinstance(code, int) and not isinstance(code, bool):
        return code
    from unlearn_jax.errors import UnlearnError

    if isinstance(e, UnlearnError):
        return USER_ERROR
    if isinstance(e, KeyboardInterrupt):
        return SIGINT
    if isinstance(e, OSError):
        return IO_ERROR if e.errno in _MACHINE_ERRNOS else USER_ERROR
    return FAILURE


def describe_os_error(e: OSError) -> str:
    """One line for an OSError: the path, what failed and, where the user can act, what to do."""
    where = e.filename if e.filename is not None else "unlearn-jax"
    if e.filename2 is not None:
        where = f"{e.filename} -> {e.filename2}"
    what = e.strerror or type(e).__name__
    hint = {errno.ENOSPC: "free space on that disk and rerun", errno.EDQUOT: "free space in your quota and rerun",
            errno.EACCES: "check its permissions or choose another path",
            errno.EPERM: "check its permissions or choose another path",
            errno.EROFS: "it is on a read-only file system: choose another path"}.get(e.errno)
    return f"{where}: {what}" + (f" ({hint})" if hint else "")


__all__ = ["CHECKPOINT_CORRUPT", "FAILURE", "IO_ERROR", "NON_FINITE_LOSS", "OK", "SIGINT", "SIGTERM", "USER_ERROR",
           "WORKDIR_LOCKED", "describe_os_error", "for_exception", "signal_exit_code"]
