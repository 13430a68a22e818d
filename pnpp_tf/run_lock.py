"""One run per model_dir: an exclusive lock that a dead holder cannot keep.

    with RunLock(model_dir):        # UserError at once if another live run holds it
        train(...)
    with RunLock(export_dir, flag="--export_dir", file_name="export.lock", holder="export"):
        export(...)                 # one export per export directory, the same way

The lock is an `fcntl.flock` on `<model_dir>/run.lock`. The kernel drops it when its process
ends however it ends (exit, exception, SIGKILL) and a reboot forgets it, so a stale lock needs no
clean-up: the next run takes it and logs whose it was. The file also names the holder (pid, host,
start time, command) for the message a second run prints. Remote directories (gs://, s3://, ...)
cannot be locked this way; there the run warns and goes on unlocked.

Before locking, the directory is checked (`io_utils.check_writable_dir`): one that is a file,
lies under a file, is not writable or is on a read-only file system, and a lock file that is not
a regular file, stop the run with one line naming the flag, not with a traceback.
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
from pnpp_tf.io_utils import check_writable_dir

LOCK_FILE = "run.lock"


class RunLock:
    """An exclusive, non-blocking lock on a run directory.

    Args:
        directory: the run's `--model_dir` (created if missing).
        flag: how the user named `directory`, for messages.
        file_name: the lock file in `directory`.
        holder: what holds such a lock, for messages ("run", "export").
    """

    def __init__(self, directory, flag="--model_dir", file_name=LOCK_FILE, holder="run"):
        self.directory = directory
        self.flag = flag
        self.holder = holder
        self.path = os.path.join(directory, file_name)
        self._file = None

    def acquire(self):
        """Checks the directory can be written, then takes the lock.

        Raises:
            UserError: the directory cannot be used (see `io_utils.check_writable_dir`), the lock
                file is not a regular file, or another live process holds the lock (the message
                names the directory and the holder's pid and host).
        """
        if "://" in self.directory:
            logging.warning("%s=%s is remote and cannot be locked: make sure no other %s uses it.",
                            self.flag, self.directory, self.holder)
            return self
        check_writable_dir(self.directory, self.flag)
        if os.path.lexists(self.path) and not os.path.isfile(self.path):
            raise UserError(f"{self.path} is not a regular file, so it cannot lock {self.flag}={self.directory}; "
                            f"remove it (pnpp_tf creates it afresh) or choose another {self.flag}.")
        try:
            os.makedirs(self.directory, exist_ok=True)
            # "a+": open without truncating, so that a run that fails to lock can still read the holder.
            file = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
        except OSError as error:
            raise UserError(f"{self.path}: cannot open this lock file of {self.flag}={self.directory} "
                            f"({error.strerror}); fix its permissions or choose another {self.flag}.") from error
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            holder = _describe(_read_holder(file))
            file.close()
            raise UserError(f"{self.flag}={self.directory} is in use by another {self.holder} ({holder}); wait "
                            f"for it to finish or choose another {self.flag}.") from error
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
