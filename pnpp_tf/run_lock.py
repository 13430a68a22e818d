"""One run per model_dir: an exclusive lock that a dead holder cannot keep.

    with RunLock(model_dir):        # ValueError at once if another live run holds it
        train(...)

The lock is an `fcntl.flock` on `<model_dir>/run.lock`. The kernel drops it when its process
ends however it ends (exit, exception, SIGKILL) and a reboot forgets it, so a stale lock needs no
clean-up: the next run takes it and logs whose it was. The file also names the holder (pid, host,
start time, command) for the message a second run prints. Remote directories (gs://, s3://, ...)
cannot be locked this way; there the run warns and goes on unlocked.
"""

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys

from absl import logging

from pnpp_tf.errors import UserError

LOCK_FILE = "run.lock"


class RunLock:
    """An exclusive, non-blocking lock on a run directory.

    Args:
        directory: the run's `--model_dir` (created if missing).
    """

    def __init__(self, directory):
        self.directory = directory
        self.path = os.path.join(directory, LOCK_FILE)
        self._file = None

    def acquire(self):
        """Takes the lock.

        Raises:
            ValueError: another live process holds it; the message names the directory and the
                holder's pid and host.
        """
        if "://" in self.directory:
            logging.warning("--model_dir=%s is remote and cannot be locked: make sure no other run uses it.",
                            self.directory)
            return self
        os.makedirs(self.directory, exist_ok=True)
        # "a+": open without truncating, so that a run that fails to lock can still read the holder.
        file = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            holder = _describe(_read_holder(file))
            file.close()
            raise UserError(f"--model_dir={self.directory} is in use by another run ({holder}); wait for it "
                             "to finish or choose another --model_dir.") from error
        previous = _read_holder(file)
        if previous:
            logging.info("%s: taking over from %s, which is no longer running.", self.path, _describe(previous))
        file.seek(0)
        file.truncate()
        file.write(json.dumps(_this_process()) + "\n")
        file.flush()
        self._file = file
        return self

    def release(self):
        """Gives the lock up; the file stays, emptied, so that waiting runs never race on its creation."""
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            self._file.truncate(0)
        self._file.close()  # closing drops the flock
        self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def lock_unless(condition, directory):
    """`RunLock(directory)` if `condition`, else a context that locks nothing (multi-worker non-chiefs)."""
    return RunLock(directory) if condition else contextlib.nullcontext()


def _this_process():
    return {"pid": os.getpid(), "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv)}


def _read_holder(file):
    file.seek(0)
    try:
        holder = json.loads(file.read() or "null")
    except ValueError:
        return None
    return holder if isinstance(holder, dict) else None


def _describe(holder):
    if not holder:
        return "pid and host not yet recorded"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"
