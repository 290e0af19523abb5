"""The exit-code convention (unlearn_jax.exit_codes): distinct codes a job scheduler can tell apart."""
import errno
import signal

from unlearn_jax import exit_codes as X
from unlearn_jax.checkpoint_integrity import CheckpointCorrupt
from unlearn_jax.errors import ConversionError, UnlearnError
from unlearn_jax.workdir_lock import WorkdirLocked


def test_codes_are_distinct_and_signals_follow_the_shell():
    codes = [X.OK, X.FAILURE, X.USER_ERROR, X.NON_FINITE_LOSS, X.CHECKPOINT_CORRUPT, X.IO_ERROR, X.WORKDIR_LOCKED,
             X.SIGINT, X.SIGTERM]
    assert len(set(codes)) == len(codes)
    assert X.SIGTERM == 143 == X.signal_exit_code(signal.SIGTERM) and X.SIGINT == 130
    assert X.USER_ERROR == 2  # argparse's usage errors exit 2 as well
    for name in ("OK", "USER_ERROR", "NON_FINITE_LOSS", "SIGTERM", "143"):
        assert name in X.__doc__


def test_for_exception():
    assert X.for_exception(UnlearnError("x")) == X.USER_ERROR
    assert X.for_exception(ConversionError("x")) == X.USER_ERROR
    assert X.for_exception(WorkdirLocked("x")) == X.WORKDIR_LOCKED
    assert X.for_exception(CheckpointCorrupt("x")) == X.CHECKPOINT_CORRUPT
    assert X.for_exception(KeyboardInterrupt()) == X.SIGINT
    assert X.for_exception(OSError(errno.ENOSPC, "No space left on device", "/w/x")) == X.IO_ERROR
    assert X.for_exception(PermissionError(errno.EACCES, "Permission denied", "/w")) == X.USER_ERROR
    assert X.for_exception(RuntimeError("bug")) == X.FAILURE

    class NonFinite(UnlearnError):  # how erase.NonFiniteLoss can carry its code
        exit_code = X.NON_FINITE_LOSS

    assert X.for_exception(NonFinite("nan")) == X.NON_FINITE_LOSS


def test_describe_os_error_is_one_line_with_a_hint():
    msg = X.describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/w/ckpt"))
    assert msg == "/w/ckpt: No space left on device (free space on that disk and rerun)"
    msg = X.describe_os_error(OSError(errno.EROFS, "Read-only file system", "/ro/out"))
    assert "/ro/out" in msg and "read-only" in msg and "\n" not in msg
    assert X.describe_os_error(OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b")).startswith("/a -> /b:")
