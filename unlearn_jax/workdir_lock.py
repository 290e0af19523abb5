"""One run per workdir: a `.lock` file holding the owner's pid, host and start time.

    with workdir_lock(workdir):
        ...  # train, export, evaluate

The file is created with O_CREAT | O_EXCL, so of two runs starting together exactly one gets it.
A second run is refused with one line naming the first one's pid. A lock left by a process that
died (kill -9, a crash) on this host is taken over, saying so; on another host a process cannot
be checked, so that lock is refused with how to remove it. The lock is removed on exit, and only
while it is still the one this run wrote.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from unlearn_jax import exit_codes
from unlearn_jax.errors import UnlearnError

LOCK_NAME = ".lock"
# A lock file still empty this long after it was made belongs to a process that died while writing it.
_STARTING_GRACE_S = 10.0


class WorkdirLocked(UnlearnError):
    """Another live run holds the workdir."""

    exit_code = exit_codes.WORKDIR_LOCKED


def _proc_start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid from the owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat.rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int, start_ticks: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    if start_ticks is not None:
        now = _proc_start_ticks(pid)
        if now is not None and now != start_ticks:
            return False  # the pid now belongs to another process
    return True


@dataclasses.dataclass(frozen=True)
class LockInfo:
    pid: int
    host: str
    started: float  # time.time()
    command: str
    token: str
    start_ticks: int | None = None

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, started {when}" + (f" ({self.command})" if self.command else "")

    @classmethod
    def parse(cls, text: str) -> LockInfo | None:
        try:
            d = json.loads(text)
            return cls(pid=int(d["pid"]), host=str(d["host"]), started=float(d["started"]),
                       command=str(d.get("command", "")), token=str(d["token"]),
                       start_ticks=None if d.get("start_ticks") is None else int(d["start_ticks"]))
        except (ValueError, KeyError, TypeError):
            return None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self)) + "\n"


class WorkdirLock:
    """The lock of one workdir; `acquire()` / `release()`, or use it as a context manager."""

    def __init__(self, workdir: str | os.PathLike, command: str = "", notify: Callable[[str], None] | None = None):
        self.workdir = Path(workdir)
        self.path = self.workdir / LOCK_NAME
        self.command = command
        self.notify = notify or (lambda msg: print(msg, file=sys.stderr))
        self.info: LockInfo | None = None
        self.took_over: str | None = None  # the message said when a stale lock was taken over

    # ---- acquire -------------------------------------------------------------------------------
    def acquire(self) -> WorkdirLock:
        if self.info is not None:
            return self
        mine = LockInfo(pid=os.getpid(), host=socket.gethostname(), started=time.time(), command=self.command,
                        token=uuid.uuid4().hex, start_ticks=_proc_start_ticks(os.getpid()))
        for _ in range(5):
            if self._create(mine):
                self.info = mine
                return self
            with self._serialised():
                # Judged and replaced under a lock on the folder: of two runs that both find the same
                # stale lock, one takes it over and the other then finds the new, live one.
                text, age = self._read()
                if text is None:
                    continue  # removed meanwhile: try to create it again
                other = LockInfo.parse(text)
                why = self._stale_reason(other, age)
                if why is None:
                    raise self._refusal(other)
                os.unlink(self.path)
                if self._create(mine):
                    self.info = mine
                    self.took_over = f"note: {self.path}: {why}; this run takes the workdir over"
                    self.notify(self.took_over)
                    return self
        raise WorkdirLocked(f"{self.path}: could not take the workdir's lock (other runs keep changing it)")

    def _create(self, info: LockInfo) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except FileNotFoundError:
            raise UnlearnError(f"{self.workdir}: no such folder (the workdir must exist before it is locked)") from None
        except NotADirectoryError:
            raise UnlearnError(f"{self.workdir}: is a file, not a workdir folder") from None
        except PermissionError:
            raise UnlearnError(f"{self.workdir}: not writable (permission denied); choose another workdir") from None
        except OSError as e:
            if e.errno == errno.EROFS:
                raise UnlearnError(f"{self.workdir}: on a read-only file system; choose another workdir") from None
            raise
        try:
            os.write(fd, info.to_json().encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return True

    def _read(self) -> tuple[str | None, float]:
        try:
            text = self.path.read_text()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None, 0.0
        return text, age

    @contextlib.contextmanager
    def _serialised(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # no flock (Windows): the O_EXCL create alone decides
            yield
            return
        fd = os.open(self.workdir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _stale_reason(self, other: LockInfo | None, age: float) -> str | None:
        """Why the existing lock can be taken over, or None when it belongs to a live (or unknown) run."""
        if other is None:
            if age < _STARTING_GRACE_S:
                return None  # being written by a run that is starting right now
            return "the lock file is empty or unreadable (its run died while starting)"
        if other.host != socket.gethostname():
            return None
        if other.pid == os.getpid():
            if other.start_ticks is not None and other.start_ticks != _proc_start_ticks(os.getpid()):
                return f"the run that held it ({other.describe()}) is no longer running (its pid is reused)"
            return None  # this process already holds it through another WorkdirLock
        if _alive(other.pid, other.start_ticks):
            return None
        return f"the run that held it ({other.describe()}) is no longer running"

    def _refusal(self, other: LockInfo | None) -> WorkdirLocked:
        if other is None:
            return WorkdirLocked(f"{self.workdir}: another unlearn-jax run is starting in this workdir ({self.path} is "
                                 "being written); wait for it, or choose another workdir")
        if other.host != socket.gethostname():
            return WorkdirLocked(f"{self.workdir}: in use by another unlearn-jax run ({other.describe()}); this host "
                                 f"cannot check that process: if it is gone, delete {self.path} and rerun")
        return WorkdirLocked(f"{self.workdir}: in use by another unlearn-jax run ({other.describe()}); wait for pid "
                             f"{other.pid} to finish (or stop it), or choose another workdir")

    # ---- release -------------------------------------------------------------------------------
    def release(self):
        """Removes the lock file if it is still ours (a run that took it over keeps its own)."""
        if self.info is None:
            return
        text, _ = self._read()
        if text is not None:
            current = LockInfo.parse(text)
            if current is not None and current.token == self.info.token:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
        self.info = None

    @property
    def held(self) -> bool:
        return self.info is not None

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


def workdir_lock(workdir: str | os.PathLike, command: str = "", notify: Callable[[str], None] | None = None
                 ) -> WorkdirLock:
    """The context manager of a workdir's lock: `with workdir_lock(path, "erase"):`."""
    return WorkdirLock(workdir, command=command, notify=notify)


def read_lock(workdir: str | os.PathLike) -> LockInfo | None:
    """Who holds the workdir's lock (None: no lock, or an unreadable one)."""
    try:
        return LockInfo.parse((Path(workdir) / LOCK_NAME).read_text())
    except OSError:
        return None


__all__ = ["LOCK_NAME", "LockInfo", "WorkdirLock", "WorkdirLocked", "read_lock", "workdir_lock"]
