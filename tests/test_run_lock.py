"""One run per model_dir: a second run stops at once; a killed holder's lock is taken over."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from cli_helpers import REPO, TINY_RUN, run_module
from conftest import make_folder_dataset
from pnpp_tf.run_lock import LOCK_FILE, RunLock, lock_unless

HOLD_LOCK = "import sys, time; from pnpp_tf.run_lock import RunLock; lock = RunLock(sys.argv[1]).acquire(); time.sleep(600)"


def wait_for_holder(lock_path, process, timeout=300):
    """The lock file's record once `process` has written it (polled; bounded by `timeout`)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[1][-3000:]
        try:
            holder = json.loads(lock_path.read_text() or "null")
        except (OSError, ValueError):
            holder = None
        if holder and holder["pid"] == process.pid:
            return holder
        time.sleep(0.1)
    raise AssertionError(f"{lock_path} never named pid {process.pid}")


def popen_python(*args, **kwargs):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
               TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


@pytest.mark.slow
def test_a_second_run_on_a_busy_model_dir_stops_at_once_and_the_first_is_untouched(tmp_path):
    data_dir = make_folder_dataset(tmp_path / "data")
    model_dir = tmp_path / "run"
    common = ("--dataset=folder", "--eval_ks=1", *TINY_RUN, f"--data_dir={data_dir}", f"--model_dir={model_dir}")
    first = popen_python("-m", "pnpp_tf.train", *common)
    try:
        holder = wait_for_holder(model_dir / LOCK_FILE, first)
        # Paused while it holds the lock, so the second run meets a busy directory whatever the speeds.
        first.send_signal(signal.SIGSTOP)
        second = run_module("pnpp_tf.train", *common, "--lr=1e-2")
    finally:
        first.send_signal(signal.SIGCONT)
    _, first_stderr = first.communicate(timeout=600)

    assert second.returncode == 2
    errors = [line for line in second.stderr.splitlines() if line.startswith("pnpp_tf.train: error:")]
    assert errors == [f"pnpp_tf.train: error: --model_dir={model_dir} is in use by another run (pid {first.pid} "
                      f"on host {holder['host']}, started {holder['started']}); wait for it to finish or choose "
                      "another --model_dir."], second.stderr[-2000:]
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, first_stderr[-3000:]
    results = json.loads((model_dir / "results.json").read_text())
    assert results["flags"]["lr"] == 1e-3  # the first run's, not the refused one's
    assert len(results["history"]["loss"]) == 3
    assert (model_dir / LOCK_FILE).read_text() == ""  # released on exit


def test_the_lock_of_a_killed_run_is_taken_over_and_says_whose_it_was(tmp_path):
    holder = popen_python("-c", HOLD_LOCK, str(tmp_path))
    try:
        recorded = wait_for_holder(tmp_path / LOCK_FILE, holder)
        with pytest.raises(ValueError, match=f"in use by another run \\(pid {holder.pid} on host"):
            RunLock(str(tmp_path)).acquire()
    finally:
        holder.kill()  # SIGKILL: no exit handler runs, the file still names the dead holder
        holder.communicate()
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == recorded["pid"]
    with _logged() as lines:
        with RunLock(str(tmp_path)):
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert any(f"taking over from pid {holder.pid} on host" in line for line in lines)


def test_released_on_an_exception_and_exclusive_within_one_process(tmp_path):
    with pytest.raises(RuntimeError):
        with RunLock(str(tmp_path)):
            with pytest.raises(ValueError, match="is in use by another run"):
                RunLock(str(tmp_path)).acquire()
            raise RuntimeError("a crash inside the run")
    with RunLock(str(tmp_path)):
        pass


def test_an_export_lock_names_the_export(tmp_path):
    with RunLock(str(tmp_path), flag="--export_dir", file_name="export.lock", holder="export"):
        with pytest.raises(ValueError, match=rf"^--export_dir={tmp_path} is in use by another export \(pid "
                                             rf"{os.getpid()} on host .*; wait for it to finish or choose "
                                             r"another --export_dir\.$"):
            RunLock(str(tmp_path), flag="--export_dir", file_name="export.lock", holder="export").acquire()
        with RunLock(str(tmp_path)):  # another lock file: a run's lock on the same folder is free
            pass
    assert sorted(os.listdir(tmp_path)) == ["export.lock", LOCK_FILE]


def test_an_unusable_model_dir_is_one_line_before_anything_is_created(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=rf"^--model_dir={tmp_path / 'a_file'} is a file, not a directory; "
                                         r"choose another --model_dir\.$"):
        RunLock(str(tmp_path / "a_file")).acquire()
    (tmp_path / "run" / LOCK_FILE).mkdir(parents=True)
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'run' / LOCK_FILE} is not a regular file"):
        RunLock(str(tmp_path / "run")).acquire()
    assert os.listdir(tmp_path / "run") == [LOCK_FILE]


def test_only_the_chief_locks(tmp_path):
    with lock_unless(False, str(tmp_path / "run")):
        assert not (tmp_path / "run").exists()
    with lock_unless(True, str(tmp_path / "run")):
        assert (tmp_path / "run" / LOCK_FILE).is_file()


class _logged:
    """Collects absl's log lines of the block."""

    def __enter__(self):
        import logging  # pylint: disable=import-outside-toplevel

        self.lines = []
        self.handler = logging.Handler()
        self.handler.emit = lambda record: self.lines.append(record.getMessage())
        self.logger = logging.getLogger("absl")
        self.logger.addHandler(self.handler)
        self.level = self.logger.level
        self.logger.setLevel(logging.INFO)
        return self.lines

    def __exit__(self, *exc_info):
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.level)
