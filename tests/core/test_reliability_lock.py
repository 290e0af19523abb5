"""One run per workdir (unlearn_jax.workdir_lock): a live holder refuses a second run naming its pid; a
lock left by a dead process is taken over, saying so; the lock is released on exit."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from unlearn_jax import exit_codes
from unlearn_jax.errors import UnlearnError
from unlearn_jax.workdir_lock import LOCK_NAME, WorkdirLocked, read_lock, workdir_lock
from repo_paths import ROOT

HOLDER = """
import sys, time
from unlearn_jax.workdir_lock import workdir_lock
with workdir_lock(sys.argv[1], "erase"):
    print("locked", flush=True)
    sys.stdin.readline()
"""


def _holder(workdir):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True, cwd=ROOT)
    assert p.stdout.readline().strip() == "locked"
    return p


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _notes():
    out = []
    return out, out.append


def test_second_run_refused_naming_the_first_pid_then_freed(tmp_path):
    p = _holder(tmp_path)
    try:
        assert read_lock(tmp_path).pid == p.pid
        with pytest.raises(WorkdirLocked) as e:
            with workdir_lock(tmp_path):
                pass
        msg = str(e.value)
        assert f"pid {p.pid}" in msg and "\n" not in msg and "(erase)" in msg
        assert exit_codes.for_exception(e.value) == exit_codes.WORKDIR_LOCKED
    finally:
        p.communicate("\n", timeout=30)
    assert p.returncode == 0
    assert not (tmp_path / LOCK_NAME).exists()  # released on exit
    with workdir_lock(tmp_path) as lock:
        assert lock.held and lock.took_over is None


def test_killed_holder_leaves_a_lock_that_is_taken_over(tmp_path):
    p = _holder(tmp_path)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert read_lock(tmp_path).pid == p.pid  # kill -9: nothing released it
    notes, notify = _notes()
    with workdir_lock(tmp_path, notify=notify) as lock:
        assert read_lock(tmp_path).pid == os.getpid()
        assert len(notes) == 1 and f"pid {p.pid}" in notes[0] and "no longer running" in notes[0]
        assert lock.took_over == notes[0]
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_file_with_a_dead_pid(tmp_path):
    dead = _dead_pid()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": 1.0,
                                                  "command": "erase", "token": "x"}))
    notes, notify = _notes()
    with workdir_lock(tmp_path, notify=notify):
        assert f"pid {dead}" in notes[0]


def test_other_host_and_unreadable_locks(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere.example", "started": time.time(),
                                                  "token": "x"}))
    with pytest.raises(WorkdirLocked, match=f"pid 1 on elsewhere.example.*delete {tmp_path / LOCK_NAME}"):
        workdir_lock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text("")  # a run is writing it right now
    with pytest.raises(WorkdirLocked, match="starting"):
        workdir_lock(tmp_path).acquire()
    old = time.time() - 3600  # ... or died while writing it, long ago
    os.utime(tmp_path / LOCK_NAME, (old, old))
    notes, notify = _notes()
    with workdir_lock(tmp_path, notify=notify):
        assert "unreadable" in notes[0]


def test_release_keeps_a_lock_taken_over_by_another_run(tmp_path):
    lock = workdir_lock(tmp_path).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "h", "started": 1.0, "token": "other"}))
    lock.release()
    assert read_lock(tmp_path).token == "other"


def test_bad_workdirs_are_one_line_errors(tmp_path):
    with pytest.raises(UnlearnError, match="no such folder"):
        workdir_lock(tmp_path / "missing").acquire()
    (tmp_path / "f").write_text("x")
    with pytest.raises(UnlearnError, match="is a file"):
        workdir_lock(tmp_path / "f").acquire()


RACER = """
import sys, time
from unlearn_jax.workdir_lock import WorkdirLocked, workdir_lock
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))
try:
    with workdir_lock(sys.argv[1], notify=lambda m: None):
        print("got", flush=True)
        time.sleep(1.0)
except WorkdirLocked:
    print("refused", flush=True)
"""


def test_runs_racing_for_a_stale_lock_one_wins(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": 1.0,
                                                  "token": "x"}))
    start = time.time() + 1.0
    ps = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), str(start)], stdout=subprocess.PIPE,
                           text=True, cwd=ROOT) for _ in range(4)]
    outs = sorted(p.communicate(timeout=60)[0].strip() for p in ps)
    assert outs == ["got", "refused", "refused", "refused"]
    assert not (tmp_path / LOCK_NAME).exists()
